"""Influence functions against independent computations on tiny float64 models."""

import re

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.engine.curvature import Curvature


def _flat_objective(model, x, y, wd):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(flat):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y) + 0.5 * wd * (flat**2).sum()

    return f, torch.cat([p.detach().flatten() for p in model.parameters()])


def _grads(model, x, y):
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_explicit_hessian_if_equals_closed_form(tiny_mlp, tiny_data):
    train, test = tiny_data
    wd, lam = 0.05, 1.0
    task = AttributionTask(tiny_mlp, weight_decay=wd)
    got = get_method("if-explicit", task, curvature="hessian", damping=lam).fit(train).attribute(test).scores.double()
    f, theta = _flat_objective(tiny_mlp, train.inputs, train.labels, wd)
    hess = torch.autograd.functional.hessian(f, theta)
    g_tr, g_te = _grads(tiny_mlp, train.inputs, train.labels), _grads(tiny_mlp, test.inputs, test.labels)
    want = g_te @ torch.linalg.solve(hess + lam * torch.eye(len(theta), dtype=torch.float64), g_tr.T) / len(train)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def _ggn_from_jacobians(model, train, wd):
    """The GGN of the mean objective plus wd·I, from each example's explicit logit Jacobian."""
    curvature = Curvature(AttributionTask(model, weight_decay=wd), train, "ggn")
    p = curvature.dim
    ggn = torch.zeros(p, p, dtype=torch.float64)
    for i in range(len(train)):
        x_i = train.inputs[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda flat, x_i=x_i: torch.func.functional_call(model, curvature._unflatten(flat), (x_i,))[0],
            curvature.theta)
        prob = model(x_i).softmax(-1)[0].detach()
        ggn += jac.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ jac
    return ggn / len(train) + wd * torch.eye(p, dtype=torch.float64)


def test_ggn_products_equal_explicit_jacobians(tiny_mlp, tiny_data):
    train, _ = tiny_data
    wd = 0.01
    dense = Curvature(AttributionTask(tiny_mlp, weight_decay=wd), train, "ggn").dense()
    torch.testing.assert_close(dense, _ggn_from_jacobians(tiny_mlp, train, wd), rtol=1e-6, atol=1e-9)
    assert torch.linalg.eigvalsh(dense)[0] > 0  # PSD + wd·I


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_converges_to_explicit_and_self_influence_is_diagonal(tiny_mlp, tiny_data, curvature):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    options = {"curvature": curvature, "damping": 1.0}
    explicit = get_method("if-explicit", task, **options).fit(train)
    cg = get_method("if-cg", task, tol=1e-10, **options).fit(train)
    a, b = explicit.attribute(test).scores, cg.attribute(test).scores
    assert ((a - b).abs().max() / a.abs().max()) < 1e-5
    for method in (explicit, cg):
        full = method.attribute(train).scores
        torch.testing.assert_close(method.self_influence(), full.diagonal(), rtol=1e-4, atol=1e-8)


def test_refusals_name_the_problem(tiny_data):
    train, _ = tiny_data
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(20)  # far from a minimum: the exact Hessian is indefinite
    task = AttributionTask(model)
    with pytest.raises(TDAError, match="not positive definite.*curvature='ggn' or raise damping") as refused:
        get_method("if-explicit", task, curvature="hessian", damping=0.0).fit(train)
    # the eigenvalue named is the Hessian's own (read again: the failed factorisation overwrote the matrix)
    smallest = float(torch.linalg.eigvalsh(Curvature(task, train, "hessian", "cpu").dense())[0])
    named = float(re.search(r"smallest eigenvalue (\S+) ", str(refused.value)).group(1))
    assert smallest < 0 and named == pytest.approx(smallest, rel=1e-2)
    with pytest.raises(TDAError, match="CG did not converge in max_iter=1 iterations: relative residual"):
        get_method("if-cg", task, max_iter=1, tol=1e-12).fit(train).attribute(train)
    with pytest.raises(TDAError, match=r"damping must be a number in \[0, inf\), got -1.0"):
        get_method("if-cg", task, damping=-1.0)
    with pytest.raises(TDAError, match="unknown curvature 'fisher'"):
        get_method("if-explicit", task, curvature="fisher").fit(train)


