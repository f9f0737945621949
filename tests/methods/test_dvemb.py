"""Data value embedding against replayed trajectory-specific leave-one-out."""

import pytest
import torch

from tda_explorer import TDAError, get_method
from tda_explorer.compute.methods.dvemb import record_experiment_run
from tda_explorer.compute.training.train import TrainConfig
from tda_explorer.data.digits import load_digits_split
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.retrainer import Retrainer


def _experiment(kind, lr, epochs):
    split = load_digits_split(n_train=60, n_test=12, seed=2)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=lr, weight_decay=1e-2, optimizer="sgd")
    return Experiment(split, kind, config, record=None)  # type: ignore[arg-type]


def _recorded(exp, projection_dim=None):
    from tda_explorer import AttributionTask

    task = AttributionTask(exp.factory(0), weight_decay=exp.config.weight_decay)
    recording = record_experiment_run(task, exp.split.train, exp.factory, exp.config, seed=exp.config.seed,
                                      projection_dim=projection_dim)
    return task, recording


@pytest.mark.parametrize("lr,max_error", [(0.001, 0.01), (0.02, 0.1)])
def test_dvemb_equals_replayed_loo_on_a_linear_model_with_a_small_step(lr, max_error):
    """First order in the step: the error shrinks with it (measured 0.4% at 0.001, 6.9% at 0.02)."""
    exp = _experiment("lr", lr=lr, epochs=3)
    task, recording = _recorded(exp)
    method = get_method("dvemb", task, recording=recording).fit(exp.split.train)
    predicted = method.attribute(exp.split.test).scores.double()  # [n_test, n_train]
    actual = Retrainer(exp).remove([[i] for i in exp.split.train.ids]).delta.T  # same batches without z
    assert torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1] > 0.999
    assert float((predicted - actual).abs().max() / actual.abs().max()) < max_error
    curve = method.influence_curve(exp.split.test.subset([0]), exp.split.train.ids[:3])
    assert list(curve.columns) == ["test_id", "train_id", "epoch", "score"] and len(curve) == 9
    sums = curve.groupby("train_id", sort=False)["score"].sum().to_numpy()
    torch.testing.assert_close(torch.tensor(sums), predicted[0, :3], rtol=1e-5, atol=1e-9)


@pytest.mark.slow  # trains models
def test_dvemb_tracks_replayed_loo_on_an_mlp_and_refuses_without_a_recording():
    exp = _experiment("mlp", lr=0.1, epochs=5)
    task, recording = _recorded(exp, projection_dim=None)
    method = get_method("dvemb", task, recording=recording).fit(exp.split.train)
    predicted = method.attribute(exp.split.test).scores.double()
    actual = Retrainer(exp).remove([[i] for i in exp.split.train.ids]).delta.T
    assert torch.corrcoef(torch.stack([predicted.flatten(), actual.flatten()]))[0, 1] > 0.9
    with pytest.raises(TDAError, match="dvemb needs a finished recording of the training run"):
        get_method("dvemb", task)
    adam = TrainConfig(epochs=1, batch_size=16, optimizer="adam")
    with pytest.raises(TDAError, match="dvemb follows SGD steps"):
        record_experiment_run(task, exp.split.train, exp.factory, adam, seed=0)


def test_steps_past_the_recursions_stability_are_named():
    """A step whose η·λ_max(K + wd) exceeds 2 amplifies what the recursion propagates: a run with such steps warns
    and names them (``step_curvatures_``: each step's, checked against the projected batch's Gram matrix); a run
    whose steps all contract says nothing."""
    import warnings

    from tda_explorer.compute.methods.dvemb import UnstableStepsWarning

    exp = _experiment("lr", lr=0.001, epochs=1)
    task, recording = _recorded(exp)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnstableStepsWarning)
        stable = get_method("dvemb", task, recording=recording).fit(exp.split.train)
    assert float(stable.step_curvatures_.max()) < 2
    step = recording.steps[0]
    g = step.gradients.double()
    expected = step.lr / recording.batch_size * float(torch.linalg.eigvalsh(g.T @ g)[-1]) + step.lr * 1e-2
    assert float(stable.step_curvatures_[0]) == pytest.approx(expected, rel=1e-6)
    exp = _experiment("lr", lr=1.0, epochs=1)
    task, recording = _recorded(exp)
    with pytest.warns(UnstableStepsWarning, match=r"dvemb: in \d+ of 4 recorded steps .* exceeds 2"):
        unstable = get_method("dvemb", task, recording=recording).fit(exp.split.train)
    assert float(unstable.step_curvatures_.max()) > 2
