"""TracIn on runs that were not plain SGD: the Adam direction against hand-written Adam, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute import Checkpoint, TracIn
from tda_explorer.compute.engine.projection import RandomProjector
from tda_explorer.data import AttributionDataset

BETAS, EPS = (0.8, 0.95), 1e-3


def flat_grad(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    model.zero_grad()
    nn.functional.cross_entropy(model(x[None]), y[None]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def hand_adam_run(model: nn.Module, train: AttributionDataset, steps: int, lr: float) -> list[Checkpoint]:
    """Adam written out (no torch.optim) on batches of 5, a checkpoint with its moments after every second step."""
    b1, b2 = BETAS
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    checkpoints = []
    for t in range(1, steps + 1):
        rows = torch.arange(5 * (t - 1), 5 * t) % len(train)
        model.load_state_dict(params)
        model.zero_grad()
        nn.functional.cross_entropy(model(train.inputs[rows]), train.labels[rows]).backward()
        for n, p in model.named_parameters():
            m[n] = b1 * m[n] + (1 - b1) * p.grad
            v[n] = b2 * v[n] + (1 - b2) * p.grad**2
            params[n] = params[n] - lr * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + EPS)
        if t % 2 == 0:
            state = {"exp_avg": {n: x.clone() for n, x in m.items()},
                     "exp_avg_sq": {n: x.clone() for n, x in v.items()}, "step": t, "betas": BETAS, "eps": EPS}
            checkpoints.append(Checkpoint({n: x.clone() for n, x in params.items()}, lr * (1 + t / 10), t,
                                          optimizer="adam", optimizer_state=state))
    return checkpoints


def hand_direction(g: torch.Tensor, checkpoint: Checkpoint, names: list[str]) -> torch.Tensor:
    """m̂′/(√v̂′ + ε) of one more hand-written Adam step taken with g alone."""
    b1, b2 = BETAS
    s = checkpoint.optimizer_state
    m = torch.cat([s["exp_avg"][n].flatten() for n in names])
    v = torch.cat([s["exp_avg_sq"][n].flatten() for n in names])
    t = s["step"] + 1
    m_next, v_next = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    return (m_next / (1 - b1**t)) / ((v_next / (1 - b2**t)).sqrt() + EPS)


@pytest.fixture
def adam_run(tiny_mlp, tiny_data):
    train, _ = tiny_data
    return hand_adam_run(tiny_mlp, train, steps=6, lr=0.05)


def test_tracin_on_adam_checkpoints_equals_the_hand_adam_direction(tiny_mlp, tiny_data, adam_run):
    train, test = tiny_data
    method = TracIn(AttributionTask(tiny_mlp, checkpoints=adam_run)).fit(train)
    got = method.attribute(test).scores.double()
    probe = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    names = [n for n, _ in probe.named_parameters()]
    want = torch.zeros(len(test), len(train), dtype=torch.float64)
    self_want = torch.zeros(len(train), dtype=torch.float64)
    for c in adam_run:
        g_train = torch.stack([flat_grad(probe, c.state_dict, train.inputs[i], train.labels[i])
                               for i in range(len(train))])
        g_test = torch.stack([flat_grad(probe, c.state_dict, test.inputs[j], test.labels[j])
                              for j in range(len(test))])
        direction = torch.stack([hand_direction(g, c, names) for g in g_train])
        want += c.learning_rate * g_test @ direction.T
        self_want += c.learning_rate * (g_train * direction).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(method.self_influence().double(), self_want, rtol=1e-5, atol=1e-7)
    # the SGD reading of the same checkpoints is a different score: the direction is not the gradient
    sgd = [Checkpoint(c.state_dict, c.learning_rate, c.step) for c in adam_run]
    plain = TracIn(AttributionTask(tiny_mlp, checkpoints=sgd)).fit(train).attribute(test).scores.double()
    assert not torch.allclose(plain, got, rtol=1e-2)
    config = method.config()
    assert config["optimizers"] == ["adam"] * 3 and "adam-preconditioned" in config["training_direction"]
    assert "training_direction" not in TracIn(AttributionTask(tiny_mlp, checkpoints=sgd)).config()


def test_the_adam_direction_is_torch_adams_own_step(tiny_mlp, tiny_data, adam_run):
    """Γ(g) at a checkpoint equals what torch.optim.Adam holding the checkpoint's moments does with g (per unit lr)."""
    train, _ = tiny_data
    c = adam_run[-1]
    method = TracIn(AttributionTask(tiny_mlp, checkpoints=[c])).fit(train)
    for i in (0, 7):
        probe = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        g = flat_grad(probe, c.state_dict, train.inputs[i], train.labels[i])
        params = [p.detach().clone() for p in probe.parameters()]
        adam = torch.optim.Adam(params, lr=1.0, betas=BETAS, eps=EPS)
        offset = 0
        for (name, _), p in zip(probe.named_parameters(), params):
            adam.state[p] = {"step": torch.tensor(float(c.optimizer_state["step"])),
                             "exp_avg": c.optimizer_state["exp_avg"][name].clone(),
                             "exp_avg_sq": c.optimizer_state["exp_avg_sq"][name].clone()}
            p.grad = g[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        before = torch.cat([p.flatten() for p in params])
        adam.step()
        after = torch.cat([p.flatten() for p in params])
        torch.testing.assert_close(method.train_grads_[0][i].double(), before - after, rtol=1e-6, atol=1e-9)


def test_adam_direction_is_formed_before_the_projection(tiny_mlp, tiny_data, adam_run):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, checkpoints=adam_run)
    exact = TracIn(task).fit(train)
    projected = TracIn(task, projection_dim=16, projection_seed=4).fit(train)
    n_params = sum(p.numel() for p in tiny_mlp.parameters())
    matrix = RandomProjector(n_params, 16, "rademacher", 4)._matrix().double()
    for g_exact, g_projected in zip(exact.train_grads_, projected.train_grads_):
        torch.testing.assert_close(g_projected.double(), g_exact.double() @ matrix, rtol=1e-4, atol=1e-5)
    assert projected.attribute(test).scores.shape == (len(test), len(train))
    torch.testing.assert_close(projected.self_influence(), projected.attribute(train).scores.diagonal(),
                               rtol=1e-4, atol=1e-5)


