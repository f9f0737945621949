"""Calibration on the user's own model (``Attributor.calibrate``, ``Session.calibrate``): settings chosen against a
cheap truth on that model — same-seed replays of a recorded run, or further training from the final model — never
worse than the default on it, within the budget, and refused by name when there is no truth to build."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.methods.calibration import CalibrationTruth, replay_truth, sample_test_points
from tda_explorer.compute.training.run_recorder import RunRecorder
from tda_explorer.compute.training.train import TrainConfig
from tda_explorer.errors import TDAError
from tda_explorer.session import Session

N, BATCH, EPOCHS, LR, WD = 90, 15, 20, 0.2, 1e-3
NEEDS = "needs a recording or a final model with a training recipe"


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + 30, 6, generator=gen)
    y = (x[:, 0] - x[:, 2] > 0).long() + (x[:, 1] > 0.5).long()
    return AttributionDataset(x[:N], y[:N], name="train"), AttributionDataset(x[N:], y[N:], name="test")


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.fixture(scope="module")
def recorded():
    """A tiny model trained by the user's own SGD loop, recorded: (train, test, task, recorder)."""
    train, test = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
    recorder = RunRecorder(model, optimizer, train, batch_size=BATCH)
    torch.manual_seed(7)
    for _ in range(EPOCHS):
        order = torch.randperm(N)
        for start in range(0, N, BATCH):
            rows = order[start : start + BATCH]
            optimizer.zero_grad()
            recorder.loss(model(train.inputs[rows]), rows).backward()
            recorder.step(rows)
    recorder.finish()
    return train, test, AttributionTask(model, weight_decay=WD), recorder


def _rescore(method, task, options, train, truth: CalibrationTruth) -> float:
    scores = get_method(method, task, **options).fit(train).attribute(truth.test).scores
    return float(truth.per_test(scores, train).nanmean())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["if-ekfac", "if-explicit"])
def test_replay_calibration_is_never_worse_than_the_default(recorded, method):
    train, test, task, recorder = recorded
    attributor = get_method(method, task)
    result = attributor.calibrate(train, test, recording=recorder)
    assert result.truth == "replay" and "same-seed replays" in result.truth_description
    assert result.score >= result.default_score
    assert result.trials["stage"].iloc[0] == "default" and "damping" in set(result.trials["stage"])
    assert result.trials["chosen"].sum() == 1
    # the attributor now carries the choice, and the reported scores are what those settings give on the truth
    assert attributor.calibration_ is result
    if "damping" in result.options:
        assert attributor.args.damping == result.options["damping"]
    truth = replay_truth(recorder, task, train, sample_test_points(test, 64))  # the same truth (kept, not rebuilt)
    assert _rescore(method, task, result.options, train, truth) == pytest.approx(result.score, abs=1e-6)
    assert _rescore(method, task, {}, train, truth) == pytest.approx(result.default_score, abs=1e-6)
    assert "score" in result.summary() and "default's" in result.summary()


@pytest.mark.slow
def test_a_budget_too_small_is_refused_with_the_minimum_and_a_budget_is_kept(recorded):
    train, test, task, recorder = recorded
    with pytest.raises(TDAError, match=r"budget_s=0\.001 s is too small .* needs budget_s >= ") as err:
        get_method("if-explicit", task).calibrate(train, test, recording=recorder, budget_s=0.001)
    minimum = float(re.search(r"needs budget_s >= ([0-9.e+-]+) s", str(err.value)).group(1))
    budget = 2 * minimum
    result = get_method("if-explicit", task).calibrate(train, test, recording=recorder, budget_s=budget)
    slowest = result.trials["seconds"].max()
    assert result.seconds <= budget + slowest  # a trial starts only when the slowest so far still fits
    assert set(result.trials["status"].str.split(":").str[0]) <= {"ok", "ok (solver backed off)", "skipped",
                                                                   "stopped", "error"}
    assert result.score >= result.default_score


def test_calibration_without_a_truth_says_which_it_needs():
    train, test = _data()
    task = AttributionTask(_model())
    with pytest.raises(TDAError, match=NEEDS):
        get_method("if-ekfac", task).calibrate(train, test)
    with pytest.raises(TDAError, match="budget_s must be a positive number"):
        get_method("if-ekfac", task).calibrate(train, test, recipe=TrainConfig(), budget_s=-1)
    with pytest.raises(TDAError, match="test: give the test points"):
        get_method("if-ekfac", task).calibrate(train, recipe=TrainConfig())


