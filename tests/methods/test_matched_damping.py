"""K-FAC / EK-FAC's default damping matched to the exact curvature (matched_damping.py): the exact solve, the refined
peak, the match itself where the answer is known, the sample's Fisher rows, and the fitted method's use of it."""

import math
import warnings

import pytest
import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.engine.kfac import FisherRows, LayerFactors, fisher_and_gradient_rows, row_numbers
from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning
from tda_explorer.compute.methods.influence.matched_damping import (
    _exact_solver,
    _peak,
    match_damping,
    sample_sizes,
)
from tda_explorer.compute.training.train import TrainConfig


def _mixed_rows(many: int, gen: torch.Generator) -> FisherRows:
    """``many`` rows over a factored layer (4 × 3: vec(s ⊗ a)) and a dense one (18 wide)."""
    rows = FisherRows([12, 18])
    rows.add(0, torch.randn(many, 4, generator=gen, dtype=torch.float64),
             torch.randn(many, 3, generator=gen, dtype=torch.float64))
    rows.add(1, torch.randn(many, 18, generator=gen, dtype=torch.float64))
    return rows


def test_fisher_rows_products_equal_those_of_the_dense_rows():
    gen = torch.Generator().manual_seed(3)
    rows = _mixed_rows(7, gen)
    dense = rows.dense()
    s, a = rows.parts[0]
    torch.testing.assert_close(dense[:, :12], (s[:, :, None] * a[:, None, :]).flatten(1))
    v, w = torch.randn(5, 30, generator=gen, dtype=torch.float64), torch.randn(7, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rows.gram(), dense @ dense.T)
    torch.testing.assert_close(rows.times(v), dense @ v.T)
    torch.testing.assert_close(rows.transpose_times(w), w.T @ dense)
    more = _mixed_rows(3, gen)
    rows.add(0, *more.parts[0])
    rows.add(1, *more.parts[1])
    assert len(rows) == 10 and rows.width == 30
    torch.testing.assert_close(rows.dense(), torch.cat([dense, more.dense()]))


@pytest.mark.parametrize("many", [12, 45])  # fewer rows than columns (the Gram side), more (the direct side)
def test_the_exact_solve_on_either_side_equals_a_dense_solve(many):
    gen = torch.Generator().manual_seed(0)
    rows = _mixed_rows(many, gen)
    rhs = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    dense = rows.dense()
    expected = torch.linalg.solve(dense.T @ dense + 0.3 * torch.eye(30, dtype=torch.float64), rhs.T).T
    torch.testing.assert_close(_exact_solver(rows, 0.3)(rhs), expected, rtol=1e-10, atol=1e-12)


def test_float32_rows_too_ill_conditioned_for_a_float32_factor_are_solved_in_float64():
    """Rank-5 float32 rows (each repeated, scaled 100×) under a tiny shift: float32's Cholesky fails, and the solve
    falls back to the float64 system, which equals a float64 dense solve of the same rows."""
    gen = torch.Generator().manual_seed(0)
    rows = FisherRows([40])
    rows.add(0, torch.cat([torch.randn(5, 40, generator=gen)] * 4) * 100)
    shift = 1e-6
    single = rows.gram()
    single.diagonal().add_(shift)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(single)
    rhs = torch.randn(3, 40, generator=gen)
    dense = rows.dense().double()
    expected = torch.linalg.solve(dense.T @ dense + shift * torch.eye(40, dtype=torch.float64), rhs.double().T).T
    solved = _exact_solver(rows, shift)(rhs)
    assert solved.dtype == torch.float64
    assert float((solved - expected).abs().max() / expected.abs().max()) < 1e-3
    single.diagonal().sub_(shift)
    torch.testing.assert_close(rows.gram(dtype=torch.float64), single.double())


def test_where_the_factored_curvature_is_the_exact_one_the_match_is_the_exact_systems_damping():
    """Fisher rows whose RᵀR/m is exactly the factors' diagonal: the Kronecker scores at λ equal the exact ones, so the
    match is λ (agreement 1; one layer, so either family expresses it), whatever λ and wherever the grid falls."""
    gen = torch.Generator().manual_seed(2)
    e = torch.rand(12, generator=gen, dtype=torch.float64) * 3 + 0.01
    factors = [LayerFactors("", torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64), e.view(4, 3))]
    m = 40
    gradient_rows = FisherRows([12])
    gradient_rows.add(0, torch.randn(m, 12, generator=gen, dtype=torch.float64))

    def fisher_rows() -> FisherRows:  # 12 rows: RᵀR / m = diag(e); a new one each time (the match scales it)
        rows = FisherRows([12])
        rows.add(0, math.sqrt(m) * torch.diag(e.sqrt()))
        return rows

    for lam in (0.0137, 0.41):
        match = match_damping(factors, fisher_rows(), gradient_rows, 0.0, lam, "recipe")
        assert match.agreement == pytest.approx(1.0, abs=1e-4) and (match.examples, match.probes) == (m, m)
        assert math.log10(match.layer_damping[0] / lam) == pytest.approx(0.0, abs=0.02)
    weighted = match_damping(factors, fisher_rows(), gradient_rows, 0.2, 0.05, "recipe")  # the weight decay is the
    assert math.log10(weighted.layer_damping[0] / 0.25) == pytest.approx(0.0, abs=0.02)  # exact system's too