def test_adam_features_are_stored_under_their_moments(tiny_mlp, tiny_data, adam_run, tmp_path):
    # the store keeps float32, so the run is in float32 here
    tiny_mlp = tiny_mlp.float()
    train, test = (AttributionDataset(d.inputs.float(), d.labels) for d in tiny_data)

    def single(x):
        return {n: t.float() for n, t in x.items()}

    adam_run = [Checkpoint(single(c.state_dict), c.learning_rate, c.step, "adam",
                           {**c.optimizer_state, "exp_avg": single(c.optimizer_state["exp_avg"]),
                            "exp_avg_sq": single(c.optimizer_state["exp_avg_sq"])}) for c in adam_run]
    first = TracIn(AttributionTask(tiny_mlp, checkpoints=adam_run), store=tmp_path).fit(train)
    again = TracIn(AttributionTask(tiny_mlp, checkpoints=adam_run), store=tmp_path).fit(train)
    assert (first.store.misses, again.store.hits, again.store.misses) == (3, 3, 0)
    torch.testing.assert_close(again.attribute(test).scores, first.attribute(test).scores)
    moved = [Checkpoint(c.state_dict, c.learning_rate, c.step, "adam",
                        {**c.optimizer_state, "exp_avg": {n: 2 * m for n, m in c.optimizer_state["exp_avg"].items()}})
             for c in adam_run]
    other = TracIn(AttributionTask(tiny_mlp, checkpoints=moved), store=tmp_path).fit(train)
    assert (other.store.hits, other.store.misses) == (0, 3)
    fresh = TracIn(AttributionTask(tiny_mlp, checkpoints=moved)).fit(train)
    torch.testing.assert_close(other.attribute(test).scores, fresh.attribute(test).scores)
    assert not torch.allclose(other.attribute(test).scores, first.attribute(test).scores)


def test_adam_without_moments_and_unknown_optimizers_are_refused(tiny_mlp, adam_run):
    state = adam_run[0].state_dict
    for kind in ("adam", "adamw", "AdamW"):
        with pytest.raises(TDAError, match=r"checkpoints\[0\] comes from an '(adam|adamw)' run but carries no "
                                           r"optimizer_state.*will not treat the run as SGD.*RecordingCallback"):
            TracIn(AttributionTask(tiny_mlp, checkpoints=[Checkpoint(state, 0.1, 5, optimizer=kind)]))
    with pytest.raises(TDAError, match=r"optimizer 'adagrad'.*'sgd', 'adam' and 'adamw' only"):
        TracIn(AttributionTask(tiny_mlp, checkpoints=[Checkpoint(state, 0.1, 5, optimizer="adagrad")]))
    # one Adam checkpoint without moments among good ones is named by position
    bare = Checkpoint(state, 0.1, 7, optimizer="adam")
    with pytest.raises(TDAError, match=r"checkpoints\[1\]"):
        get_method("tracin", AttributionTask(tiny_mlp, checkpoints=[adam_run[0], bare]))


def test_bad_adam_states_are_refused(tiny_mlp, adam_run):
    c = adam_run[0]
    s = c.optimizer_state

    def task(state):
        return AttributionTask(tiny_mlp, checkpoints=[Checkpoint(c.state_dict, 0.1, 2, "adam", state)])

    with pytest.raises(TDAError, match="must hold exp_avg, exp_avg_sq, step, betas and eps"):
        TracIn(task({"exp_avg": s["exp_avg"]}))
    missing = {**s, "exp_avg_sq": {n: t for n, t in s["exp_avg_sq"].items() if n != "2.bias"}}
    with pytest.raises(TDAError, match=r"exp_avg_sq'\] has no moment for parameter '2.bias'"):
        TracIn(task(missing))
    wrong = {**s, "exp_avg": {**s["exp_avg"], "0.weight": torch.zeros(3)}}
    with pytest.raises(TDAError, match=r"exp_avg'\]\['0.weight'\] has shape \(3,\), the parameter \(5, 4\)"):
        TracIn(task(wrong))
    with pytest.raises(TDAError, match="betas must lie in"):
        TracIn(task({**s, "betas": (1.0, 0.9)}))
    with pytest.raises(TDAError, match="projection_kind='logra'.*Adam's elementwise direction"):
        TracIn(task(s), projection_kind="logra", projection_dim=2)
    with pytest.raises(TDAError, match="optimizer must name the optimizer's kind"):
        Checkpoint(c.state_dict, 0.1, 2, optimizer=None)
    with pytest.raises(TDAError, match="optimizer_state must be a dict"):
        Checkpoint(c.state_dict, 0.1, 2, "adam", [1, 2])


def test_sgd_checkpoints_keep_their_old_construction(tiny_mlp):
    c = Checkpoint(tiny_mlp.state_dict(), 0.3, 4)
    assert (c.optimizer, c.optimizer_state) == ("sgd", None)
