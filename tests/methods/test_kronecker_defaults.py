"""K-FAC / EK-FAC defaults (issue #27): the expected Fisher against loops over classes, the default's handling of
modules it cannot factor, and the documented default-selection rule."""

import warnings

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.engine.kfac import (
    EXPECTED_MAX_CLASSES,
    corrected_eigenvalues,
    eigenbases,
    layer_covariances,
    output_curvature_roots,
)
from tda_explorer.compute.engine.losses import IGNORE
from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning
from tda_explorer.compute.methods.influence.ekfac import UntrackedModulesWarning
from tda_explorer.data.dataset import AttributionDataset


def _per_class_layer_grads(model, x, layer_names):
    """Per example i and class c: p_ic and each layer's [weight | bias] gradient of CE(model(x_i), c), by loops."""
    modules = dict(model.named_modules())
    out = []
    for i in range(len(x)):
        logits = model(x[i:i + 1])
        p = logits.softmax(-1)[0].detach()
        rows = []
        for c in range(logits.shape[-1]):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), torch.tensor([c])).backward()
            rows.append([torch.cat([modules[n].weight.grad, modules[n].bias.grad[:, None]], 1).clone()
                         for n in layer_names])
        out.append((p, rows))
    return out


def test_expected_fisher_equals_sum_over_classes_by_loops(tiny_mlp, tiny_data):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp)
    names = ["0", "2"]
    covs = layer_covariances(task, train, "expected", batch_size=7)
    per = _per_class_layer_grads(tiny_mlp, train.inputs, names)
    n = len(train)
    for k, name in enumerate(names):
        a = torch.cat([tiny_mlp[0](train.inputs).tanh() if name == "2" else train.inputs,
                       torch.ones(n, 1, dtype=torch.float64)], 1)
        cov_a = a.T @ a / n
        cov_s = sum(p[c] * torch.outer(g[k][:, -1], g[k][:, -1]) for p, rows in per
                    for c, g in enumerate(rows)) / n  # the bias column of G is s
        torch.testing.assert_close(covs[name][0], cov_a)
        torch.testing.assert_close(covs[name][1], cov_s)
    # EK-FAC's refit eigenvalues: E_i Σ_c p_ic (Q_Sᵀ G_ic Q_A)², by loops
    factors, _ = corrected_eigenvalues(task, train, eigenbases(covs), "expected", batch_size=7)
    for k, f in enumerate(factors):
        want = sum(p[c] * (f.q_s.T @ g[k] @ f.q_a) ** 2 for p, rows in per for c, g in enumerate(rows)) / n
        torch.testing.assert_close(f.eigenvalues, want)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_output_curvature_roots_are_c_minus_1_square_roots_of_the_softmax_curvature(classes):
    """Σ_k v_k v_kᵀ = diag(p) − ppᵀ = Σ_c p_c (p − e_c)(p − e_c)ᵀ example by example, from C − 1 cotangents; an ignored
    label's row is zero."""
    gen = torch.Generator().manual_seed(classes)
    logits = 3 * torch.randn(6, classes, generator=gen, dtype=torch.float64)
    labels = torch.arange(6) % classes
    labels[4] = IGNORE
    roots = output_curvature_roots(logits, labels)
    assert len(roots) == classes - 1
    got = sum(v[:, :, None] * v[:, None, :] for v in roots)
    p = logits.softmax(-1)
    eye = torch.eye(classes, dtype=torch.float64)
    want = sum(p[:, c, None, None] * (p - eye[c])[:, :, None] * (p - eye[c])[:, None, :] for c in range(classes))
    want[4] = 0
    torch.testing.assert_close(got, want)