def test_the_peak_is_refined_between_the_best_candidates_neighbours():
    def agreement(level):
        return 1 - (math.log10(level) + 0.37) ** 2  # best at 10^-0.37, between the grid's 10^-0.5 and 1

    curve = [(level, agreement(level)) for level in (0.1, 10 ** -0.5, 1.0, 10 ** 0.5)]
    level, value = _peak(curve, agreement)
    assert math.log10(level) == pytest.approx(-0.37, abs=0.01) and value == pytest.approx(1.0, abs=1e-4)
    assert _peak([(1.0, 0.9), (10.0, 0.5)], agreement) == (1.0, 0.9)  # at the grid's end: not extrapolated


def test_the_sample_holds_at_most_the_rows_and_memory_allowed():
    """(curvature examples, scored examples): the scored ones among the curvature's, which fill the rows and memory
    left."""
    assert sample_sizes(100, 10, 50, 4) == (100, 100)
    assert sample_sizes(10_000, 3, 50, 4) == (682, 256)  # 2,048 rows of 3 (the expected Fisher's, sketched) each
    assert sample_sizes(10_000, 10, 50, 4) == (204, 204)  # 2,048 rows of 10
    assert sample_sizes(10_000, 1, 50, 4) == (2048, 256)
    assert sample_sizes(10_000, 1, 1_000_000, 4) == (6, 6)  # 48 MiB of Fisher and gradient rows 10^6 wide, 2 each
    assert sample_sizes(10_000, 3, 50_000, 4) == (63, 62)  # 62 × (3 + 1) rows, then what is left in 3s


def test_fisher_rows_are_the_fishers_factor_and_the_gradients_the_losses():
    """On one linear layer of a softmax model: RᵀR / n is the expected Fisher (Σ_c p_c g_c g_cᵀ averaged), and the
    gradient rows the per-example cross-entropy gradients, both in the Kronecker eigenbasis (orthogonal here)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    data = AttributionDataset(torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,)))
    task = AttributionTask(model)
    kfac = get_method("if-kfac", task, damping=0.1).fit(data)
    fisher, grads = fisher_and_gradient_rows(task, kfac.factors_, data, task.train_loss, "expected",
                                             dtype=torch.float64)
    assert len(fisher.parts[0]) == 2 and len(grads.parts[0]) == 2  # one position: held as its factors
    fisher, grads = fisher.dense(), grads.dense()
    assert fisher.shape == (30, 16) and grads.shape == (10, 16)  # C − 1 = 3 rows per example
    x1 = torch.cat([data.inputs, torch.ones(10, 1, dtype=torch.float64)], 1)
    p = torch.softmax(model(data.inputs), -1).detach()
    per_class = [(p - torch.eye(4, dtype=torch.float64)[c])[:, :, None] * x1[:, None, :] for c in range(4)]
    dense = sum((p[:, c, None, None] * per_class[c].flatten(1)[:, :, None] * per_class[c].flatten(1)[:, None, :])
                for c in range(4)).mean(0)
    f = kfac.factors_[0]
    basis = torch.kron(f.q_s, f.q_a)  # vec of Q_Sᵀ G Q_A, rows of G (out) by columns (in + 1)
    torch.testing.assert_close(fisher.T @ fisher / 10, basis.T @ dense @ basis, rtol=1e-9, atol=1e-12)
    own = (p - torch.eye(4, dtype=torch.float64)[data.labels])[:, :, None] * x1[:, None, :]
    torch.testing.assert_close(grads, own.flatten(1) @ basis, rtol=1e-9, atol=1e-12)


def test_sketched_curvature_roots_keep_the_largest_and_sum_to_the_curvature_in_expectation():
    """``most=3`` of 5 roots: the two largest exactly, the other three as one random-signed sum, whose outer product
    averages to theirs, so the three rows' Σ v vᵀ averages to diag(p) − ppᵀ."""
    from tda_explorer.compute.engine.kfac import output_curvature_roots

    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = output_curvature_roots(logits, None)
    p = logits.softmax(-1)
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gen = torch.Generator().manual_seed(1)
    draws = [output_curvature_roots(logits, None, most=3, generator=gen) for _ in range(4000)]
    assert all(len(d) == 3 for d in draws)
    for d in draws[:5]:
        torch.testing.assert_close(d[1:], full[-2:])  # the largest two, exactly
        signs = torch.linalg.lstsq(torch.stack(full[:3], 2), d[0][:, :, None]).solution[:, :, 0]
        torch.testing.assert_close(signs.abs(), torch.ones_like(signs))  # the tail's roots with signs ±1
    mean = sum(sum(v[:, :, None] * v[:, None, :] for v in d) for d in draws) / len(draws)
    torch.testing.assert_close(mean, curvature, rtol=0, atol=0.05 * float(curvature.abs().max()))
    with pytest.raises(ValueError, match="most must be at least 2"):
        output_curvature_roots(logits, None, most=1, generator=gen)
    unsketched = output_curvature_roots(logits, None, most=5, generator=gen)  # no more roots than that: all of them
    assert len(unsketched) == 5 and all(torch.equal(a, b) for a, b in zip(unsketched, full))


