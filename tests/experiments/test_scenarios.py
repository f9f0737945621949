"""Every built-in scenario satisfies the one ``Scenario`` protocol, and a session over it can run exactly the methods
its declared resources allow (needs read from the catalogue, not guessed)."""

from __future__ import annotations

import pytest

from tda_explorer.errors import TDAError
from tda_explorer.experiments import Scenario, build_experiment
from tda_explorer.experiments.backdoor import build_backdoor
from tda_explorer.session import Session


def test_digits_experiment_is_a_scenario_whose_session_runs_recipe_and_trajectory_methods(tmp_path):
    exp = build_experiment("lr", n_train=120, n_test=20, epochs=20)
    assert isinstance(exp, Scenario)
    session = Session.from_experiment(exp, folder=tmp_path)
    lacks = session.method_availability()
    for runnable in ("tracin", "suspicion", "synset-loo", "magic", "dvemb", "source", "grad-dot"):
        assert lacks[runnable] == [], (runnable, lacks[runnable])
    assert lacks["dda"] and "base model" in lacks["dda"][0]
    assert session.retrainer is not None and session.recipe is exp.config
    with pytest.raises(TDAError, match="dda needs the base model"):
        session.compute("dda")


def test_backdoor_is_a_scenario_that_supplies_its_base_model(tmp_path):
    scenario = build_backdoor(seed=0, base_epochs=2, fine_tune_epochs=5)
    assert isinstance(scenario, Scenario)
    session = Session.from_experiment(scenario, folder=tmp_path)
    lacks = session.method_availability()
    assert lacks["dda"] == [] and lacks["tracin"] == []
    assert lacks["suspicion"] and "training recipe" in lacks["suspicion"][0]  # no recipe: no out-of-fold models
    assert session.retrainer is None
    session.compute("dda", inner="grad-dot")
    assert session.attribution("dda").scores.shape == (len(scenario.queries), len(scenario.train))


def test_a_session_refuses_what_is_not_a_scenario(tmp_path):
    with pytest.raises(TDAError, match="experiment must be a built-in scenario"):
        Session.from_experiment(object(), folder=tmp_path)
