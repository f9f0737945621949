"""No default fails: the iterative influence solvers back off by themselves (backoff.py), explicit settings raise.

Each scenario makes a default truly fail on a small float64 tabular MLP (scikit-learn's make_classification):
an over-fitted model without weight decay (CG misses its tolerance at the default damping), and one with a
pair of identical, oppositely labelled large-norm inputs that the model cannot fit, whose curvature a small
minibatch blows up (the default LiSSA scale and ASTRA step diverge). Answers after the back-off are checked
against the exact influence at the settings finally used, computed independently with a dense matrix.
"""

import warnings

import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import make_classification
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask, TDAError, get_method
from tda_explorer.compute.engine.curvature import Curvature
from tda_explorer.compute.methods.influence import direct
from tda_explorer.compute.methods.influence.backoff import DAMPING_RAISES, HALVINGS, Diverged, SolverBackoffWarning


def _tabular(n_train: int, n_test: int, outlier: int | None = None, factor: float = 10.0):
    x, y = make_classification(n_samples=n_train + n_test, n_features=6, n_informative=4, n_redundant=0,
                               n_classes=3, random_state=0)
    x, y = torch.tensor(x), torch.tensor(y)
    x = (x - x.mean(0)) / x.std(0)
    if outlier is not None:  # two copies of one large input with different labels: never fitted, high curvature
        x[outlier] = x[outlier + 1] = factor * x[0]
        y[outlier + 1] = (y[outlier] + 1) % 3
    return (AttributionDataset(x[:n_train], y[:n_train], name="train"),
            AttributionDataset(x[n_train:], y[n_train:], name="test"))


def _trained(train: AttributionDataset, steps: int, wd: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(train.inputs), train.labels)
        (loss + 0.5 * wd * sum((p**2).sum() for p in model.parameters())).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def overfitted():
    """Over-fitted without weight decay: a default damping level of 1e-6 × the largest eigenvalue (set by the CG test;
    the shipped 0.01 converges here) is too small for CG."""
    train, test = _tabular(100, 20)
    return AttributionTask(_trained(train, 1000, 0.0)), train, test


@pytest.fixture(scope="module")
def outliers():
    """An unfittable large-norm pair at rows 10, 11, which the 8 minibatches of the LiSSA scale estimate miss."""
    train, test = _tabular(160, 40, outlier=10)
    return AttributionTask(_trained(train, 300, 1e-2), weight_decay=1e-2), train, test


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


def _backoff_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SolverBackoffWarning)]


@pytest.mark.slow
def test_cg_raises_a_default_damping_that_misses_tol_and_matches_the_explicit_solve(overfitted, monkeypatch):
    monkeypatch.setattr(direct, "DAMPING_LEVEL", 1e-6)  # a default level too small for CG (as 1e-3 × trace/p was)
    task, train, test = overfitted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cg = get_method("if-cg", task).fit(train)
        scores = cg.attribute(test).scores
    said = _backoff_warnings(caught)
    assert said and all("raised the damping 10×" in s for s in said), said
    default = cg.solver_report_["settings"]["damping"] / 10 ** len(said)
    assert cg.residual_ <= 1e-6 and torch.isfinite(scores).all()
    assert cg.config()["solver_backoff"]["settings"] == {"damping": cg.lam_}
    exact = get_method("if-explicit", task, damping=cg.lam_).fit(train)
    torch.testing.assert_close(scores.double(), exact.attribute(test).scores.double(), rtol=1e-4, atol=1e-6)
    assert _spearman(scores, exact.attribute(test).scores) > 0.99
    # block CG self-influence starts at the damping found and equals the explicit diagonal
    torch.testing.assert_close(cg.self_influence(), exact.self_influence(), rtol=1e-4, atol=1e-7)
    # the damping the policy started from, chosen explicitly, raises and names it
    with pytest.raises(TDAError, match=r"CG did not converge .*chosen explicitly: damping="):
        get_method("if-cg", task, damping=default).fit(train).attribute(test)
    with pytest.raises(TDAError, match=r"chosen explicitly: max_iter=200"):
        get_method("if-cg", task, max_iter=200).fit(train).attribute(test)


