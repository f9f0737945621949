"""Replay metagradients against finite differences and same-seed retraining of the run they differentiate."""

from __future__ import annotations

import copy

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.methods.synset import Trajectory
from tda_explorer.compute.training.train import TrainConfig, stacked_outputs, train_weighted
from tda_explorer.errors import TDAError

CONFIG = TrainConfig(epochs=3, batch_size=8, lr=0.2, weight_decay=1e-2, optimizer="sgd", seed=3)


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(28, 4, generator=gen, dtype=torch.float64)  # 28 = 3 full batches and one of 4
    y = (x[:, 0] + 0.5 * torch.randn(28, generator=gen, dtype=torch.float64) > 0).long() + (x[:, 1] > 1).long()
    train = AttributionDataset(x, y, name="tiny-train")
    test = AttributionDataset(torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0]),
                              name="tiny-test")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    trajectory = Trajectory(copy.deepcopy(model.state_dict()), CONFIG, [])
    return train, test, model, trajectory


def _final_losses(model, trajectory, train, test, weights):
    """Test losses [M, n_test] after the same-seed run with each row of data weights."""
    factory = lambda seed: copy.deepcopy(model).requires_grad_(True)
    factory(0).load_state_dict(trajectory.init_state)

    def init(seed):
        m = factory(seed)
        m.load_state_dict(trajectory.init_state)
        return m

    params = train_weighted(init, train.inputs, train.labels, weights, trajectory.config,
                            [trajectory.config.seed] * len(weights))
    out = stacked_outputs(model, params, test.inputs)
    return torch.stack([torch.nn.functional.cross_entropy(o, test.labels, reduction="none") for o in out])


def test_metagradients_equal_central_finite_differences(tiny):
    train, test, model, trajectory = tiny
    magic = get_method("magic", AttributionTask(model), trajectory=trajectory).fit(train)
    assert magic.metasmoothness_ > 0.9  # tanh and small steps: a smooth training map
    meta = magic.metagradients(test)  # [5, 28]
    h = 1e-5
    for i in (0, 7, 26):  # examples in the first, a middle and the short last batch
        plus, minus = torch.ones(28, dtype=torch.float64), torch.ones(28, dtype=torch.float64)
        plus[i] += h
        minus[i] -= h
        losses = _final_losses(model, trajectory, train, test, torch.stack([plus, minus]))
        finite = (losses[0] - losses[1]) / (2 * h)
        torch.testing.assert_close(meta[:, i], finite, rtol=1e-4, atol=1e-9)


def test_checkpointed_reverse_pass_equals_the_stored_one(tiny):
    train, test, model, trajectory = tiny
    stored = get_method("magic", AttributionTask(model), trajectory=trajectory).fit(train).metagradients(test)
    method = get_method("magic", AttributionTask(model), trajectory=trajectory, checkpoint_every=5).fit(train)
    assert len(method.states_) < len(method.positions_)  # one state in five is kept
    torch.testing.assert_close(method.metagradients(test), stored, rtol=0, atol=1e-10)


def test_scores_predict_same_seed_removals(tiny):
    train, test, model, trajectory = tiny
    scores = get_method("magic", AttributionTask(model), trajectory=trajectory).fit(train).attribute(test).scores
    groups = [[0], [5, 9], [13], [20, 21], [27]]
    weights = torch.ones(len(groups) + 1, 28, dtype=torch.float64)
    for g, members in enumerate(groups):
        weights[g + 1, members] = 0
    losses = _final_losses(model, trajectory, train, test, weights)
    actual = (losses[1:] - losses[0]).flatten()  # the rise of each test loss when the group is removed
    predicted = torch.stack([scores[:, members].sum(1) for members in groups]).flatten().double()
    assert torch.corrcoef(torch.stack([actual, predicted]))[0, 1] > 0.99


def test_self_influence_is_each_examples_own_metagradient(tiny):
    train, _, model, trajectory = tiny
    method = get_method("magic", AttributionTask(model), trajectory=trajectory).fit(train)
    own = method.self_influence()
    full = -method.metagradients(train, method.task.train_loss)
    torch.testing.assert_close(own, torch.diagonal(full).float())
    assert (own > 0).float().mean() > 0.8  # up-weighting an example lowers its own loss


def test_magic_refuses_what_it_cannot_differentiate(tiny):
    _, _, model, trajectory = tiny
    with pytest.raises(TDAError, match="magic needs the run to differentiate: trajectory="):
        get_method("magic", AttributionTask(model))
    adam = Trajectory(trajectory.init_state, TrainConfig(optimizer="adam"), [])
    with pytest.raises(TDAError, match="optimizer='adam'. Supported: torch.optim.SGD"):
        get_method("magic", AttributionTask(model), trajectory=adam)


def test_relu_runs_warn_about_metasmoothness():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    trajectory = Trajectory(copy.deepcopy(model.state_dict()),
                            TrainConfig(epochs=30, batch_size=8, lr=0.5, optimizer="sgd"), [])
    with pytest.warns(UserWarning, match="metasmoothness"):
        get_method("magic", AttributionTask(model), trajectory=trajectory).fit(AttributionDataset(x, y))


