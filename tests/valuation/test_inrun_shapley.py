"""In-Run Data Shapley: ghost dot-products against explicit per-sample gradients; first- and second-order values
against exact per-step Shapley values (all subsets enumerated) on a tiny logistic regression."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.engine.kfac import layer_activity, tracked_layers
from tda_explorer.compute.training.train import TrainConfig, train_weighted
from tda_explorer.compute.valuation.inrun_shapley import InRunShapley, ghost_products
from tda_explorer.errors import TDAError


def test_ghost_products_equal_explicit_per_sample_dot_products():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,))  # 4 positions per example
    flat = torch.nn.Sequential(model, torch.nn.Flatten(1), torch.nn.Linear(12, 3)).double()
    task = AttributionTask(flat)
    layers = tracked_layers(task)
    loss = lambda out, start: task.train_loss(out, y[start : start + len(out)])
    (patches, (grads,)), = layer_activity(flat, layers, x, [loss], 6, "cpu")
    explicit = per_sample_gradients(flat, task.tracked_names(), x, y, task.train_loss)
    m = torch.randn(explicit.shape[1], dtype=torch.float64)
    expected = explicit @ m
    got, offset = 0, 0
    for name, module in layers:
        w, b = module.weight.numel(), module.bias.numel()
        weight, bias = m[offset : offset + w].reshape(module.weight.shape), m[offset + w : offset + w + b, None]
        matrix = torch.cat([weight, bias], 1)
        got = got + ghost_products(patches[name], grads[name], matrix)
        offset += w + b
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _exact_step_shapley(model, params, x, y, xv, yv, lr, bs):
    """Per-step Shapley values of the validation-loss reduction, every subset of the batch enumerated."""
    base = copy.deepcopy(model)

    def val_loss(p):
        out = torch.func.functional_call(base, p, (xv,))
        return torch.nn.functional.cross_entropy(out, yv, reduction="sum")

    def grad_of(i):
        g = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(
            torch.func.functional_call(base, p, (x[i : i + 1],)), y[i : i + 1], reduction="sum"))(params)
        return g

    grads = [grad_of(i) for i in range(len(x))]
    start = val_loss(params)

    def utility(subset):
        p = {k: params[k] - lr / bs * sum((grads[i][k] for i in subset), torch.zeros_like(params[k]))
             for k in params}
        return float(start - val_loss(p))

    n = len(x)
    cache = {s: utility(s) for r in range(n + 1) for s in itertools.combinations(range(n), r)}
    values = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for r in range(n):
            for s in itertools.combinations(others, r):
                weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                values[i] += weight * (cache[tuple(sorted(s + (i,)))] - cache[s])
    return values, cache[tuple(range(n))]


@pytest.mark.parametrize("second_order", [False, True])
def test_values_match_exact_per_step_shapley_on_a_tiny_logistic_regression(second_order):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    xv = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    yv = (xv[:, 0] + xv[:, 1] > 0).long()
    torch.manual_seed(2)
    model = torch.nn.Linear(6, 2).double()
    init = copy.deepcopy(model.state_dict())
    train, val = AttributionDataset(x, y), AttributionDataset(xv, yv)
    config = TrainConfig(epochs=3, batch_size=8, lr=0.05, weight_decay=0.0, optimizer="sgd", seed=0)
    shapley = InRunShapley(AttributionTask(model), train, val, batch_size=8, second_order=second_order)
    exact = torch.zeros(32, dtype=torch.float64)
    totals = []

    def both(step, positions, params, lr):
        shapley(step, positions, params, lr)
        rows = positions.cpu()
        values, total = _exact_step_shapley(model, {k: v.detach() for k, v in params.items()}, x[rows], y[rows],
                                            xv, yv, lr, 8)
        exact.index_add_(0, rows, values)
        totals.append(total)

    def factory(seed):
        m = copy.deepcopy(model)
        m.load_state_dict(init)
        return m

    train_weighted(factory, x, y, torch.ones(1, 32), config, [0], callback=both)
    from scipy.stats import spearmanr

    assert spearmanr(shapley.values, exact)[0] >= 0.99
    assert abs(float(exact.sum()) - sum(totals)) < 1e-10  # efficiency of the exact values
    tolerance = 1e-2 if second_order else 5e-2  # the Taylor model's total against the actual reduction
    assert abs(float(shapley.values.sum()) - sum(totals)) <= tolerance * abs(sum(totals))


def test_a_changed_validation_set_is_refused():
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    val = AttributionDataset(x[:4].clone(), y[:4].clone())
    model = torch.nn.Linear(3, 2)
    shapley = InRunShapley(AttributionTask(model), AttributionDataset(x, y), val, batch_size=4)
    params = dict(model.named_parameters())
    shapley(0, torch.arange(4), params, 0.1)
    val.inputs[0] += 1
    with pytest.raises(TDAError, match="validation set changed after recording started"):
        shapley(1, torch.arange(4, 8), params, 0.1)


def test_in_run_values_are_a_column_and_a_ranking_in_the_mislabel_panel(digits_experiment, tmp_path):
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    exp = digits_experiment
    train = exp.split.train
    shapley = InRunShapley(exp.task(), train, exp.split.test.subset(range(30)), exp.config.batch_size)
    train_weighted(exp.factory, train.inputs, train.labels, torch.ones(1, len(train)), exp.config,
                   [exp.config.seed], callback=shapley)
    session = Session.from_experiment(exp, folder=tmp_path)
    session.compute("grad-dot")
    session.add_values("in-run shapley", shapley.values)
    ranking = session.mislabel_ranking("in-run shapley")
    lowest = int(torch.argmin(shapley.values))
    assert ranking["train_id"].iloc[0] == train.ids[lowest]  # the least valuable example first
    assert ranking["value:in-run shapley"].iloc[0] == pytest.approx(float(shapley.values[lowest]))
    assert "value:in-run shapley" in session.ranking(0, "grad-dot", k=3).columns  # every training table
    explorer = Explorer(session, k=3)
    explorer.mislabels.method.value = "in-run shapley"
    assert "<th>in-run shapley</th>" in explorer.mislabels.list.value
    assert f"#{train.ids[lowest]}" in explorer.mislabels.list.value
    with pytest.raises(TDAError, match="one entry per training example \\(300\\)"):
        session.add_values("short", torch.ones(3))
    with pytest.raises(TDAError, match="already an attribution method's name"):
        session.add_values("grad-dot", shapley.values)


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _cnn():
    return torch.nn.Sequential(torch.nn.Unflatten(1, (1, 6, 6)), torch.nn.Conv2d(1, 3, 3, padding=1, stride=2),
                               torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(27, 3))


def _cnn1d():
    return torch.nn.Sequential(torch.nn.Unflatten(1, (2, 18)), torch.nn.Conv1d(2, 3, 3, padding=1, stride=2),
                               torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(27, 3))


def _wide_mlp():  # few validation rows against wide layers: the pairwise ghost form
    return torch.nn.Sequential(torch.nn.Linear(36, 40), torch.nn.Tanh(), torch.nn.Linear(40, 30))


def _sequence():  # Linear over a sequence dimension
    return torch.nn.Sequential(torch.nn.Unflatten(1, (6, 6)), torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Flatten(), torch.nn.Linear(30, 3))


@pytest.mark.parametrize("materialise", [True, False], ids=["per-example", "applied"])
@pytest.mark.parametrize("architecture", [_mlp, _cnn, _cnn1d, _wide_mlp, _sequence])
def test_single_pass_backward_equals_the_callback_and_leaves_the_batch_gradient(architecture, materialise,
                                                                                monkeypatch):
    if not materialise:  # the forms for layers whose per-example gradients would be too large; Linear products
        monkeypatch.setattr("tda_explorer.compute.valuation.inrun_shapley.PER_EXAMPLE_LIMIT", 0)  # formed every step
        monkeypatch.setattr("tda_explorer.compute.valuation.inrun_shapley.HELD_LIMIT", 1)
        monkeypatch.setattr("tda_explorer.compute.valuation.inrun_shapley.INPUT_BUFFER_LIMIT", 0)  # step inputs re-made
    gen = torch.Generator().manual_seed(3)
    width = 6 if architecture is _mlp else 36
    x, y = torch.randn(40, width, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    xv, yv = torch.randn(15, width, generator=gen), torch.randint(0, 3, (15,), generator=gen)
    train, val = AttributionDataset(x, y), AttributionDataset(xv, yv)
    torch.manual_seed(0)
    model = architecture()
    twin = copy.deepcopy(model)
    few = 4 if architecture is _wide_mlp else None  # a rotating slice of the validation set, in both forms alike
    single = InRunShapley(AttributionTask(model), train, val, batch_size=8, validation_batch=few)
    callback = InRunShapley(AttributionTask(twin), train, val, batch_size=8, validation_batch=few)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # uneven batches: held Linear products are formed whenever the step's shapes change
    for step, rows in enumerate(torch.randperm(40, generator=gen).split([8, 8, 5, 8, 8, 3])):
        callback(step, rows, {k: v.detach() for k, v in model.named_parameters()}, 0.1)
        optimizer.zero_grad()
        loss = single.backward(rows, lr=0.1)
        plain = copy.deepcopy(model)
        (torch.nn.functional.cross_entropy(plain(x[rows]), y[rows], reduction="sum") / 8).backward()
        assert loss.item() == pytest.approx(
            float(torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum") / 8), rel=1e-6)
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)  # the batch gradient, nothing else
        optimizer.step()
    torch.testing.assert_close(single.values, callback.values, rtol=1e-4, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the capture leaves the model as it was
    with pytest.raises(TDAError, match="second_order: the single-pass backward\\(\\) is first order"):
        InRunShapley(AttributionTask(model), train, val, batch_size=8, second_order=True).backward(rows, 0.1)


def test_single_pass_takes_untracked_trainable_layers_and_refuses_what_would_mix_or_underflow():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    xv, yv = torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    train, val = AttributionDataset(x, y), AttributionDataset(xv, yv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))
    plain, twin = copy.deepcopy(model), copy.deepcopy(model)
    single = InRunShapley(AttributionTask(model, parameters=["0", "2"]), train, val, batch_size=8)
    callback = InRunShapley(AttributionTask(twin, parameters=["0", "2"]), train, val, batch_size=8)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
    for step, rows in enumerate(torch.randperm(24, generator=gen).split(8)):
        if step == 2:  # training data edited in place between steps: every step reads its rows afresh
            x.add_(0.5)
        callback(step, rows, {k: v.detach() for k, v in model.named_parameters()}, 0.1)
        for opt in optimizers:
            opt.zero_grad()
        single.backward(rows.tolist() if step == 1 else rows, lr=0.1)  # positions as a list too
        (torch.nn.functional.cross_entropy(plain(x[rows]), y[rows], reduction="sum") / 8).backward()
        # the LayerNorm's own gradient too: the validation rows' share is 2^-40 of theirs, below float32 rounding
        # (of the gradient's scale: another summation order moves its small entries by an ulp of its large ones)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6 * float(q.grad.abs().max()), msg=name)
        for opt in optimizers:
            opt.step()
    torch.testing.assert_close(single.values, callback.values, rtol=1e-4, atol=1e-7)

    broken = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Linear(4, 3))  # fails after the capture began
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        InRunShapley(AttributionTask(broken), train, val, batch_size=8).backward(rows, 0.1)
    assert not any("forward" in m.__dict__ for m in broken)  # restored on the way out
    half = torch.nn.Sequential(torch.nn.Linear(6, 3)).half()
    with pytest.raises(TDAError, match="layer '0' computes in float16"):
        InRunShapley(AttributionTask(half), AttributionDataset(x.half(), y), AttributionDataset(xv.half(), yv),
                     batch_size=8).backward(rows, 0.1)
    assert half[0].weight.grad is None  # refused before any gradient was written
    normed = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    recorder = InRunShapley(AttributionTask(normed, parameters=["0", "2"]), train, val, batch_size=8)
    with pytest.raises(TDAError, match="BatchNorm in training mode"):
        recorder.backward(rows, 0.1)
    normed.eval()
    recorder.backward(rows, 0.1)  # frozen statistics mix nothing


def test_validation_batches_cycle_through_the_set_and_estimate_it_without_bias():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    xv, yv = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (9,), generator=gen)
    train, val = AttributionDataset(x, y), AttributionDataset(xv, yv)
    model = torch.nn.Linear(4, 3).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    whole = InRunShapley(AttributionTask(model), train, val, batch_size=4)
    sliced = InRunShapley(AttributionTask(model), train, val, batch_size=4, validation_batch=3)
    seen = []
    for step in range(3):  # one cycle: every validation row once, each slice scaled by 9 / 3
        seen += sliced._validation_positions().tolist()
        sliced(step, torch.arange(4), params, 0.1)
        whole(step, torch.arange(4), params, 0.1)
    assert sorted(seen) == list(range(9))
    torch.testing.assert_close(sliced.values, whole.values)  # same parameters: the cycle's mean is the whole set's
    with pytest.raises(TDAError, match="validation_batch must be at most the validation set's 9 rows, got 10"):
        InRunShapley(AttributionTask(model), train, val, batch_size=4, validation_batch=10)
    with pytest.raises(TDAError, match="validation_batch"):
        InRunShapley(AttributionTask(model), train, val, batch_size=4, validation_batch=0)