def test_a_prebuilt_truth_brings_its_own_test_points_and_other_ones_are_refused(recorded):
    """With ``truth=``, ``test`` may be left out (the truth's points are the ones scored); a test set that does not
    hold the truth's points is refused by name instead of being silently ignored."""
    train, test, task, recorder = recorded
    truth = replay_truth(recorder, task, train, sample_test_points(test, 8))
    result = get_method("if-explicit", task).calibrate(train, truth=truth)
    assert result.truth == "replay" and result.default_score == pytest.approx(
        _rescore("if-explicit", task, {}, train, truth), abs=1e-6)
    get_method("if-explicit", task).calibrate(train, test, truth=truth)  # the set it was sampled from is fine
    with pytest.raises(TDAError, match="test: the truth given measures other test points"):
        get_method("if-explicit", task).calibrate(train, train, truth=truth)


def test_a_method_with_nothing_to_tune_keeps_its_defaults_at_once():
    train, test = _data()
    result = get_method("grad-dot", AttributionTask(_model())).calibrate(train, test)  # no truth needed either
    assert result.options == {} and result.truth is None and result.trials.empty
    assert "nothing to calibrate" in result.summary()


@pytest.mark.slow
def test_further_training_truth_when_only_the_final_model_and_recipe_exist(recorded):
    train, test, task, _ = recorded
    recipe = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, weight_decay=WD, optimizer="sgd")
    attributor = get_method("if-ekfac", task)
    result = attributor.calibrate(train, test, recipe=recipe)
    assert result.truth == "further-training" and "further training" in result.truth_description
    assert result.score >= result.default_score
    assert {"default", "damping", "fisher"} <= set(result.trials["stage"])


@pytest.mark.slow
def test_retraining_truth_from_a_recipe_with_a_model_factory(recorded):
    train, test, task, _ = recorded
    recipe = {"model_factory": lambda seed: _model(),
              "train_config": TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, weight_decay=WD, optimizer="sgd")}
    result = get_method("trak", task).calibrate(train, test, recipe=recipe)
    assert result.truth == "retraining" and "retrained 10 times, each without 4" in result.truth_description
    assert result.score >= result.default_score
    further = get_method("trak", task).calibrate(train, test, recipe=recipe, retrain=False)
    assert further.truth == "further-training"


@pytest.mark.slow
def test_session_calibrate_computes_with_the_chosen_options(recorded, tmp_path):
    train, test, task, recorder = recorded
    session = Session(train, test, task, folder=tmp_path, resources={"recording": lambda: {"recording": recorder}})
    result = session.calibrate("if-explicit")
    assert result.truth == "replay" and session.calibrations["if-explicit"] is result
    assert "if-explicit" in session.methods
    assert session.options["if-explicit"] == result.options
    expected = get_method("if-explicit", task, **result.options).fit(train).attribute(test).scores
    assert torch.allclose(session.attribution("if-explicit").matrix(), expected, atol=1e-6)
    bare = Session(train, test, task, folder=tmp_path / "bare")
    with pytest.raises(TDAError, match=NEEDS):
        bare.calibrate("if-explicit")
    with pytest.raises(TDAError, match="truth='further-training' needs the final model's training recipe"):
        session.calibrate("if-explicit", truth="further-training")


@pytest.mark.slow
def test_session_calibrate_on_the_users_retrain_function(recorded, tmp_path):
    train, test, task, _ = recorded

    def retrain(ids, seed):
        torch.manual_seed(seed)
        model = _model()
        rows = train.positions(ids)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=WD)
        for _ in range(10):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(train.inputs[rows]), train.labels[rows]).backward()
            optimizer.step()
        return model

    session = Session(train, test, task, folder=tmp_path, retrain=retrain)
    result = session.calibrate("if-ekfac")
    assert result.truth == "retraining" and "paired over 2 seeds" in result.truth_description
    assert result.score >= result.default_score and "if-ekfac" in session.methods


def test_retraining_truth_on_a_model_with_buffers():
    """A model with buffers (the zoo's BatchNorm: running statistics outside the parameters) retrains in lock-step
    and is evaluated with the attributed model's statistics: calibrate builds its truth instead of failing on the
    buffers."""
    from torch import nn

    from tda_explorer import AttributionDataset, AttributionTask, get_method
    from tda_explorer.compute.training.train import TrainConfig, train_model
    from tda_explorer.experiments.zoo import BatchNorm2d, calibrate_batchnorm

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 3))

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 6, 6, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    train, test = AttributionDataset(x[:48], y[:48]), AttributionDataset(x[48:], y[48:])
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, weight_decay=0.0, optimizer="sgd", n_checkpoints=1)
    model = calibrate_batchnorm(train_model(factory, train.inputs, train.labels, config).model, train.inputs)
    attributor = get_method("if-ekfac", AttributionTask(model), train_config=config)
    result = attributor.calibrate(train, test, recipe={"model_factory": factory, "train_config": config},
                                  removals=3, test_points=8)
    assert result.truth == "retraining" and result.score is not None and len(result.trials) >= 2


