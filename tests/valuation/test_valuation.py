"""LAVA (optimal-transport data valuation) and LESS (targeted data selection) against independent computations.

LAVA: the dual potential comes from a log-domain Sinkhorn written here, the label distances from an exact assignment
(scipy), so neither reference goes through POT. LESS: per-example gradients from a loop of ``torch.autograd.grad``
and the Adam direction from a real ``torch.optim.Adam`` step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.selection.less import LESS, AdamCheckpoint, WarmupConfig, select, warmup
from tda_explorer.compute.valuation.lava import LAVA, label_distances, penultimate_features
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.digits import load_digits_split
from tda_explorer.data.planted import load_planted_pool
from tda_explorer.evaluate.metrics import mislabel_auc

# --------------------------------------------------------------------------------------------------------------------
# LAVA helpers
# --------------------------------------------------------------------------------------------------------------------

CENTRES = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0]])


def _clouds(counts: list[int], seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clouds around CENTRES, ``counts[c]`` points of class c."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([CENTRES[c] + spread * rng.standard_normal((n, 3)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return x, y


def _dataset(x, y, name: str = "data", ids=None, class_names=None) -> AttributionDataset:
    return AttributionDataset(torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y)),
                              ids, class_names, None, name)


def _lava_pair(flip: tuple[int, ...] = (0, 13, 21)) -> tuple[AttributionDataset, AttributionDataset]:
    """Imbalanced training classes (12/8/6) with a few flipped labels, balanced validation (5/5/5)."""
    tx, ty = _clouds([12, 8, 6], seed=1, spread=0.7)
    ty = ty.copy()
    for i in flip:
        ty[i] = (ty[i] + 1) % 3
    vx, vy = _clouds([5, 5, 5], seed=2, spread=0.7)
    return (_dataset(tx, ty, "train", ids=[f"z{i}" for i in range(len(ty))], class_names=["a", "b", "c"]),
            _dataset(vx, vy, "validation", class_names=["a", "b", "c"]))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _exact_ot_uniform(xa: np.ndarray, xb: np.ndarray) -> float:
    """Exact OT cost between two uniform clouds (squared Euclidean cost), without POT: replicate both clouds to
    the same size (lcm) and solve the assignment problem, optimal among couplings by Birkhoff's theorem."""
    size = math.lcm(len(xa), len(xb))
    a, b = np.repeat(xa, size // len(xa), axis=0), np.repeat(xb, size // len(xb), axis=0)
    cost = _sqdist(a, b)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def _sinkhorn_f(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, tol: float = 1e-13) -> np.ndarray:
    """Training-side dual potential f of entropic OT (log-domain Sinkhorn, written here)."""
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(200_000):
        f = eps * np.log(a) - eps * logsumexp((g[None, :] - cost) / eps, axis=1)
        g = eps * np.log(b) - eps * logsumexp((f[:, None] - cost) / eps, axis=0)
        plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
        if np.abs(plan.sum(1) - a).max() < tol:
            return f
    raise AssertionError("reference Sinkhorn did not converge")


def _reference_calibrated(train: AttributionDataset, validation: AttributionDataset, lam: float, eps: float,
                          class_balanced: bool = True) -> np.ndarray:
    """LAVA's calibrated gradient from scratch: scaled feature cost + λ·W(y, y'), class-balanced validation mass."""
    tx, vx = train.inputs.double().numpy(), validation.inputs.double().numpy()
    ty, vy = train.labels.numpy(), validation.labels.numpy()
    feature = _sqdist(tx, vx)
    scale = feature.mean()
    classes = sorted(set(ty.tolist()))
    W = np.array([[_exact_ot_uniform(tx[ty == c], vx[vy == d]) / scale for d in classes] for c in classes])
    cost = feature / scale + lam * W[np.searchsorted(classes, ty)][:, np.searchsorted(classes, vy)]
    n, m = cost.shape
    a = np.full(n, 1 / n)
    if class_balanced:
        b = np.array([np.mean(ty == c) / np.sum(vy == c) for c in vy])
    else:
        b = np.full(m, 1 / m)
    f = _sinkhorn_f(a, b, cost, eps)
    return f - (f.sum() - f) / (n - 1)


# --------------------------------------------------------------------------------------------------------------------
# LAVA
# --------------------------------------------------------------------------------------------------------------------


def test_lava_calibrated_gradient_equals_an_independent_sinkhorn_potential():
    train, validation = _lava_pair()
    lava = LAVA(features=lambda x: x, lambda_label=1.0, epsilon=0.1).fit(train, validation)
    assert lava.converged_
    expected = _reference_calibrated(train, validation, lam=1.0, eps=0.1)
    np.testing.assert_allclose(lava.calibrated_gradient_.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(lava.values_.numpy(), -expected, atol=1e-5)
    # the reference is sensitive to the validation weighting: a uniform validation measure gives other values
    uniform = _reference_calibrated(train, validation, lam=1.0, eps=0.1, class_balanced=False)
    assert np.abs(uniform - expected).max() > 1e-2
    # the label distances the cost used are reported with class names, on the scaled features
    assert list(lava.label_distances_.index) == ["a", "b", "c"] == list(lava.label_distances_.columns)
    assert not LAVA(features=lambda x: x, max_iter=1).fit(train, validation).converged_


def test_lava_values_sum_to_zero_rank_like_the_potential_and_are_scale_free():
    train, validation = _lava_pair()
    lava = LAVA(features=lambda x: x).fit(train, validation)
    values = lava.values_.double()
    assert abs(float(values.sum())) < 1e-9 * float(values.abs().sum())  # Σ_i s_i = F − (nF − F)/(n − 1) = 0
    # s_i = f_i·N/(N−1) − F/(N−1): the values rank as −f, f from the reference Sinkhorn
    f = _reference_calibrated(train, validation, lam=1.0, eps=0.1)  # calibrated = affine in f, slope N/(N−1) > 0
    assert torch.argsort(values).tolist() == np.argsort(-f, kind="stable").tolist()
    assert set(torch.argsort(values)[:3].tolist()) == {0, 13, 21}  # the flipped labels are the least valuable
    # features multiplied by 7 and shifted: the mean-distance scaling makes the values identical
    moved = LAVA(features=lambda x: 7 * x + 3).fit(train, validation)
    torch.testing.assert_close(moved.values_, lava.values_, atol=1e-6, rtol=0)


def test_label_distances_equal_exact_transport_and_separate_clusters():
    tx, ty = _clouds([6, 4, 3], seed=3)
    vx, vy = _clouds([4, 6, 2], seed=4)
    W = label_distances(tx, ty, vx, vy, [0, 1, 2])
    expected = np.array([[_exact_ot_uniform(tx[ty == c], vx[vy == d]) for d in range(3)] for c in range(3)])
    np.testing.assert_allclose(W, expected, rtol=1e-9, atol=1e-9)
    off = W + np.diag(np.full(3, np.inf))
    assert (np.diag(W) < off.min(0)).all() and (np.diag(W) < off.min(1)).all()
    # a class cloud against itself is at distance zero; the order of ``classes`` permutes W
    assert np.allclose(np.diag(label_distances(tx, ty, tx, ty, [0, 1, 2])), 0, atol=1e-12)
    np.testing.assert_allclose(label_distances(tx, ty, vx, vy, [2, 0, 1]), W[[2, 0, 1]][:, [2, 0, 1]], atol=1e-12)


def test_lava_finds_flipped_digits_only_with_the_label_term():
    split = load_digits_split(n_train=500, n_test=300, noise=0.1, seed=0)
    full = LAVA(features=lambda x: x).fit(split.train, split.test)
    ablation = LAVA(features=lambda x: x, lambda_label=0).fit(split.train, split.test)
    assert mislabel_auc(-full.values_, split.flipped) > 0.9
    assert mislabel_auc(-ablation.values_, split.flipped) < 0.7
    assert np.allclose(ablation.label_distances_.to_numpy(), 0)


def test_penultimate_features_are_the_hidden_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    model.train()
    x = torch.randn(11, 4, dtype=torch.float64)
    embed = penultimate_features(model, batch_size=4)  # three batches, concatenated
    got = embed(x)
    expected = torch.relu(x @ model[0].weight.detach().T + model[0].bias.detach())
    assert got.shape == (11, 6)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert model.training and not model[2]._forward_hooks  # mode restored, hook removed
    with pytest.raises(TDAError, match="no nn.Linear"):
        penultimate_features(nn.Sequential(nn.ReLU()))
    # LAVA(model=...) values on that embedding
    train, validation = _lava_pair()
    model4 = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    by_model = LAVA(model=model4).fit(train, validation)
    hidden = lambda inputs: torch.relu(inputs @ model4[0].weight.detach().T + model4[0].bias.detach())
    by_hand = LAVA(features=hidden).fit(train, validation)
    torch.testing.assert_close(by_model.values_, by_hand.values_, atol=1e-9, rtol=0)


def test_lava_refuses_mismatched_classes_bad_features_and_missing_embedding():
    train, validation = _lava_pair()
    no_c = validation.subset([i for i in range(len(validation)) if validation.labels[i] != 2])
    with pytest.raises(TDAError, match=r"training classes without validation examples: c\b"):
        LAVA(features=lambda x: x).fit(train, no_c)
    train_no_b = train.subset([i for i in range(len(train)) if train.labels[i] != 1])
    with pytest.raises(TDAError, match=r"validation classes without training examples: b\b"):
        LAVA(features=lambda x: x).fit(train_no_b, validation)
    with pytest.raises(TDAError, match="features must map train's 26 inputs"):
        LAVA(features=lambda x: x[:-1]).fit(train, validation)
    with pytest.raises(TDAError, match="features must map"):
        LAVA(features=lambda x: x.flatten()).fit(train, validation)
    nan_on_validation = lambda x: x if len(x) == len(train) else x * float("nan")
    with pytest.raises(TDAError, match="features of validation contain NaN"):
        LAVA(features=nan_on_validation).fit(train, validation)
    with pytest.raises(TDAError, match="not fitted"):
        LAVA(features=lambda x: x).to_dataframe()
    with pytest.raises(TDAError, match="features=callable.*model="):
        LAVA()
    with pytest.raises(TDAError, match="features must be a callable"):
        LAVA(features=3)
    with pytest.raises(TDAError, match="epsilon"):
        LAVA(features=lambda x: x, epsilon=0)
    with pytest.raises(TDAError, match="lambda_label"):
        LAVA(features=lambda x: x, lambda_label=-1)
    with pytest.raises(TDAError, match="validation must be an AttributionDataset"):
        LAVA(features=lambda x: x).fit(train, validation.inputs)


def test_lava_dataframe_puts_the_least_valuable_first():
    train, validation = _lava_pair()
    lava = LAVA(features=lambda x: x).fit(train, validation)
    df = lava.to_dataframe()
    assert list(df.columns) == ["rank", "train_id", "label", "value"]
    assert df["rank"].tolist() == list(range(1, len(train) + 1))
    assert df["value"].is_monotonic_increasing
    assert sorted(df["train_id"]) == sorted(train.ids)
    for row in df.itertuples():
        i = train.positions(row.train_id)[0]
        assert row.label == int(train.labels[i]) and row.value == pytest.approx(float(lava.values_[i]))
    assert set(df["train_id"][:3]) == {"z0", "z13", "z21"}  # the flipped labels


# --------------------------------------------------------------------------------------------------------------------
# LESS helpers
# --------------------------------------------------------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _checkpoint(model: nn.Module, seed: int, lr: float, step: int = 5) -> AdamCheckpoint:
    """A checkpoint away from ``model``'s own parameters, with nonzero moments."""
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    params = {k: (p.detach() + 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype)) for k, p in named.items()}
    m = {k: 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in named.items()}
    v = {k: 0.01 * torch.rand(p.shape, generator=gen, dtype=p.dtype) + 1e-4 for k, p in named.items()}
    return AdamCheckpoint(params, m, v, step=step, lr=lr, betas=(0.9, 0.99), eps=1e-6)


def _reference_scores(model: nn.Module, checkpoint: AdamCheckpoint, pool: AttributionDataset,
                      target: AttributionDataset, subtasks: list, aggregation: str) -> torch.Tensor:
    """Σ-free single-checkpoint LESS score ``[n_pool, J]`` by a per-example autograd loop (no projection)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(checkpoint.params[name])
    params = [p for _, p in ref.named_parameters()]
    names = [n for n, _ in ref.named_parameters()]

    def grad_of(x, y):
        loss = nn.functional.cross_entropy(ref(x[None]), y[None])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    b1, b2 = checkpoint.betas
    t = checkpoint.step + 1
    m = torch.cat([checkpoint.exp_avg[k].reshape(-1) for k in names])
    v = torch.cat([checkpoint.exp_avg_sq[k].reshape(-1) for k in names])
    pool_dirs = []
    for x, y in zip(pool.inputs, pool.labels):
        g = grad_of(x, y)
        m_hat = (b1 * m + (1 - b1) * g) / (1 - b1**t)
        v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2**t)
        pool_dirs.append(m_hat / (v_hat.sqrt() + checkpoint.eps))
    pool_dirs = torch.stack(pool_dirs)
    target_grads = torch.stack([grad_of(x, y) for x, y in zip(target.inputs, target.labels)])
    columns = []
    for s in dict.fromkeys(subtasks):
        rows = target_grads[[i for i, t_ in enumerate(subtasks) if t_ == s]]
        if aggregation == "mean-cosine":
            cos = nn.functional.cosine_similarity(pool_dirs[:, None, :], rows[None, :, :], dim=-1)
            columns.append(cos.mean(1))
        else:  # the mean of the *unit* target gradients, as implemented; the paper's raw mean differs (up to 0.15 here)
            unit_mean = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
            columns.append(nn.functional.cosine_similarity(pool_dirs, unit_mean[None], dim=-1))
    return torch.stack(columns, 1)


# --------------------------------------------------------------------------------------------------------------------
# LESS: Adam checkpoints
# --------------------------------------------------------------------------------------------------------------------


def test_adam_direction_is_the_bias_corrected_update_by_hand():
    m, v = torch.tensor([[0.2, -0.1, 0.0]], dtype=torch.float64), torch.tensor([[0.04, 0.01, 0.0]], dtype=torch.float64)
    cp = AdamCheckpoint({"w": torch.zeros(1, 3)}, {"w": m}, {"w": v}, step=2, lr=1.0, betas=(0.8, 0.9), eps=0.01)
    g = torch.tensor([[1.0, 2.0, -3.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    got = cp.adam_direction(g, ["w"])
    expected = torch.empty_like(g)
    for r in range(2):
        for c in range(3):
            m1 = (0.8 * float(m[0, c]) + 0.2 * float(g[r, c])) / (1 - 0.8**3)
            v1 = (0.9 * float(v[0, c]) + 0.1 * float(g[r, c]) ** 2) / (1 - 0.9**3)
            expected[r, c] = m1 / (math.sqrt(v1) + 0.01)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # at step 0 (no history) the direction is g / (|g| + ε): sign-like
    fresh = AdamCheckpoint({"w": torch.zeros(3)}, {"w": torch.zeros(3)}, {"w": torch.zeros(3)}, step=0, lr=1.0)
    torch.testing.assert_close(fresh.adam_direction(g, ["w"]), g / (g.abs() + 1e-8))


@pytest.mark.parametrize("optimizer_class", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_checkpoint_captures_the_optimizer_and_predicts_its_next_step(optimizer_class):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    opt = optimizer_class(model.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    cp = AdamCheckpoint.capture(model, opt, lr=0.05)
    names = [n for n, _ in model.named_parameters()]
    assert list(cp.params) == names and cp.step == 3 and cp.betas == (0.8, 0.95) and cp.eps == 1e-3 and cp.lr == 0.05
    for name, p in model.named_parameters():
        torch.testing.assert_close(cp.exp_avg[name], opt.state[p]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(cp.exp_avg_sq[name], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)
        torch.testing.assert_close(cp.params[name], p.detach(), rtol=0, atol=0)
    # one more optimizer step with a chosen gradient g moves the parameters by −lr·Γ(g)
    g = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    offset = 0
    for p in model.parameters():
        p.grad = g[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(cp.adam_direction(g[None], names)[0], (before - after) / 0.05, rtol=1e-9, atol=1e-9)
    # the capture is a snapshot: the step just taken did not change it
    assert not torch.equal(cp.params[names[0]], dict(model.named_parameters())[names[0]].detach())
    # a prefix subset
    sub = AdamCheckpoint.capture(model, opt, lr=0.01, parameters=["2"])
    assert list(sub.params) == ["2.weight", "2.bias"] and sub.step == 4


def test_adam_checkpoint_capture_refuses_sgd_and_missing_state():
    model = _tiny_model()
    with pytest.raises(TDAError, match="optimizer must be torch.optim.Adam or AdamW.*SGD"):
        AdamCheckpoint.capture(model, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(TDAError, match="no Adam state for parameter '0.weight'"):
        AdamCheckpoint.capture(model, torch.optim.Adam(model.parameters()), lr=0.1)


# --------------------------------------------------------------------------------------------------------------------
# LESS: scores
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["mean-cosine", "mean-gradient"])
def test_less_scores_equal_per_example_adam_cosines(tiny_data, aggregation):
    pool, target = tiny_data
    model = _tiny_model()
    cp = _checkpoint(model, seed=3, lr=1.0)
    subtasks = ["x", "y", "x", "z", "y", "x", "z", "z", "x", "y"]
    less = LESS(model, [cp], projection_dim=None, subtask_aggregation=aggregation).fit(pool)
    total, names = less.subtask_scores(target, subtasks)
    assert names == ["x", "y", "z"] and total.shape == (len(pool), 3)
    expected = _reference_scores(model, cp, pool, target, subtasks, aggregation)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.05  # the scores are not a constant the comparison could pass by accident
    # the model's own parameters are not used: its state is untouched and the default single subtask is one column
    all_in_one, one = less.subtask_scores(target)
    assert one == ["all"]
    torch.testing.assert_close(all_in_one, _reference_scores(model, cp, pool, target, ["all"] * 10, aggregation),
                               rtol=0, atol=1e-5)
    table = less.score(target, subtasks)
    assert list(table.columns) == ["train_id", "score", "best_subtask"] and table["train_id"].tolist() == pool.ids
    np.testing.assert_allclose(table["score"], expected.max(1).values.numpy(), atol=1e-5)
    assert table["best_subtask"].tolist() == [names[j] for j in expected.argmax(1).tolist()]


def test_less_weights_checkpoints_by_their_mean_learning_rate(tiny_data):
    pool, target = tiny_data
    model = _tiny_model()
    cp1, cp2 = _checkpoint(model, seed=4, lr=3.0, step=2), _checkpoint(model, seed=5, lr=1.0, step=9)
    subtasks = target.labels.tolist()
    total, _ = LESS(model, [cp1, cp2], projection_dim=None).fit(pool).subtask_scores(target, subtasks)
    s1 = _reference_scores(model, cp1, pool, target, subtasks, "mean-cosine")
    s2 = _reference_scores(model, cp2, pool, target, subtasks, "mean-cosine")
    assert (s1 - s2).abs().max() > 0.1
    torch.testing.assert_close(total, 0.75 * s1 + 0.25 * s2, rtol=0, atol=1e-5)


def test_less_projection_keeps_the_ranking():
    split = load_digits_split(n_train=80, n_test=10, seed=3)
    model = make_model("mlp", 64, 10, hidden=32, seed=0)  # 2,410 parameters
    cp = AdamCheckpoint.capture(*_adam_steps(model, split.train), lr=0.01)
    exact, _ = LESS(model, [cp], projection_dim=None).fit(split.train).subtask_scores(split.test)
    projected, _ = LESS(model, [cp], projection_dim=1024).fit(split.train).subtask_scores(split.test)
    again, _ = LESS(model, [cp], projection_dim=1024).fit(split.train).subtask_scores(split.test)
    torch.testing.assert_close(projected, again)  # seeded
    assert not torch.allclose(projected, exact, atol=1e-4)  # really projected
    assert torch.corrcoef(torch.stack([exact[:, 0], projected[:, 0]]))[0, 1] > 0.9
    # a projection at least as wide as the parameters is the exact computation
    wide, _ = LESS(model, [cp], projection_dim=5000).fit(split.train).subtask_scores(split.test)
    torch.testing.assert_close(wide, exact)


def _adam_steps(model: nn.Module, data: AttributionDataset, steps: int = 3):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.inputs), data.labels).backward()
        opt.step()
    return model, opt


# --------------------------------------------------------------------------------------------------------------------
# LESS: selection
# --------------------------------------------------------------------------------------------------------------------


def _fitted_with_scores(monkeypatch, scores: torch.Tensor, names: list) -> tuple[LESS, AttributionDataset]:
    """A fitted LESS whose subtask scores are ``scores`` (the allocation is tested on its own)."""
    gen = torch.Generator().manual_seed(0)
    pool = AttributionDataset(torch.randn(len(scores), 4, generator=gen, dtype=torch.float64),
                              torch.arange(len(scores)) % 3, [f"p{i}" for i in range(len(scores))], name="pool")
    model = _tiny_model()
    less = LESS(model, [_checkpoint(model, seed=0, lr=1.0)], projection_dim=None).fit(pool)
    monkeypatch.setattr(less, "subtask_scores", lambda target, subtasks=None: (scores.double(), list(names)))
    return less, pool


def test_select_per_subtask_shares_the_budget_and_max_takes_the_top(monkeypatch):
    n = 20
    a = torch.linspace(10, 9, n)  # subtask a: every score above b's; its ranking is 0, 1, 2, ...
    b = torch.linspace(0, 1, n)  # subtask b: ranking 19, 18, ...
    b[0] = 5.0  # ... except that example 0 is b's top as well: it must not be taken twice
    less, pool = _fitted_with_scores(monkeypatch, torch.stack([a, b], 1), ["a", "b"])
    per = less.select(pool, fraction=0.3)  # k = 6, three turns each
    assert per["train_id"].tolist() == ["p0", "p19", "p1", "p18", "p2", "p17"]
    assert per["rank"].tolist() == list(range(1, 7))
    assert per["best_subtask"].tolist() == ["a"] * 6  # the max-over-subtasks score and its subtask are reported
    np.testing.assert_allclose(per["score"], a[[0, 19, 1, 18, 2, 17]].double().numpy())
    assert per["label"].tolist() == [int(pool.labels[i]) for i in (0, 19, 1, 18, 2, 17)]
    top = less.select(pool, fraction=0.3, allocation="max")
    assert top["train_id"].tolist() == [f"p{i}" for i in range(6)]


def test_select_per_subtask_against_an_independent_round_robin(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    n, J = 40, 4
    scores = torch.rand(n, J, generator=gen) + torch.tensor([3.0, 2.0, 1.0, 0.0])  # subtask 0 dominates the max
    less, pool = _fitted_with_scores(monkeypatch, scores, ["s0", "s1", "s2", "s3"])
    k = 12
    per = less.select(pool, fraction=k / n)
    chosen = [pool.positions(i)[0] for i in per["train_id"]]
    assert len(chosen) == k == len(set(chosen))
    rankings = [list(np.argsort(-scores[:, j].numpy(), kind="stable")) for j in range(J)]
    expected, taken = [], set()
    for turn in range(k):
        pick = next(i for i in rankings[turn % J] if i not in taken)
        expected.append(int(pick))
        taken.add(int(pick))
    assert chosen == expected
    # each subtask's turns hold its own best examples: the budget divides evenly, k / J each
    for j in range(J):
        assert chosen[j::J] == expected[j::J] and len(chosen[j::J]) == k // J
    top = less.select(pool, fraction=k / n, allocation="max")
    assert [pool.positions(i)[0] for i in top["train_id"]] == np.argsort(-scores.max(1).values.numpy())[:k].tolist()
    assert set(pool.positions(top["train_id"].tolist())) <= set(range(n))
    # the whole pool, each example once
    everything = less.select(pool, fraction=1.0)
    assert sorted(everything["train_id"]) == sorted(pool.ids)


# --------------------------------------------------------------------------------------------------------------------
# LESS: warmup
# --------------------------------------------------------------------------------------------------------------------


def _small_pool(n: int = 200) -> AttributionDataset:
    return load_digits_split(n_train=n, n_test=10, seed=1).train


def test_warmup_leaves_the_model_alone_and_decays_the_lr_linearly():
    pool = _small_pool()
    model = make_model("mlp", 64, 10, hidden=16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = WarmupConfig(fraction=0.2, epochs=3, lr=0.01, batch_size=8, seed=4)
    warmed, checkpoints, positions = warmup(model, pool, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert len(positions) == 40 == len(set(positions)) and all(0 <= i < len(pool) for i in positions)
    assert len(checkpoints) == 3
    steps, total = 5, 15  # 40 examples in batches of 8, three epochs
    assert [c.step for c in checkpoints] == [5, 10, 15]
    expected_lrs = [0.01 * np.mean([1 - s / total for s in range(e * steps, (e + 1) * steps)]) for e in range(3)]
    np.testing.assert_allclose([c.lr for c in checkpoints], expected_lrs, rtol=1e-12)
    assert checkpoints[0].lr > checkpoints[1].lr > checkpoints[2].lr
    for name, p in warmed.named_parameters():
        torch.testing.assert_close(checkpoints[-1].params[name], p.detach(), rtol=0, atol=0)
        assert not torch.equal(p.detach(), before[name])
    assert not torch.equal(checkpoints[0].params["0.weight"], checkpoints[1].params["0.weight"])
    # seeded: the same run again
    _, again, positions_again = warmup(model, pool, config)
    assert positions_again == positions
    torch.testing.assert_close(again[1].exp_avg["2.bias"], checkpoints[1].exp_avg["2.bias"], rtol=0, atol=0)


def test_warmup_first_step_is_one_adam_step_on_the_chosen_examples():
    pool = _small_pool()
    model = make_model("mlp", 64, 10, hidden=16, seed=1)
    config = WarmupConfig(fraction=0.1, epochs=1, lr=0.003, batch_size=20, eps=1e-8)  # one step on all 20
    warmed, (cp,), positions = warmup(model, pool, config)
    loss = nn.functional.cross_entropy(model(pool.inputs[positions]), pool.labels[positions])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, p), g in zip(model.named_parameters(), grads):
        expected = p.detach() - 0.003 * g / (g.abs() + 1e-8)  # first Adam step: m̂ = g, v̂ = g²
        torch.testing.assert_close(dict(warmed.named_parameters())[name].detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cp.exp_avg[name], 0.1 * g, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(cp.exp_avg_sq[name], 0.001 * g * g, rtol=1e-4, atol=1e-12)
    assert cp.step == 1 and cp.lr == pytest.approx(0.003)


def test_warmup_trains_only_the_named_parameters():
    pool = _small_pool()
    model = make_model("mlp", 64, 10, hidden=16, seed=0)
    warmed, checkpoints, _ = warmup(model, pool, WarmupConfig(fraction=0.1, epochs=2, batch_size=10), parameters=["2"])
    assert all(list(c.params) == ["2.weight", "2.bias"] for c in checkpoints)
    original = dict(model.named_parameters())
    for name, p in warmed.named_parameters():
        changed = not torch.equal(p.detach(), original[name].detach())
        assert changed == name.startswith("2."), name
    less = LESS(warmed, checkpoints, projection_dim=None).fit(pool.subset(range(30)))
    assert less.features_[0].shape == (30, 16 * 10 + 10)  # the features cover the trained layer only


# --------------------------------------------------------------------------------------------------------------------
# LESS: errors and end to end
# --------------------------------------------------------------------------------------------------------------------


def test_less_refuses_bad_arguments(tiny_data):
    pool, target = tiny_data
    model = _tiny_model()
    cp = _checkpoint(model, seed=0, lr=1.0)
    for bad in (0, 1.5):
        with pytest.raises(TDAError, match="fraction must be in"):
            WarmupConfig(fraction=bad)
        with pytest.raises(TDAError, match=r"fraction must be a number in \(0, 1\]"):
            select(model, pool, target, fraction=bad)
    with pytest.raises(TDAError, match="epochs"):
        WarmupConfig(epochs=0)
    with pytest.raises(TDAError, match="lr must be > 0"):
        WarmupConfig(lr=0.0)
    less = LESS(model, [cp], projection_dim=None)
    with pytest.raises(TDAError, match="not fitted"):
        less.score(target)
    with pytest.raises(TDAError, match="not fitted"):
        less.subtask_scores(target)
    less.fit(pool)
    for bad in (0, 1.5):
        with pytest.raises(TDAError, match="fraction must be in"):
            less.select(target, fraction=bad)
    with pytest.raises(TDAError, match=r"subtasks must name one subtask per target example \(10\), got 9"):
        less.subtask_scores(target, ["a"] * 9)
    with pytest.raises(TDAError, match="allocation"):
        less.select(target, allocation="greedy")
    with pytest.raises(TDAError, match="target must be an AttributionDataset"):
        less.score(target.inputs)
    with pytest.raises(TDAError, match="is empty"):  # an empty dataset cannot even be built ...
        AttributionDataset(target.inputs[:0], target.labels[:0], name="target")
    emptied = copy.copy(target)  # ... so LESS's own check is reached by emptying one after the fact
    emptied.inputs, emptied.labels = target.inputs[:0], target.labels[:0]
    with pytest.raises(TDAError, match="target is empty"):
        less.subtask_scores(emptied)
    with pytest.raises(TDAError, match="checkpoints must be a non-empty list"):
        LESS(model, [])
    with pytest.raises(TDAError, match="subtask_aggregation"):
        LESS(model, [cp], subtask_aggregation="median")
    with pytest.raises(TDAError, match="pool must be an AttributionDataset"):
        less.fit(pool.inputs)
    with pytest.raises(TDAError, match="pool must be an AttributionDataset"):
        warmup(model, pool.inputs)


@pytest.mark.parametrize("target_source", ["inverted", "transposed"])
def test_less_selects_the_target_source_from_a_planted_pool(target_source):
    planted = load_planted_pool(n_pool=800, n_target=20, n_test=20, target_source=target_source, seed=0)
    pool, source = planted.pool, np.array(planted.source)
    model = make_model("mlp", 64, 10, seed=0)
    table = select(model, pool, planted.target, 0.05, subtasks=planted.target.labels.tolist(), projection_dim=1024)
    assert len(table) == 40 == table["train_id"].nunique()
    rows = pool.positions(table["train_id"].tolist())
    random_share = float(np.mean(source == target_source))
    assert 0.2 < random_share < 0.3
    assert float(np.mean(source[rows] == target_source)) > 0.6
    assert table["label"].tolist() == pool.labels[rows].tolist()
    assert table.attrs["method"] == "less" and len(table.attrs["warmup_ids"]) == 40


def test_adam_checkpoint_capture_reads_the_tracked_parameters_own_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2))
    opt = torch.optim.Adam([{"params": model[0].parameters()},
                            {"params": model[2].parameters(), "betas": (0.5, 0.9), "eps": 1e-3}], lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    checkpoint = AdamCheckpoint.capture(model, opt, lr=0.1, parameters=["2"])
    assert checkpoint.betas == (0.5, 0.9) and checkpoint.eps == 1e-3
    with pytest.raises(TDAError, match="different betas"):
        AdamCheckpoint.capture(model, opt, lr=0.1)


def test_lava_refuses_max_iter_zero_and_a_single_training_example():
    train = AttributionDataset(torch.randn(1, 3), torch.tensor([0]))
    validation = AttributionDataset(torch.randn(4, 3), torch.tensor([0, 0, 0, 0]))
    with pytest.raises(TDAError, match="max_iter"):
        LAVA(features=lambda x: x, max_iter=0)
    with pytest.raises(TDAError, match="at least 2"):
        LAVA(features=lambda x: x).fit(train, validation)