def test_the_replayed_experiment_is_the_run_magic_differentiates_bit_for_bit():
    from tda_explorer.experiments import build_experiment

    original = build_experiment("mlp-gelu", n_train=120, n_test=10, epochs=3)
    exp = original.replayed()
    assert [c.step for c in exp.record.checkpoints] == [c.step for c in original.record.checkpoints]
    assert exp.record.checkpoints[-1].step == 3 * 2  # 120 examples in batches of 64: 2 steps per epoch
    magic = get_method("magic", exp.task(), trajectory=exp.trajectory()).fit(exp.split.train)
    for name, value in exp.record.model.state_dict().items():
        assert torch.equal(magic.final_[name], value), name


def test_same_seed_truth_is_the_run_itself_minus_the_subset(tmp_path):
    from tda_explorer.evaluate import lds
    from tda_explorer.experiments import build_experiment
    from tda_explorer.retraining import removal_ground_truth, truth_ceiling

    exp = build_experiment("mlp-gelu", n_train=120, n_test=10, epochs=3).replayed()
    same = removal_ground_truth(exp, n_subsets=6, fraction_removed=0.05, cache_dir=tmp_path)
    assert same.masks.shape == (6, 120) and (~same.masks).sum(1).eq(6).all()  # 5% of 120 dropped per subset
    again = removal_ground_truth(exp, n_subsets=6, fraction_removed=0.05, cache_dir=tmp_path)
    assert torch.equal(again.measurements, same.measurements)  # cached
    # one subset by hand: the replayed run with those weights zeroed, minus the full run
    weights = torch.stack([torch.ones(120), same.masks[2].float()])
    losses = _final_losses_of(exp, weights)
    torch.testing.assert_close(same.measurements[2], losses[1] - losses[0], rtol=1e-5, atol=1e-6)
    fresh = removal_ground_truth(exp, n_subsets=6, fraction_removed=0.05, same_seed=False, cache_dir=tmp_path)
    assert torch.equal(fresh.masks, same.masks) and not torch.allclose(fresh.measurements, same.measurements)
    assert -1 <= truth_ceiling(same, fresh) <= 1
    scores = get_method("magic", exp.task(), trajectory=exp.trajectory()).fit(exp.split.train).attribute(
        exp.split.test).scores
    assert lds(scores, same.masks, same.measurements)[0] > 0.8


def _final_losses_of(exp, weights):
    params = train_weighted(exp.factory, exp.split.train.inputs, exp.split.train.labels, weights, exp.config,
                            [exp.config.seed] * len(weights))
    out = stacked_outputs(exp.record.model, params, exp.split.test.inputs)
    return torch.stack([torch.nn.functional.cross_entropy(o, exp.split.test.labels, reduction="none") for o in out])


def _recorded_sgd(model, train, optimizer_factory, epochs=3, batch=8, seed=0):
    """A user's own loop with torch.optim and a schedule, recorded."""
    from tda_explorer.compute.training.run_recorder import RunRecorder

    optimizer = optimizer_factory(model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    recorder = RunRecorder(model, optimizer, train, batch_size=batch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(train), batch):
            rows = order[start : start + batch]
            optimizer.zero_grad()
            recorder.loss(model(train.inputs[rows]), rows).backward()
            recorder.step(rows)
        schedule.step()
    return recorder.finish()


@pytest.mark.parametrize("nesterov", [False, True])
def test_metagradients_of_a_recorded_momentum_run_equal_finite_differences(tiny, nesterov):
    train, test, model, _ = tiny
    model = copy.deepcopy(model)
    init = copy.deepcopy(model.state_dict())
    recorder = _recorded_sgd(model, train, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=nesterov,
                                                                     weight_decay=1e-2, dampening=0.0))
    task = AttributionTask(copy.deepcopy(model))
    magic = get_method("magic", task, recording=recorder).fit(train)
    assert all(torch.equal(magic.final_[k], recorder.final_state[k]) for k in magic.final_)
    meta = magic.metagradients(test)
    h = 1e-5
    for i in (2, 19):
        losses = []
        for sign in (1, -1):
            w = torch.ones(len(train), dtype=torch.float64)
            w[i] += sign * h
            state = recorder.replay(weights=w)
            replayed = copy.deepcopy(model)
            replayed.load_state_dict(state)
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(replayed(test.inputs), test.labels, reduction="none"))
        torch.testing.assert_close(meta[:, i], (losses[0] - losses[1]) / (2 * h), rtol=1e-4, atol=1e-9)
    checkpointed = get_method("magic", task, recording=recorder, checkpoint_every=4).fit(train)
    torch.testing.assert_close(checkpointed.metagradients(test), meta, rtol=0, atol=1e-10)
    model.load_state_dict(init)


def test_magic_refuses_recorded_runs_it_cannot_differentiate(tiny):
    train, _, model, _ = tiny
    adam = _recorded_sgd(copy.deepcopy(model), train, lambda p: torch.optim.Adam(p, lr=1e-2), epochs=1)
    with pytest.raises(TDAError, match="this run used Adam. Supported: torch.optim.SGD"):
        get_method("magic", AttributionTask(model), recording=adam)
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3)).double()
    recorded = _recorded_sgd(dropout, train, lambda p: torch.optim.SGD(p, lr=0.1), epochs=1)
    with pytest.raises(TDAError, match="trained with Dropout active"):
        get_method("magic", AttributionTask(dropout), recording=recorded)