def test_gradient_rows_of_the_first_examples_only():
    """``gradients=k``: the Fisher rows of every example, the gradient rows of the first k (batches cut mid-way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    data = AttributionDataset(torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,)))
    task = AttributionTask(model)
    factors = get_method("if-kfac", task, damping=0.1).fit(data).factors_
    fisher, grads = fisher_and_gradient_rows(task, factors, data, task.train_loss, batch_size=4, dtype=torch.float64)
    some_fisher, some = fisher_and_gradient_rows(task, factors, data, task.train_loss, batch_size=4,
                                                 dtype=torch.float64, gradients=6)
    torch.testing.assert_close(some_fisher.dense(), fisher.dense())
    assert len(some) == 6
    torch.testing.assert_close(some.dense(), grads.dense(slice(0, 6)))


def test_the_curvature_sample_may_be_larger_than_the_scored_one():
    """Fisher rows of 30 examples and gradient rows of 12 of them: the match's exact scores are those of the 30
    examples' Fisher (RᵀR / 30), checked through the one-layer case where the Kronecker factors are that Fisher."""
    gen = torch.Generator().manual_seed(4)
    e = torch.rand(12, generator=gen, dtype=torch.float64) * 3 + 0.01
    factors = [LayerFactors("", torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64), e.view(4, 3))]
    gradient_rows = FisherRows([12])
    gradient_rows.add(0, torch.randn(12, 12, generator=gen, dtype=torch.float64))
    rows = FisherRows([12])
    rows.add(0, math.sqrt(30) * torch.diag(e.sqrt()))  # RᵀR / 30 = diag(e)
    match = match_damping(factors, rows, gradient_rows, 0.0, 0.05, "recipe", fisher_examples=30)
    assert match.agreement == pytest.approx(1.0, abs=1e-4) and (match.examples, match.fisher_examples) == (12, 30)
    assert math.log10(match.layer_damping[0] / 0.05) == pytest.approx(0.0, abs=0.02)
    assert "the curvature from 30" in match.describe()


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_the_default_is_matched_once_per_fit_and_reported(tiny_mlp, tiny_data, method):
    train, test = tiny_data
    recipe = TrainConfig(epochs=3, batch_size=8, lr=0.05, optimizer="sgd")
    attributor = get_method(method, AttributionTask(tiny_mlp), train_config=recipe).fit(train)
    first = attributor.attribute(test).scores
    match = attributor.damping_match_
    assert attributor.damping_rule_ == "matched" and match.exact_rule == "recipe"
    assert match.examples == len(train) and 0 < match.agreement <= 1 and "correlation" in match.describe()
    assert attributor._layer_damping() == match.layer_damping
    torch.testing.assert_close(attributor.attribute(test).scores, first)
    attributor.fit(train)
    if method == "if-kfac":  # matched in the fit, before the training gradients are held: the two never at once
        assert attributor.damping_match_ is not None and attributor.damping_match_ is not match
    else:  # EK-FAC holds the gradients of its eigenvalue pass: matched when first needed
        assert attributor.damping_match_ is None
    torch.testing.assert_close(attributor.attribute(test).scores, first)
    recomputed = get_method(method, AttributionTask(tiny_mlp), train_config=recipe, keep_gradients=False).fit(train)
    assert recomputed.damping_match_ is None  # nothing held: matched when first needed
    torch.testing.assert_close(recomputed.attribute(test).scores, first)
    assert recomputed.damping_match_.layer_damping == match.layer_damping
    given = get_method(method, AttributionTask(tiny_mlp), train_config=recipe, damping=0.3).fit(train)
    given.attribute(test)
    assert given.damping_rule_ == "given" and given.damping_match_ is None


