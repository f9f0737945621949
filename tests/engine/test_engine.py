"""Engine parts: streamed projection (JL), feature store (hits, invalidation, damage), TRAK closed form."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute import GradDot
from tda_explorer.compute.engine.losses import neg_margin
from tda_explorer.compute.engine.projection import RandomProjector
from tda_explorer.compute.engine.store import FeatureStore
from tda_explorer.compute.methods.trak import DEFAULT_DAMPING
from tda_explorer.data import AttributionDataset


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products_within_jl_tolerance(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5000, generator=gen)
    k = 2048
    proj = RandomProjector(5000, k, kind=kind, seed=1)
    px = proj.project(x)
    exact, approx = x @ x.T, px @ px.T
    norms = x.norm(dim=1)
    rel = (approx - exact).abs() / torch.outer(norms, norms)
    # JL: |<Px,Py> - <x,y>| <= eps ||x|| ||y|| with eps ~ c / sqrt(k); 4/sqrt(k) = 0.088
    assert rel.max() < 4 / k**0.5
    assert rel.mean() < 1 / k**0.5


def test_streamed_projection_equals_cached_matrix_and_is_seeded():
    x = torch.randn(7, 1000)
    dense = RandomProjector(1000, 64, seed=3, block_rows=128)
    streamed = RandomProjector(1000, 64, seed=3, block_rows=128, cache_bytes=0)
    assert streamed._dense is None and dense._dense is not None
    torch.testing.assert_close(dense.project(x), streamed.project(x), rtol=1e-5, atol=1e-5)
    other = RandomProjector(1000, 64, seed=4, block_rows=128)
    assert not torch.allclose(dense.project(x), other.project(x))


def test_projected_grad_dot_is_close_to_unprojected(tiny_data):
    train, test = tiny_data
    torch.manual_seed(0)
    task = AttributionTask(nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3)).double())
    exact_method = GradDot(task).fit(train)
    exact = exact_method.attribute(test).scores
    k = 200
    projected = GradDot(task, projection_dim=k, projection_seed=0)
    assert projected.projector is not None and projected.n_params > k
    approx = projected.fit(train).attribute(test).scores
    assert projected.train_grads_.shape == (len(train), k)
    scale = torch.outer(exact_method._features(test, test=True).norm(dim=1), exact_method.train_norms_).float()
    assert ((approx - exact).abs() / scale).max() < 4 / k**0.5
    assert np.corrcoef(approx.flatten(), exact.flatten())[0, 1] > 0.9


def test_feature_store_hit_miss_and_invalidation(tiny_mlp, tiny_data, tmp_path):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp)
    store = FeatureStore(tmp_path, dtype="float32")
    first = GradDot(task, store=store).fit(train).train_grads_
    assert (store.hits, store.misses) == (0, 1)
    second = GradDot(task, store=store).fit(train).train_grads_
    assert (store.hits, store.misses) == (1, 1)
    torch.testing.assert_close(first, second)
    with torch.no_grad():
        tiny_mlp[0].weight[0, 0] += 1e-3  # a changed parameter must not reuse the cache
    GradDot(task, store=store).fit(train)
    assert store.misses == 2
    assert len(list(tmp_path.glob("*.npy"))) == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage(dtype, tmp_path):
    store = FeatureStore(tmp_path, dtype=dtype)
    x = torch.randn(5, 9)
    back = store.put("k", x)
    again = store.get("k")
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, back)
    torch.testing.assert_close(again, x, rtol=1e-2, atol=1e-2)


def test_damaged_store_entry_is_recomputed_with_warning(tmp_path):
    store = FeatureStore(tmp_path)
    store.put("k", torch.randn(50, 10))
    data_file = next(tmp_path.glob("k.*.npy"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated by a crash or a full disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.get("k") is None
    assert any("damaged" in str(w.message) for w in caught)


def test_trak_matches_closed_form_on_linear_model():
    """Single model, no projection: τ = φ′ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ ⊙ (1 − p), built here from explicit gradients."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (25,), generator=gen)
    model = nn.Linear(3, 3).double()
    train, test = AttributionDataset(x[:20], y[:20]), AttributionDataset(x[20:], y[20:])
    task = AttributionTask(model, weight_decay=0.01)
    got = get_method("trak", task).fit(train).attribute(test).scores.double()

    def margin_grads(xs, ys):
        rows = []
        for xi, yi in zip(xs, ys):
            model.zero_grad()
            neg_margin(model(xi[None]), yi[None]).sum().backward()
            rows.append(torch.cat([model.weight.grad.flatten(), model.bias.grad]))
        return torch.stack(rows)

    phi, phi_test = margin_grads(train.inputs, train.labels), margin_grads(test.inputs, test.labels)
    # the default λ: DEFAULT_DAMPING × the mean diagonal of ΦᵀΦ (12 parameters < 20 examples); weight decay ignored
    lam = DEFAULT_DAMPING * float(phi.square().sum()) / 12
    kernel = phi_test @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(12, dtype=torch.float64), phi.T)
    with torch.no_grad():
        q = 1 - model(train.inputs).softmax(1)[torch.arange(20), train.labels]
    torch.testing.assert_close(got, kernel * q, rtol=1e-4, atol=1e-6)


