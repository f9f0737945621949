"""Sessions the widget tests share: the digits experiment with methods computed in a chosen order."""

import pytest

from tda_explorer.session import Session


@pytest.fixture
def session_with(digits_experiment, tmp_path):
    """``session_with("tracin", "grad-dot")``: a session over the digits experiment with those methods computed in
    that order (the first computed is the explorer's default method)."""

    def make(*methods: str) -> Session:
        session = Session.from_experiment(digits_experiment, folder=tmp_path)
        for method in methods:
            session.compute(method)
        return session

    return make