@pytest.mark.slow
def test_lissa_doubles_a_default_scale_that_diverges_and_tracks_the_exact_influence(outliers, monkeypatch):
    monkeypatch.setattr(direct, "DAMPING_LEVEL", 1e-6)  # the shipped level's λ alone keeps this scale stable
    task, train, test = outliers
    with warnings.catch_warnings(record=True) as caught:  # the last iterate (average=False) at the default scale
        warnings.simplefilter("always")
        lissa = get_method("if-lissa", task, minibatch=8, average=False).fit(train)
        default_scale = lissa.scale_
        scores = lissa.attribute(test).scores
    said = _backoff_warnings(caught)
    assert said and "default step diverged" in said[0] and "halved it (1 of 3)" in said[0], said
    assert torch.isfinite(scores).all() and lissa.residual_ < 1
    assert lissa.solver_report_["settings"]["scale"] == pytest.approx(2 ** len(said) * default_scale)
    exact = get_method("if-explicit", task, damping=lissa.lam_).fit(train).attribute(test).scores
    assert _spearman(scores, exact) >= 0.9
    with pytest.raises(TDAError, match=r"if-lissa diverged.*chosen explicitly: scale="):
        get_method("if-lissa", task, minibatch=8, scale=default_scale, average=False).fit(train).attribute(test)
    # the default, the iterates averaged over the second half, needs no back-off at that scale and is nearer the exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        averaged = get_method("if-lissa", task, minibatch=8).fit(train)
        averaged_scores = averaged.attribute(test).scores
    assert not _backoff_warnings(caught) and averaged.scale_ == default_scale and averaged.residual_ < 0.5
    exact = get_method("if-explicit", task, damping=averaged.lam_).fit(train).attribute(test).scores
    assert _spearman(averaged_scores, exact) >= 0.95


@pytest.mark.slow
def test_astra_halves_a_default_step_that_diverges_and_tracks_the_exact_influence(outliers):
    task, train, test = outliers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        astra = get_method("if-astra", task, minibatch=16, iterations=150).fit(train)
        scores = astra.attribute(test).scores
    said = _backoff_warnings(caught)
    assert said and said[0].startswith("if-astra: the default step diverged"), said
    assert torch.isfinite(scores).all() and astra.residual_ < 1 and astra.solver_report_["fallback"] is None
    settings = astra.config()["solver_backoff"]["settings"]
    assert settings["step"] < 1 and settings["damping"] == astra.args.damping
    # exact: (G + D)⁻¹ with the dense GGN of the objective and ASTRA's per-layer damping D, in float64
    matrix = Curvature(task, train, "ggn").dense() + torch.diag(astra._damping_flat())
    g_test = astra._features(test, test=True).double()
    exact = g_test @ torch.linalg.solve(matrix, astra.g_train_.T) / len(train)
    assert _spearman(scores, exact) >= 0.9
    with pytest.raises(TDAError, match=r"if-astra diverged.*lower step \(now 1\).*chosen explicitly: step=1.0"):
        get_method("if-astra", task, minibatch=16, iterations=150, step=1.0).fit(train).attribute(test)


@pytest.mark.parametrize(("method", "attempt", "halvings"), [
    ("if-cg", "_attempt", 0), ("if-lissa", "_attempt", HALVINGS), ("if-astra", "_attempt", HALVINGS),
    ("if-arnoldi", "_keep", 0)])
def test_every_stage_failing_falls_back_to_ekfac(tiny_mlp, tiny_data, monkeypatch, method, attempt, halvings):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)

    def never(self, rhs):
        raise Diverged(float("inf"), f"{method} diverged (patched)")

    solver = get_method(method, task, **({"depth": 5} if method == "if-lissa" else {}))
    monkeypatch.setattr(type(solver), attempt, never)
    with pytest.warns(SolverBackoffWarning) as caught:
        solver.fit(train)
        scores = solver.attribute(test).scores
    said = _backoff_warnings(caught)
    assert len(said) == halvings + DAMPING_RAISES + 1 and "fell back to the EK-FAC solution" in said[-1], said
    assert all("halved it" in s for s in said[:halvings]) and "raised the damping" in said[halvings]
    ekfac = get_method("if-ekfac", task).fit(train)
    torch.testing.assert_close(scores, ekfac.attribute(test).scores, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(solver.self_influence(), ekfac.self_influence(), rtol=1e-4, atol=1e-7)
    assert solver.config()["solver_backoff"]["fallback"] == "if-ekfac"
    if method == "if-cg":  # a model EK-FAC cannot factor: the failure is a TDAError that says so
        odd = AttributionTask(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverBackoffWarning)
            with pytest.raises(TDAError, match="EK-FAC fallback is unavailable too: .*nn.Conv1d and nn.Conv2d"):
                get_method("if-cg", odd).fit(train).attribute(test)


@pytest.mark.parametrize("preconditioner", ["none", "ekfac"])
def test_block_cg_self_influence_equals_per_example_solves_and_explicit(tiny_mlp, tiny_data, preconditioner):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    cg = get_method("if-cg", task, damping=0.1, tol=1e-10, preconditioner=preconditioner).fit(train)
    block = cg.self_influence().double()
    g = cg.g_train_
    single = torch.stack([(cg._solve(g[i : i + 1]) * g[i : i + 1]).sum() for i in range(len(train))]) / len(train)
    torch.testing.assert_close(block, single, rtol=1e-5, atol=1e-8)
    explicit = get_method("if-explicit", task, damping=0.1).fit(train)
    torch.testing.assert_close(block, explicit.self_influence().double(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(cg.attribute(test).scores, explicit.attribute(test).scores, rtol=1e-4, atol=1e-7)
    assert cg.solver_report_["stages"] == [] and "solver_backoff" not in cg.config()