def test_trak_self_influence_is_diagonal(tiny_mlp, tiny_data):
    train, _ = tiny_data
    method = get_method("trak", AttributionTask(tiny_mlp), damping=0.1).fit(train)
    full = method.attribute(train).scores
    torch.testing.assert_close(method.self_influence(), full.diagonal(), rtol=1e-4, atol=1e-6)


def test_trak_ensembles_average_members(tiny_mlp, tiny_data):
    train, test = tiny_data
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    task = AttributionTask(tiny_mlp)
    both = get_method("trak", task, models=[tiny_mlp, other], damping=0.1).fit(train)
    assert len(both.members) == 2
    s1 = get_method("trak", AttributionTask(tiny_mlp), damping=0.1).fit(train)
    s2 = get_method("trak", AttributionTask(other), damping=0.1).fit(train)
    raw = lambda m, t: m._attribute(t) / m.q_
    expected = (raw(s1, test) + raw(s2, test)) / 2 * (s1.q_ + s2.q_) / 2
    torch.testing.assert_close(both.attribute(test).scores.double(), expected.double().float().double(),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(TDAError, match="n_checkpoints=3 but the task has 0 checkpoints"):
        get_method("trak", task, n_checkpoints=3)


def test_dropout_ensemble_uses_consistent_masks(tiny_data):
    train, test = tiny_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    task = AttributionTask(model, weight_decay=0.01)
    a = get_method("trak", task, dropout_masks=4).fit(train).attribute(test).scores
    b = get_method("trak", task, dropout_masks=4, max_memory=3 * 8 * 200).fit(train).attribute(test).scores
    torch.testing.assert_close(a, b)  # masks identical across chunks and runs
    plain = get_method("trak", task).fit(train).attribute(test).scores
    assert not torch.allclose(a, plain)
    assert not model.training
    with pytest.raises(TDAError, match="no Dropout module"):
        get_method("trak", AttributionTask(nn.Linear(4, 3).double()), dropout_masks=2).fit(train)


def test_config_fingerprint_is_stable_across_sessions():
    from tda_explorer.compute import TrainConfig
    from tda_explorer.compute.engine.fingerprint import config_fingerprint
    from tda_explorer.experiments.digits import Experiment

    a = config_fingerprint({"model_factory": Experiment.factory, "train_config": TrainConfig(epochs=3)})
    b = config_fingerprint({"model_factory": Experiment.factory, "train_config": TrainConfig(epochs=3)})
    c = config_fingerprint({"model_factory": Experiment.factory, "train_config": TrainConfig(epochs=4)})
    assert a == b != c
    assert config_fingerprint({"p": torch.ones(3)}) != config_fingerprint({"p": torch.zeros(3)})
