"""Explorer logic without a browser: simulated clicks and value changes."""

import pytest

from tda_explorer.session import Session
from tda_explorer.widgets import Explorer


@pytest.fixture
def explorer(digits_experiment, tmp_path):
    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("tracin")
    session.compute("grad-dot")
    return Explorer(session, method="tracin", k=4)


def test_proponents_shown_equal_topk_after_click(explorer):
    attribution = explorer.session.attribution("tracin")
    assert explorer.browser.shown_ids() == attribution.topk(explorer.state.test_id, 4)[0]
    card = explorer.picker.cards[5]
    card.button.click()
    assert explorer.state.test_id == card.example_id
    assert explorer.browser.shown_ids() == attribution.topk(card.example_id, 4)[0]
    assert explorer.browser.shown_ids("opponents") == attribution.topk(card.example_id, 4, "opponents")[0]
    assert card.button.button_style == "info"


def test_method_and_k_changes_update_in_place(explorer):
    cards_before = list(explorer.browser.proponents)
    explorer.browser.method.value = "grad-dot"
    explorer.browser.k.value = 7
    expected = explorer.session.attribution("grad-dot").topk(explorer.state.test_id, 7)[0]
    assert explorer.state.method == "grad-dot" and explorer.state.k == 7
    assert explorer.browser.shown_ids() == expected
    assert explorer.browser.proponents == cards_before  # same widgets, new content


def test_flag_click_persists_and_survives_new_explorer(explorer):
    card = explorer.browser.proponents[0]
    train_id = card.example_id
    card.button.click()
    assert card.button.description == "unflag"
    assert explorer.session.flags.is_flagged(train_id)
    fresh = Session(explorer.session.train, explorer.session.test, explorer.session.task,
                    folder=explorer.session.folder)
    fresh.compute("tracin")
    assert fresh.flags.flagged_ids() == [train_id]
    other = Explorer(fresh, method="tracin", k=4)
    other.state.test_id = explorer.state.test_id
    assert other.browser.proponents[0].button.description == "unflag"
    card.button.click()
    assert not explorer.session.flags.is_flagged(train_id)


def test_pagination_and_misclassified_filter(explorer):
    first = [c.example_id for c in explorer.picker.cards]
    explorer.picker.next_button.click()
    assert explorer.picker.page == 1
    assert [c.example_id for c in explorer.picker.cards] != first
    explorer.picker.only_errors.value = True
    table = explorer.session.test_table()
    errors = table[table.label != table.predicted].test_id.tolist()
    shown = [c.example_id for c in explorer.picker.cards if c.example_id is not None]
    assert shown == errors[: len(shown)] and explorer.picker.page == 0


def test_explorer_needs_an_attribution(digits_experiment, tmp_path):
    with pytest.raises(ValueError, match="no attribution yet"):
        Explorer(Session.from_experiment(digits_experiment, folder=tmp_path))