def _removal_truth(n_groups: int, n_test: int = 40) -> CalibrationTruth:
    effects = torch.randn(n_groups, n_test, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = AttributionDataset(torch.zeros(n_test, 1), torch.zeros(n_test, dtype=torch.long), name="t")
    return CalibrationTruth("retraining", "synthetic", test, 0.0,
                            [[g] for g in range(n_groups)], effects)


def test_a_gain_carried_by_one_pair_of_groups_does_not_move_the_choice():
    """The candidate predicts every group exactly; the default swaps two of five groups. The candidate wins on every
    test point (the per-test-point standard error alone would choose it), but only on the resamples of the truth that
    hold both groups: the default is kept. The same kind of gain spread over many groups is taken."""
    from tda_explorer.compute.methods.calibration import _better

    truth = _removal_truth(5)
    exact = truth.effects.clone()
    swapped = exact[[1, 0, 2, 3, 4]]
    diff = truth.agreement(exact) - truth.agreement(swapped)
    assert bool((diff > 0).all())  # every test point prefers the candidate
    assert not _better(exact, swapped, truth)

    truth = _removal_truth(40)
    noisy = truth.effects + 0.8 * torch.randn(truth.effects.shape, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(2))
    assert _better(truth.effects.clone(), noisy, truth)
    assert not _better(noisy, truth.effects.clone(), truth)


def test_a_candidate_far_slower_than_the_default_is_stopped_at_the_budget(recorded, monkeypatch):
    """Every candidate that sets a damping runs forever (checking its deadline as the long loops do): calibration
    stops each at the end of the budget (16× the default's run), records it, and keeps the default."""
    import time

    from tda_explorer.compute.methods.influence.direct import CGInfluence
    from tda_explorer.jobs import check_cancelled

    train, test, task, recorder = recorded
    original = CGInfluence._attempt

    def slow_unless_default(self, b):
        while "damping" in self.explicit_options_:
            time.sleep(0.01)
            check_cancelled()
        return original(self, b)

    monkeypatch.setattr(CGInfluence, "_attempt", slow_unless_default)
    result = get_method("if-cg", task).calibrate(train, test, recording=recorder)
    trials = result.trials.set_index("stage")
    default_seconds = float(trials.loc["default", "seconds"])
    stopped = result.trials[result.trials["status"] == "stopped: budget"]
    assert len(stopped) >= 1 and result.options == {}
    assert result.seconds - result.truth_seconds < 16 * default_seconds + 1.0


@pytest.mark.parametrize("recipe", [None, TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, weight_decay=WD,
                                                      optimizer="sgd")])
def test_kronecker_damping_candidates_are_centred_on_the_level_its_default_amounts_to(recorded, recipe):
    """K-FAC's default damping is None (a rule: matched to the exact curvature, relative per layer or a multiple of the
    exact system's absolute λ); calibration's decades are taken around the damping in use, in the form it has: one λ
    on every layer as an absolute damping (``damping_kind="absolute"``), else the relative level it amounts to (λ_l over
    layer l's mean eigenvalue, geometric mean over layers), not around an arbitrary level in another form."""
    train, test, task, recorder = recorded
    attributor = get_method("if-kfac", task, train_config=recipe).fit(train)
    lams = attributor._layer_damping()
    levels = [lam / f.mean_eigenvalue() for f, lam in zip(attributor.factors_, lams)]
    expected = float(torch.tensor(levels).log().mean().exp())
    assert attributor.damping_rule_ == "matched"
    assert attributor.damping_match_.exact_rule == ("spectrum" if recipe is None else "recipe")
    assert attributor.resolved_relative_damping() == pytest.approx(expected)
    value, kind = attributor.resolved_damping()
    if attributor.damping_match_.family == "absolute":
        assert kind == "absolute" and value == pytest.approx(lams[0]) and lams == [lams[0]] * len(lams)
    else:
        assert kind == "relative" and value == pytest.approx(expected)
    # a given level is its own resolution, in its own form
    assert get_method("if-kfac", task, damping=0.2).fit(train).resolved_damping() == (0.2, "relative")
    assert get_method("if-kfac", task, damping=0.2, damping_kind="absolute").fit(train).resolved_damping() == (
        0.2, "absolute")
    result = get_method("if-kfac", task, train_config=recipe).calibrate(train, test, recording=recorder)
    tried = [json.loads(o) for o, stage in zip(result.trials["options"], result.trials["stage"]) if stage == "damping"]
    assert [t["damping"] for t in tried] == pytest.approx([value * 10.0 ** k for k in (-1, 1, -2, 2, -3, 3)])
    assert all(t.get("damping_kind", "relative") == kind for t in tried)