@pytest.mark.parametrize("method", ["if-ekfac", "if-kfac", "if-astra"])
def test_an_absolute_damping_kind_without_a_damping_is_refused_naming_both(method, tiny_mlp):
    with pytest.raises(TDAError, match=r"damping_kind='absolute'.*pass damping=λ"):
        get_method(method, AttributionTask(tiny_mlp), damping_kind="absolute")
    with pytest.raises(TDAError, match=r"unknown damping_kind .global.; expected one of: relative, absolute"):
        get_method(method, AttributionTask(tiny_mlp), damping=0.1, damping_kind="global")


@pytest.mark.parametrize("kind", ["relative", "absolute"])
@pytest.mark.parametrize("method", ["if-ekfac", "if-kfac"])
def test_kronecker_factored_if_is_exact_for_one_example_on_a_linear_layer(method, kind):
    """One example, empirical Fisher: F = g gᵀ = (s sᵀ) ⊗ (a aᵀ) exactly, so the factored inverse is exact; the damping
    is 0.2 × the layer's mean eigenvalue (relative) or 0.2 itself (absolute)."""
    from tda_explorer import AttributionDataset

    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    train = AttributionDataset(torch.randn(1, 3, dtype=torch.float64), torch.tensor([2]))
    test = AttributionDataset(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0]))
    wd = 0.01
    fitted = get_method(method, AttributionTask(model, weight_decay=wd), fisher="empirical", damping=0.2,
                       damping_kind=kind, weight_decay_term=True).fit(train)
    got = fitted.attribute(test).scores.double()
    g_tr, g_te = _grads(model, train.inputs, train.labels), _grads(model, test.inputs, test.labels)
    # the flat layout is (weight row-major, bias): reorder to the [out, in + 1] layout of the factors
    def layout(g):
        return torch.cat([g[:, :12].view(-1, 4, 3), g[:, 12:].view(-1, 4, 1)], dim=2).reshape(len(g), -1)
    # relative: over the full basis (this one is thin: 1 patch)
    lam = 0.2 * fitted.factors_[0].mean_eigenvalue() if kind == "relative" else 0.2
    assert fitted._layer_damping() == pytest.approx([lam]) and fitted.damping_rule_ == "given"
    fisher = layout(g_tr).T @ layout(g_tr)
    want = layout(g_te) @ torch.linalg.solve(fisher + (wd + lam) * torch.eye(16, dtype=torch.float64),
                                             layout(g_tr).T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.slow  # trains models
def test_ekfac_approximates_explicit_ggn_and_reuses_factors(digits_experiment):
    from scipy.stats import spearmanr

    exp = digits_experiment
    task = exp.task()
    ekfac = get_method("if-ekfac", task).fit(exp.split.train)
    explicit = get_method("if-cg", task, damping=1e-3, tol=1e-6).fit(exp.split.train)
    a = ekfac.attribute(exp.split.test).scores
    b = explicit.attribute(exp.split.test).scores
    rho = [spearmanr(a[j], b[j]).statistic for j in range(len(a))]
    assert sum(rho) / len(rho) > 0.6
    full = ekfac.attribute(exp.split.train).scores
    torch.testing.assert_close(ekfac.self_influence(), full.diagonal(), rtol=1e-4, atol=1e-8)
    factors = ekfac.factors_
    damped = ekfac.with_damping(10.0).attribute(exp.split.test).scores
    assert ekfac.factors_ is factors and not torch.allclose(damped, a)


def test_kronecker_factored_if_refuses_unsupported_modules():
    """Chosen parameters with a module K-FAC cannot factor raise; the default parameters skip it with a warning."""
    from tda_explorer.compute.methods.influence.ekfac import UntrackedModulesWarning

    norm = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with pytest.raises(TDAError, match=r"supports nn.Linear, nn.Conv1d and nn.Conv2d.*1 \(LayerNorm\).*if-explicit"):
        get_method("if-ekfac", AttributionTask(norm, parameters=["0", "1", "2"]))
    with pytest.warns(UntrackedModulesWarning, match=r"skips 1 \(LayerNorm\)"):
        assert get_method("if-ekfac", AttributionTask(norm)).task.parameters == ["0", "2"]
    assert get_method("if-ekfac", AttributionTask(norm, parameters=["0", "2"])).name == "if-ekfac"
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(TDAError, match="cannot factor Conv2d '0' with groups=2"):
        get_method("if-ekfac", AttributionTask(grouped, parameters=["0", "2"]))
    with pytest.warns(UntrackedModulesWarning, match=r"skips 0 \(Conv2d\)"):
        assert get_method("if-ekfac", AttributionTask(grouped)).task.parameters == ["2"]


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_a_conv1d_is_factored_as_the_conv2d_of_height_one(method):
    """A Conv1d network (padding, stride, dilation, a bias) and the same weights as Conv2d layers with 1 × k kernels
    on the inputs as 1-pixel-high images: the same factors, so the same scores and self-influence."""

    class Planar(nn.Module):
        def __init__(self, line: nn.Sequential):
            super().__init__()
            a, b = line[0], line[2]
            self.conv = nn.Sequential(nn.Conv2d(2, 4, (1, 3), padding=(0, 1), stride=(1, 2)), nn.Tanh(),
                                      nn.Conv2d(4, 3, (1, 2), dilation=(1, 2)), nn.Flatten(), nn.Linear(12, 3))
            with torch.no_grad():
                for planar, flat in ((self.conv[0], a), (self.conv[2], b), (self.conv[4], line[4])):
                    planar.weight.copy_(flat.weight.view_as(planar.weight))
                    planar.bias.copy_(flat.bias)

        def forward(self, x):
            return self.conv(x.unsqueeze(2))

    torch.manual_seed(0)
    line = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, stride=2), nn.Tanh(), nn.Conv1d(4, 3, 2, dilation=2),
                         nn.Flatten(), nn.Linear(12, 3)).double()
    planar = Planar(line).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 11, generator=gen, dtype=torch.float64)
    from tda_explorer import AttributionDataset

    train = AttributionDataset(x[:30], torch.randint(0, 3, (30,), generator=gen))
    test = AttributionDataset(x[30:], torch.randint(0, 3, (10,), generator=gen))
    torch.testing.assert_close(line(x), planar(x))
    fitted = [get_method(method, AttributionTask(m), damping=0.1).fit(train) for m in (line, planar)]
    torch.testing.assert_close(fitted[0].attribute(test).scores, fitted[1].attribute(test).scores,
                               rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(fitted[0].self_influence(), fitted[1].self_influence(), rtol=1e-6, atol=1e-10)
    assert fitted[0].task.parameters is None and len(fitted[0].factors_) == 3


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 2, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).double()