def test_a_convolution_is_held_as_dense_rows_beside_a_factored_linear_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    data = AttributionDataset(torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    recipe = TrainConfig(epochs=2, batch_size=5, lr=0.1, optimizer="sgd")
    attributor = get_method("if-ekfac", AttributionTask(model), train_config=recipe).fit(data)
    attributor.attribute(data)
    assert attributor.damping_rule_ == "matched"
    fisher, _ = fisher_and_gradient_rows(attributor.task, attributor.factors_, data, attributor.task.train_loss,
                                         dtype=torch.float64)
    assert [len(part) for part in fisher.parts] == [1, 2]  # the convolution's rows dense, the linear layer's factors
    dense = fisher.dense()
    torch.testing.assert_close(fisher.gram(), dense @ dense.T)


def test_a_row_takes_its_factors_numbers_for_a_one_position_layer_and_its_full_width_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    data = AttributionDataset(torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    attributor = get_method("if-ekfac", AttributionTask(model), damping=0.1).fit(data)
    conv, linear = attributor.factors_
    want = conv.q_s.shape[1] * conv.q_a.shape[1] + linear.q_s.shape[1] + linear.q_a.shape[1]
    assert row_numbers(attributor.task, attributor.factors_, data) == want


def test_probes_taken_a_block_at_a_time_give_the_same_match(monkeypatch):
    """Where the probes' dense gradients would exceed the memory cap they are taken in blocks: the same scores, the
    same damping."""
    from tda_explorer.compute.methods.influence import matched_damping

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    data = AttributionDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,)))
    task = AttributionTask(model)
    factors = get_method("if-ekfac", task, damping=0.1).fit(data).factors_

    def match():
        fisher, grads = fisher_and_gradient_rows(task, factors, data, task.train_loss, dtype=torch.float64)
        return match_damping(factors, fisher, grads, 0.0, 0.05, "recipe")

    whole = match()
    width = sum(f.eigenvalues.numel() for f in factors)
    monkeypatch.setattr(matched_damping, "MATCH_MEMORY", 2 * width * 8 * 7)  # blocks of 7 probes
    assert matched_damping.probe_block(40, width, 8) == 7
    blocked = match()
    assert blocked.level == pytest.approx(whole.level, rel=1e-9) and blocked.family == whole.family
    assert blocked.agreement == pytest.approx(whole.agreement, rel=1e-9)


def test_a_wide_mlp_is_matched_not_sent_to_the_fallback():
    """A 10-class MLP of 100k parameters (more examples than inputs: a full eigenbasis): its rows, held as factors, fit
    the cap (counted densely they would not have left the 16 examples the match needs); the curvature's 3 rows per
    example (two and a sketch of the other seven) from 682 examples, 256 of them scored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    data = AttributionDataset(torch.randn(1700, 784), torch.randint(0, 10, (1700,)))
    recipe = TrainConfig(epochs=2, batch_size=64, lr=0.05, optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverBackoffWarning)
        attributor = get_method("if-ekfac", AttributionTask(model), train_config=recipe).fit(data)
        attributor.attribute(data.subset(range(5)))
    match = attributor.damping_match_
    assert attributor.damping_rule_ == "matched" and (match.examples, match.fisher_examples) == (256, 2048 // 3)
    dense_width = sum(f.eigenvalues.numel() for f in attributor.factors_)
    assert sample_sizes(10_000, 9, dense_width, 4)[1] < 16  # what the dense count allowed


def test_binned_scores_are_exact_where_each_bin_holds_one_eigenvalue():
    """Eigenvalues taking a few distinct values, far apart: each bin holds one value, so the binned scores equal the
    exact Kronecker scores Σ_d p_d g_d / (e_d + λ_l) at any per-layer damping; two below the floor share a bin, which
    changes the weights by ~e / λ."""
    from tda_explorer.compute.methods.influence.matched_damping import _BinnedScores

    gen = torch.Generator().manual_seed(5)
    eigenvalues = [torch.tensor([1e-3, 1.0, 1e2, 1.0, 1e-3, 1e2], dtype=torch.float64).repeat(2),
                   torch.tensor([1e-12, 10.0, 10.0, 3e-12, 0.5, 0.5], dtype=torch.float64)]  # two below the floor
    rows = FisherRows([12, 6])
    rows.add(0, torch.randn(9, 3, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen,
                                                                                    dtype=torch.float64))
    rows.add(1, torch.randn(9, 6, generator=gen, dtype=torch.float64))
    binned = _BinnedScores(eigenvalues, rows, [slice(0, 4)], [1e-5, 1e-9])
    dense = rows.dense()
    for lams in ([0.1, 0.02], [3.0, 1e-4]):
        weights = torch.cat([1 / (e + lam) for e, lam in zip(eigenvalues, lams)])
        exact = (dense[:4] * weights) @ dense.T
        torch.testing.assert_close(binned.scores(lams), exact, rtol=1e-5, atol=1e-8)