def test_expected_fisher_of_a_convolution_equals_sum_over_classes_by_loops():
    """Several positions per example (a convolution's output pixels): the C − 1 rows give the per-class loops'
    covariances and refit eigenvalues, E_i Σ_c p_ic (Q_Sᵀ G_ic Q_A)² with G_ic = Σ_t s_t a_tᵀ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    gen = torch.Generator().manual_seed(2)
    train = AttributionDataset(torch.randn(9, 1, 5, 5, generator=gen, dtype=torch.float64), torch.arange(9) % 3)
    task = AttributionTask(model)
    covs = layer_covariances(task, train, "expected", batch_size=4)
    factors, _ = corrected_eigenvalues(task, train, eigenbases(covs), "expected", batch_size=4)
    conv = model[0]
    want_s, want_lam = 0, 0
    for i in range(len(train)):
        x = train.inputs[i:i + 1]
        p = model(x).softmax(-1)[0].detach()
        for c in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), torch.tensor([c])).backward()
            g = torch.cat([conv.weight.grad.flatten(1), conv.bias.grad[:, None]], 1)
            want_lam = want_lam + p[c] * (factors[0].q_s.T @ g @ factors[0].q_a) ** 2
            # S = E[Σ_t s_t s_tᵀ]: the output gradients at each pixel, from a hook-free recomputation
            out = conv(x)
            out.retain_grad()
            model.zero_grad()
            nn.functional.cross_entropy(model[3](model[2](model[1](out))), torch.tensor([c])).backward()
            s = out.grad[0].flatten(1)
            want_s = want_s + p[c] * s @ s.T
    torch.testing.assert_close(covs["0"][1], want_s / len(train))
    torch.testing.assert_close(factors[0].eigenvalues, want_lam / len(train))


def test_expected_fisher_is_the_mean_of_sampled_fishers(tiny_mlp, tiny_data):
    """The sampled true Fisher estimates the expected one: their difference shrinks as samples are averaged."""
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp)
    exact = layer_covariances(task, train, "expected")["2"][1]
    sampled = torch.stack([layer_covariances(task, train, "true", seed=s)["2"][1] for s in range(200)]).mean(0)
    assert (sampled - exact).norm() < 0.1 * exact.norm()


def test_expected_fisher_falls_back_to_a_sampled_label_for_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)).double()
    x = torch.randint(0, 7, (6, 5))
    data = AttributionDataset(x, torch.randint(0, 7, (6, 5)))
    task = AttributionTask(model, parameters=["1"])
    torch.testing.assert_close(layer_covariances(task, data, "expected")["1"][1],
                               layer_covariances(task, data, "true")["1"][1])
    assert EXPECTED_MAX_CLASSES >= 10


def _cnn_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 3)).double().eval()


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_default_parameters_skip_batchnorm_with_a_warning(method):
    model = _cnn_bn()
    gen = torch.Generator().manual_seed(1)
    train = AttributionDataset(torch.randn(12, 1, 6, 6, generator=gen, dtype=torch.float64), torch.arange(12) % 3)
    test = AttributionDataset(torch.randn(4, 1, 6, 6, generator=gen, dtype=torch.float64), torch.arange(4) % 3)
    with pytest.warns(UntrackedModulesWarning, match=r"skips 1 \(BatchNorm2d\)"):
        attributor = get_method(method, AttributionTask(model))
    assert issubclass(UntrackedModulesWarning, SolverBackoffWarning)
    assert attributor.skipped_modules_ == ["1 (BatchNorm2d)"]
    assert attributor.config()["task"]["parameters"] == ["0", "4"]
    scores = attributor.fit(train).attribute(test).scores
    assert scores.shape == (4, 12) and torch.isfinite(scores).all()
    assert torch.isfinite(attributor.self_influence()).all()


def test_explicit_untrackable_parameters_raise_naming_them():
    model = _cnn_bn()
    with pytest.raises(TDAError, match=r"1 \(BatchNorm2d\).*can track in this model: \['0', '4'\]"):
        get_method("if-ekfac", AttributionTask(model, parameters=["0", "1", "4"]))


def test_no_warning_when_every_module_is_trackable(tiny_mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_method("if-ekfac", AttributionTask(tiny_mlp))


def test_default_rule_expected_fisher_and_its_documented_fallbacks(tiny_mlp, tiny_data):
    """The default Fisher is the expected one (chosen across the zoo); beyond EXPECTED_MAX_CLASSES classes it takes
    one sampled label per example, as fisher='true'."""
    from tda_explorer.compute.methods.influence.ekfac import EKFACArguments

    assert EKFACArguments().fisher == "expected" and EKFACArguments().damping is None  # None: matched
    train, test = tiny_data
    default = get_method("if-ekfac", AttributionTask(tiny_mlp)).fit(train)
    explicit = get_method("if-ekfac", AttributionTask(tiny_mlp), fisher="expected").fit(train)
    torch.testing.assert_close(default.attribute(test).scores, explicit.attribute(test).scores)
    expected = layer_covariances(AttributionTask(tiny_mlp), train, "expected")
    empirical = layer_covariances(AttributionTask(tiny_mlp), train, "empirical")
    assert all(not torch.allclose(expected[k][1], empirical[k][1]) for k in expected)  # the default is not empirical
    torch.manual_seed(0)
    wide = nn.Linear(3, EXPECTED_MAX_CLASSES + 1).double()
    data = AttributionDataset(torch.randn(8, 3, dtype=torch.float64), torch.arange(8))
    task = AttributionTask(wide)
    torch.testing.assert_close(layer_covariances(task, data, "expected")[""][1],
                               layer_covariances(task, data, "true")[""][1])


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_thin_basis_of_a_wide_layer_equals_the_full_eigendecomposition(method, monkeypatch):
    """A layer with fewer training patches than half its width is factored in the span of its patches (the Gram
    matrix's N×N eigenproblem): scores, self-influence and the preconditioner equal those of the full basis."""
    from tda_explorer.compute.engine import kfac

    torch.manual_seed(0)
    train = AttributionDataset(torch.randn(40, 100, dtype=torch.float64), torch.randint(0, 3, (40,)))
    test = AttributionDataset(torch.randn(7, 100, dtype=torch.float64), torch.randint(0, 3, (7,)))
    model = nn.Sequential(nn.Linear(100, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    thin = get_method(method, AttributionTask(model), damping=0.01).fit(train)
    assert [f.width for f in thin.factors_] == [101, None] and thin.factors_[0].q_a.shape == (101, 40)
    covariances = kfac.layer_covariances  # without rows kept, every layer's A is formed and factored in full
    monkeypatch.setattr(kfac, "layer_covariances", lambda *args, rows=None, **kwargs: covariances(*args, **kwargs))
    full = get_method(method, AttributionTask(model), damping=0.01).fit(train)
    assert full.factors_[0].q_a.shape == (101, 101)
    assert thin.factors_[0].mean_eigenvalue() == pytest.approx(full.factors_[0].mean_eigenvalue(), rel=1e-9)
    torch.testing.assert_close(thin.attribute(test).scores, full.attribute(test).scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(thin.self_influence(), full.self_influence(), rtol=1e-5, atol=1e-7)
    v = torch.randn(3, thin.n_params, dtype=torch.float64)
    torch.testing.assert_close(thin._precondition(v), full._precondition(v), rtol=1e-9, atol=1e-9)


def _cnn_data():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, 6, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    return model, AttributionDataset(x[:37], y[:37], name="cnn-train"), AttributionDataset(x[37:], y[37:])


@pytest.mark.parametrize("method", ["if-ekfac", "if-kfac"])
def test_recomputed_training_gradients_give_the_held_ones_scores(method):
    """keep_gradients=False holds no [n, width] matrix and recomputes the training gradients a batch at a time at every
    query: the same scores and self-influence as holding them, over batches that do not divide n, and the model's
    training mode is given back."""
    model, train, test = _cnn_data()
    task = AttributionTask(model, weight_decay=1e-2)
    held = get_method(method, task, batch_size=8, keep_gradients=True).fit(train)
    model.train()
    streamed = get_method(method, task, batch_size=8, keep_gradients=False).fit(train)
    assert held.train_rot_.shape[0] == len(train) and streamed.train_rot_ is None
    torch.testing.assert_close(streamed.attribute(test).scores, held.attribute(test).scores)
    torch.testing.assert_close(streamed.self_influence(), held.self_influence())
    assert model.training


def test_by_default_the_training_gradients_are_held_only_within_max_memory():
    model, train, test = _cnn_data()
    task = AttributionTask(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert get_method("if-ekfac", task).fit(train).train_rot_ is not None  # a few kB: held
    tight = get_method("if-ekfac", task, max_memory=8 * n_params * len(train) - 1).fit(train)
    roomy = get_method("if-ekfac", task, max_memory=8 * n_params * len(train)).fit(train)
    assert tight.train_rot_ is None and roomy.train_rot_ is not None
    torch.testing.assert_close(tight.attribute(test).scores, roomy.attribute(test).scores)


def test_a_streamed_fit_stores_and_reads_back_its_factors_only(tmp_path):
    from tda_explorer.compute.engine.store import FeatureStore

    model, train, test = _cnn_data()
    task = AttributionTask(model)
    store = FeatureStore(tmp_path)
    first = get_method("if-ekfac", task, store=store, keep_gradients=False).fit(train)
    again = get_method("if-ekfac", task, store=store, keep_gradients=False).fit(train)
    assert store.hits == 1 and again.train_rot_ is None
    torch.testing.assert_close(again.attribute(test).scores, first.attribute(test).scores)
    held = get_method("if-ekfac", task, store=store).fit(train)  # a held fit is another entry, with its rows
    assert store.hits == 1 and held.train_rot_ is not None