def test_conv_layer_gradients_from_hooks_equal_autograd_per_example_gradients():
    """Σ_t s_t a_tᵀ over unfolded patches (stride, padding, no bias) is each example's weight gradient."""
    from tda_explorer import AttributionDataset
    from tda_explorer.compute.engine.kfac import fit_factors, rotated_gradients

    model = _cnn()
    data = AttributionDataset(torch.randn(7, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    task = AttributionTask(model)
    method = get_method("if-ekfac", task).fit(data)
    factors = fit_factors(task, data)
    hooked = rotated_gradients(task, factors, data, task.train_loss, batch_size=3, dtype=torch.float64)
    flat = _grads(model, data.inputs, data.labels)
    torch.testing.assert_close(hooked, method._rotate(flat), rtol=1e-8, atol=1e-10)
    # factors: A averages patches over positions, S sums output-gradient outer products over positions
    a = nn.functional.unfold(data.inputs, 3, padding=1, stride=2).transpose(1, 2)
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
    cov_a = torch.einsum("bti,btj->ij", a, a) / (len(data) * a.shape[1])
    q_a = factors[0].q_a
    torch.testing.assert_close(q_a.T @ cov_a @ q_a, torch.diag((q_a.T @ cov_a @ q_a).diagonal()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["if-ekfac", "if-kfac"])
def test_kronecker_factored_if_is_exact_for_a_one_position_convolution(method):
    """A kernel covering the whole input is a Linear layer on the flattened image: exact for one example."""
    from tda_explorer import AttributionDataset

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten()).double()
    train = AttributionDataset(torch.randn(1, 2, 2, 2, dtype=torch.float64), torch.tensor([1]))
    test = AttributionDataset(torch.randn(4, 2, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    wd = 0.01
    fitted = get_method(method, AttributionTask(model, weight_decay=wd), fisher="empirical", damping=0.2,
                       weight_decay_term=True).fit(train)
    got = fitted.attribute(test).scores.double()
    g_tr, g_te = _grads(model, train.inputs, train.labels), _grads(model, test.inputs, test.labels)
    lam = 0.2 * fitted.factors_[0].mean_eigenvalue()  # over the full basis (this one is thin: 1 patch)
    want = g_te @ torch.linalg.solve(g_tr.T @ g_tr + (wd + lam) * torch.eye(27, dtype=torch.float64), g_tr.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_ekfac_on_a_cnn_tracks_the_exact_ggn_influence_and_reuses_stored_factors(tmp_path):
    from scipy.stats import spearmanr

    from tda_explorer import AttributionDataset
    from tda_explorer.compute.engine.store import FeatureStore

    model = _cnn(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 6, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (80,), generator=gen)
    train, test = AttributionDataset(x[:60], y[:60]), AttributionDataset(x[60:], y[60:])
    task = AttributionTask(model, weight_decay=1e-2)
    store = FeatureStore(tmp_path)
    ekfac = get_method("if-ekfac", task, store=store).fit(train)
    exact = get_method("if-explicit", task, damping=1e-3).fit(train)
    a, b = ekfac.attribute(test).scores, exact.attribute(test).scores
    rho = [spearmanr(a[j], b[j]).statistic for j in range(len(a))]
    assert sum(rho) / len(rho) > 0.8  # grad-dot scores 0.70 here
    again = get_method("if-ekfac", task, store=store).fit(train)
    assert store.hits == 1
    torch.testing.assert_close(again.attribute(test).scores, a)


def test_astra_improves_on_its_ekfac_start_towards_the_exact_solution(digits_experiment):
    """ASTRA starts at the EK-FAC answer and iterates towards (G + D)⁻¹v; check it gets closer to a tight CG solve."""
    exp = digits_experiment
    task = exp.task()
    astra = get_method("if-astra", task, iterations=150, minibatch=300).fit(exp.split.train)
    test = exp.split.test.subset(range(6))
    v = astra._features(test, test=True).double()
    damping = astra._damping_flat()
    from tda_explorer.compute.engine.curvature import Curvature

    full = Curvature(task, exp.split.train, "ggn")
    residual = lambda x: float(((full.matvec(x) + damping * x - v).norm(dim=1) / v.norm(dim=1)).max())
    start, end = residual(astra._precondition(v)), residual(astra._solve(v))
    assert end < 0.5 * start
    with pytest.raises(TDAError, match=r"momentum must be a number in \[0, 1\)"):
        get_method("if-astra", task, momentum=1.5)


@pytest.mark.slow  # trains models
def test_lissa_converges_to_explicit_and_refuses_divergence(tiny_mlp, tiny_data):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    explicit = get_method("if-explicit", task, damping=1.0).fit(train).attribute(test).scores
    full_batch = get_method("if-lissa", task, damping=1.0, depth=300, minibatch=20).fit(train)
    got = full_batch.attribute(test).scores
    assert ((got - explicit).abs().max() / explicit.abs().max()) < 1e-4
    assert full_batch.residual_ < 1e-4
    # the minibatch products run in float32 by default; float64 products give the same answer to float32's precision
    assert full_batch.products_.dtype == torch.float32 and full_batch.curvature_.dtype == torch.float64
    exact = get_method("if-lissa", task, damping=1.0, depth=300, minibatch=20, precision="float64").fit(train)
    assert exact.products_ is exact.curvature_
    assert ((exact.attribute(test).scores - got).abs().max() / got.abs().max()) < 1e-5
    stochastic = get_method("if-lissa", task, damping=1.0, depth=400, minibatch=5, repeats=4).fit(train)
    got = stochastic.attribute(test).scores
    assert ((got - explicit).norm() / explicit.norm()) < 0.1
    with pytest.raises(TDAError, match=r"if-lissa diverged: relative residual .*raise scale \(now 0.01\)"):
        get_method("if-lissa", task, damping=1.0, depth=200, scale=0.01).fit(train).attribute(test)
    with pytest.raises(TDAError, match=r"scale must be a number in \(0, inf\)"):
        get_method("if-lissa", task, scale=-1.0)


@pytest.mark.slow  # trains models
def test_lissa_says_when_its_depth_truncates_the_series_and_the_depth_it_names_solves_it(tiny_mlp, tiny_data):
    """A depth far below scale / damping stops the series early, which damps the least-curved directions more than
    asked: a ``TruncatedSeriesWarning`` says so and names a depth; at that depth the answer is the damped system's
    (against if-explicit) and nothing is said."""
    import re
    import warnings

    from tda_explorer.compute.methods.influence.lissa import TRUNCATION_LEFT, TruncatedSeriesWarning, series_left

    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.01)
    explicit = get_method("if-explicit", task, damping=0.01).fit(train).attribute(test).scores
    with pytest.warns(TruncatedSeriesWarning, match=r"extra damping .* pass depth >= (\d+)") as caught:
        short = get_method("if-lissa", task, damping=0.01, depth=20, minibatch=30, precision="float64").fit(train)
        short_scores = short.attribute(test).scores
    depth = int(re.search(r"pass depth >= (\d+)", str(caught[0].message)).group(1))
    rate = (short.lam_ + short.products_.wd) / short.scale_  # each step keeps 1 − rate along the least curvature
    half = lambda j: series_left(rate, j, j - j // 2)  # noqa: E731 - averaged over the second half (the default)
    assert half(depth) <= TRUNCATION_LEFT < half(depth - 1) and depth > 20  # the least depth that solves it
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncatedSeriesWarning)
        deep = get_method("if-lissa", task, damping=0.01, depth=depth, minibatch=30, precision="float64").fit(train)
        deep_scores = deep.attribute(test).scores
    error = lambda s: float((s - explicit).norm() / explicit.norm())  # noqa: E731
    assert error(deep_scores) < 0.05 < error(short_scores)


def test_arnoldi_with_full_rank_is_explicit_and_drops_eigenvalues_below_the_damping(tiny_mlp, tiny_data):
    from tda_explorer import AttributionDataset

    small, test = tiny_data
    # 30 examples × 2 logit directions > 43 parameters. A Krylov space holds one vector per distinct eigenvalue,
    # so of the GGN's 6-dimensional null space (a constant added to every logit) it keeps one direction; the
    # cross-entropy gradients are orthogonal to that null space, so the scores are still exact.
    train = AttributionDataset(torch.cat([small.inputs, test.inputs]), torch.cat([small.labels, test.labels]))
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    p = sum(q.numel() for q in tiny_mlp.parameters())
    explicit = get_method("if-explicit", task, damping=0.01).fit(train).attribute(test).scores
    arnoldi = get_method("if-arnoldi", task, damping=0.01, rank=p).fit(train)
    assert len(arnoldi.eigenvalues_) == p - 5  # every eigenvalue ≥ wd = 0.05 > λ is kept
    torch.testing.assert_close(arnoldi.attribute(test).scores, explicit, rtol=1e-4, atol=1e-7)
    low = get_method("if-arnoldi", task, damping=0.01, rank=5).fit(train)
    assert len(low.eigenvalues_) == 5 and bool((low.eigenvalues_[:-1] >= low.eigenvalues_[1:]).all())
    dense = torch.linalg.eigvalsh(get_method("if-explicit", task, damping=0.0).fit(train).curvature_.dense())
    torch.testing.assert_close(low.eigenvalues_, dense.flip(0)[:5], rtol=1e-3, atol=1e-9)  # 10 Arnoldi steps
    # an indefinite Hessian: negative and tiny Ritz values are dropped, so scores stay finite
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(20)
    hess = get_method("if-arnoldi", AttributionTask(model), curvature="hessian", damping=1e-3, rank=40).fit(train)
    assert bool((hess.eigenvalues_ > 1e-3).all()) and torch.isfinite(hess.attribute(test).scores).all()


def test_arnoldi_complement_brings_a_truncated_eigenspace_closer_to_the_exact_solve(tiny_mlp, tiny_data):
    """Outside the kept eigenspace the curvature is taken as the one the training gradients see there, μ_c:
    U(Λ + λ)⁻¹Uᵀ + (I − UUᵀ)/(μ_c + λ), checked by hand, with μ_c against the dense curvature's Rayleigh quotient of
    the gradients' parts there (every training gradient: fewer than 64), and nearer the explicit solve than dropping
    that part (Schioppa et al.'s form)."""
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    explicit = get_method("if-explicit", task, damping=0.01).fit(train)
    exact = explicit.attribute(test).scores.double()
    kept = get_method("if-arnoldi", task, damping=0.01, rank=8).fit(train)
    dropped = get_method("if-arnoldi", task, damping=0.01, rank=8, complement=False).fit(train)
    error = lambda m: float((m.attribute(test).scores.double() - exact).norm() / exact.norm())
    assert error(kept) < 0.5 * error(dropped)
    u, mu, mu_c = kept.eigenvectors_, kept.eigenvalues_, kept.complement_eigenvalue_
    outside = torch.eye(len(u), dtype=u.dtype) - u @ u.T
    g_train, g_test = explicit.g_train_, explicit._features(test, test=True).double()
    parts = g_train @ outside
    quotient = float(((parts @ explicit.curvature_.dense()) * parts).sum() / (parts**2).sum())
    mean = float(torch.trace(outside @ explicit.curvature_.dense() @ outside)) / (len(u) - u.shape[1])
    assert len(train) < 64 and dropped.complement_eigenvalue_ is None and mu_c > mean
    assert mu_c == pytest.approx(quotient, rel=1e-6)
    inverse = u @ torch.diag(1 / (mu + 0.01)) @ u.T + outside / (mu_c + 0.01)
    torch.testing.assert_close(kept.attribute(test).scores.double(), g_test @ inverse @ g_train.T / len(train),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kept.self_influence().double(), ((g_train @ inverse) * g_train).sum(1) / len(train),
                               rtol=1e-5, atol=1e-7)


def test_datainf_is_the_per_layer_sherman_morrison_average(tiny_mlp, tiny_data):
    """Against an independent computation: invert each damped rank-one term densely, average, per layer."""
    train, test = tiny_data
    wd = 0.05
    task = AttributionTask(tiny_mlp, weight_decay=wd)
    got = get_method("if-datainf", task, damping=0.3).fit(train).attribute(test).scores.double()
    g_tr, g_te = _grads(tiny_mlp, train.inputs, train.labels), _grads(tiny_mlp, test.inputs, test.labels)
    want = torch.zeros(len(test), len(train), dtype=torch.float64)
    for cols in (slice(0, 25), slice(25, 43)):  # the two Linear modules, weight and bias together
        g = g_tr[:, cols]
        d = cols.stop - cols.start
        lam = wd + 0.3 * float((g**2).sum(1).mean()) / d
        inverse = sum(torch.linalg.inv(torch.outer(gi, gi) + lam * torch.eye(d, dtype=torch.float64)) for gi in g)
        want += g_te[:, cols] @ (inverse / len(g)) @ g.T / len(g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    one = train.subset([0])
    exact = get_method("if-datainf", AttributionTask(nn.Linear(4, 3).double()), damping=0.3).fit(one)
    g = _grads(exact.task.model, one.inputs, one.labels)
    lam = 0.3 * float((g**2).sum()) / 15
    want = _grads(exact.task.model, test.inputs, test.labels) @ torch.linalg.solve(
        torch.outer(g[0], g[0]) + lam * torch.eye(15, dtype=torch.float64), g.T)  # Sherman–Morrison is exact
    torch.testing.assert_close(exact.attribute(test).scores.double(), want, rtol=1e-5, atol=1e-9)
    with pytest.raises(TDAError, match=r"damping must be a number in \(0, inf\), got 0.0"):
        get_method("if-datainf", task, damping=0.0)


def test_influence_function_create_picks_the_solver(tiny_mlp):
    from tda_explorer.compute.methods import InfluenceFunction

    task = AttributionTask(tiny_mlp)
    lissa = InfluenceFunction.create(task, "lissa", depth=3)
    assert lissa.name == "if-lissa" and lissa.args.depth == 3
    assert InfluenceFunction.create(task, "ekfac").name == "if-ekfac"
    with pytest.raises(TDAError, match="unknown solver 'newton'; expected one of: arnoldi, astra, cg, datainf, "
                                       "ekfac, explicit, kfac, lissa$"):
        InfluenceFunction.create(task, "newton")
    with pytest.raises(TDAError, match="if-cg has no option 'depth'; its options are: .*max_iter"):
        InfluenceFunction.create(task, "cg", depth=3)


def test_solvers_share_the_influence_arguments_and_generate_their_config(tiny_mlp, tiny_data):
    from tda_explorer.compute.catalogue import CATALOGUE, Family
    from tda_explorer.compute.methods.influence.direct import InfluenceArguments

    solvers = sorted(name for name in CATALOGUE if name.startswith("if"))
    assert solvers == ["if-arnoldi", "if-astra", "if-cg", "if-datainf", "if-ekfac", "if-explicit", "if-kfac",
                       "if-lissa"]  # the abstract base "if" is not a method
    for name in solvers:
        spec = CATALOGUE[name]
        assert spec.family is Family.PAIRWISE and spec.needs == () and issubclass(spec.arguments, InfluenceArguments)
        assert {"curvature", "damping"} <= {a.name for a in spec.argument_info()}
    task = AttributionTask(tiny_mlp)
    config = get_method("if-cg", task, damping=0.5, max_iter=7).config()
    assert {k: config[k] for k in ("curvature", "damping", "max_iter", "tol")} == {
        "curvature": "ggn", "damping": 0.5, "max_iter": 7, "tol": 1e-6}
    astra = get_method("if-astra", task).config()
    assert (astra["damping"], astra["weight_decay_term"], astra["iterations"]) == (None, True, 30)
    ekfac = get_method("if-ekfac", task)
    assert (ekfac.config()["damping"], ekfac.config()["weight_decay_term"]) == (None, False)
    assert "batch_size" not in ekfac.config() and "chunk" not in get_method("if-datainf", task).config()
    train, _ = tiny_data
    assert ekfac.fit(train).with_damping(2.0).config()["damping"] == 2.0
    with pytest.raises(TDAError, match=r"damping must be a number in \[0, inf\)"):
        ekfac.with_damping(-1.0)
    with pytest.raises(TDAError, match="unknown curvature 'hessian'; expected one of: fisher"):
        get_method("if-kfac", task, curvature="hessian")
    with pytest.raises(TDAError, match=r"iterations \(3\) must be >= rank \(5\)"):
        get_method("if-arnoldi", task, rank=5, iterations=3)
    with pytest.raises(TDAError, match="projection_dim is not supported by K-FAC/EK-FAC"):
        get_method("if-ekfac", task, projection_dim=4)


def test_astra_refuses_a_diverged_answer(digits_experiment):
    exp = digits_experiment
    with pytest.raises(TDAError, match=r"if-astra diverged: relative residual .*lower step \(now 2\)"):
        get_method("if-astra", exp.task(), step=2.0, momentum=0.99, iterations=60).fit(exp.split.train).attribute(
            exp.split.test.subset(range(3)))


def test_explicit_on_projected_features_is_the_influence_in_the_random_subspace(tiny_mlp, tiny_data):
    """Pᵀ H P from curvature products equals the projected autograd Hessian, and the scores follow."""
    train, test = tiny_data
    wd, lam = 0.05, 1.0
    task = AttributionTask(tiny_mlp, weight_decay=wd)
    got = get_method("if-explicit", task, curvature="hessian", damping=lam, projection_dim=16,
                     projection_kind="gaussian").fit(train)
    f, theta = _flat_objective(tiny_mlp, train.inputs, train.labels, wd)
    proj = got.projector._matrix().double()  # [p, k]
    hess = proj.T @ torch.autograd.functional.hessian(f, theta) @ proj
    g_tr, g_te = _grads(tiny_mlp, train.inputs, train.labels) @ proj, _grads(tiny_mlp, test.inputs, test.labels) @ proj
    want = g_te @ torch.linalg.solve(hess + lam * torch.eye(16, dtype=torch.float64), g_tr.T) / len(train)
    torch.testing.assert_close(got.attribute(test).scores.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(TDAError, match="projection_dim is not supported by if-cg; leave it None"):
        get_method("if-cg", task, projection_dim=16)


def test_astra_converges_to_the_explicit_solution_on_one_layer(tiny_data):
    """One Linear layer: ASTRA's damping D is a scalar λ, so (G + λI)⁻¹ is if-explicit's with damping=λ."""
    train, test = tiny_data
    torch.manual_seed(0)
    task = AttributionTask(nn.Linear(4, 3).double(), weight_decay=0.05)
    astra = get_method("if-astra", task, iterations=400, minibatch=len(train), precision="float64",
                       halve_every=1000).fit(train)
    lam = float(astra._damping_flat()[0])
    explicit = get_method("if-explicit", task, damping=lam).fit(train).attribute(test).scores
    got = astra.attribute(test).scores
    assert ((got - explicit).abs().max() / explicit.abs().max()) < 1e-4
    assert astra.residual_ < 1e-4


@pytest.mark.parametrize("options", [dict(padding=1), dict(padding=0, stride=2), dict(padding=2, dilation=2),
                                     dict(padding="same"), dict(padding="valid", stride=(2, 1)),
                                     dict(kernel_size=(3, 5), padding=(1, 2), stride=(1, 2))])
def test_conv_patches_equal_unfold(options):
    from tda_explorer.compute.engine.kfac import _patches, conv_padding

    options = dict(options)
    conv = nn.Conv2d(3, 4, options.pop("kernel_size", 3), **options)
    x = torch.randn(5, 3, 11, 13)
    expected = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv_padding(conv), conv.stride)
    assert torch.equal(_patches(conv, x), expected)


def _wide_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def test_explicit_on_a_model_wider_than_its_data_solves_through_the_kernel_exactly(tiny_data):
    """n·C = 60 outputs over the training set, p = 131 parameters: the Woodbury form (an n·C × n·C matrix) gives
    the p × p solve's scores, self-influence and default damping."""
    train, test = tiny_data
    model, wd, lam = _wide_mlp(), 0.02, 0.3
    task = AttributionTask(model, weight_decay=wd)
    method = get_method("if-explicit", task, damping=lam).fit(train)
    assert method.form_ == "kernel" and method.n_params > 3 * len(train)
    matrix = _ggn_from_jacobians(model, train, wd) + lam * torch.eye(method.n_params, dtype=torch.float64)
    g_tr, g_te = _grads(model, train.inputs, train.labels), _grads(model, test.inputs, test.labels)
    want = g_te @ torch.linalg.solve(matrix, g_tr.T) / len(train)
    torch.testing.assert_close(method.attribute(test).scores.double(), want, rtol=1e-4, atol=1e-7)
    want_self = (g_tr * torch.linalg.solve(matrix, g_tr.T).T).sum(1) / len(train)
    torch.testing.assert_close(method.self_influence().double(), want_self, rtol=1e-4, atol=1e-7)

    default = get_method("if-explicit", task).fit(train)  # 0.01 × the largest eigenvalue of GGN + wd·I
    largest = float(torch.linalg.eigvalsh(_ggn_from_jacobians(model, train, wd))[-1])
    assert default.form_ == "kernel" and default.damping_rule_ == "spectrum"
    assert default.lam_ == pytest.approx(0.01 * largest, rel=1e-3)


def test_explicit_too_large_for_memory_backs_off_to_a_subspace_unless_exact_was_chosen(tiny_data, monkeypatch):
    from tda_explorer.compute.methods.influence import direct
    from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning

    train, test = tiny_data
    task = AttributionTask(_wide_mlp(), weight_decay=0.01)
    monkeypatch.setattr(direct, "MEMORY_SHARE", 1e-9)
    monkeypatch.setattr(direct, "BACKOFF_PROJECTION", 32)
    with pytest.warns(SolverBackoffWarning, match="projection_dim=32"):
        method = get_method("if-explicit", task).fit(train)
    assert method.form_ == "projected" and method.projector.dim_out == 32
    assert method.attribute(test).scores.isfinite().all()
    with pytest.raises(TDAError, match="projection_dim=None was chosen explicitly"):
        get_method("if-explicit", task, projection_dim=None).fit(train)
