"""Curvature products bounded in memory: the (direction, row) pairs of one vectorised call follow ``max_memory``, and
products split over directions and rows equal the products made in one call."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.engine.curvature import Curvature


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_products_split_to_the_memory_budget_equal_one_call(tiny_data, kind):
    train, _ = tiny_data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    task = AttributionTask(model, weight_decay=0.01)
    roomy = Curvature(task, train, kind)
    vectors = torch.randn(7, roomy.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert roomy.pairs_per_call() >= 7 * len(train)  # one call holds them all
    want = roomy.matvec(vectors)
    for budget in (1, 3 * 8 * 64, 20 * 8 * 64):  # a pair at a time; part of the rows; several directions, every row
        tight = Curvature(task, train, kind, max_memory=budget)
        assert tight.pairs_per_call() < 7 * len(train)
        torch.testing.assert_close(tight.matvec(vectors), want, rtol=1e-10, atol=1e-12)


def test_the_pair_estimate_grows_with_the_activations_and_the_kind():
    torch.manual_seed(0)
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 2, (10,))
    data = AttributionDataset(x, y)
    small = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    wide = nn.Sequential(nn.Linear(8, 400), nn.ReLU(), nn.Linear(400, 2)).double()
    pairs = {(name, kind): Curvature(AttributionTask(m), data, kind).pairs_per_call()
             for name, m in (("small", small), ("wide", wide)) for kind in ("ggn", "hessian")}
    assert pairs["wide", "ggn"] < pairs["small", "ggn"] / 20  # ~100× the activations
    assert pairs["small", "hessian"] < pairs["small", "ggn"]


def _tiny_cnn_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 36, generator=gen, dtype=torch.float64)
    return AttributionTask(model, weight_decay=0.01), AttributionDataset(x, torch.randint(0, 3, (24,), generator=gen))


def test_products_through_the_ggn_factor_equal_the_vectorised_ones_on_minibatches_too():
    """A convolution's forward costs more than 4·C·p per example, so its GGN products go through the factor A
    ((VAᵀ)A): equal to the vectorised products over the whole set, a minibatch and a minibatch of a minibatch."""
    task, train = _tiny_cnn_task()
    factored = Curvature(task, train, "ggn")
    plain = Curvature(task, train, "ggn")
    plain._shared["a"] = None  # the vectorised path
    vectors = torch.randn(5, factored.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(factored.matvec(vectors), plain.matvec(vectors), rtol=1e-10, atol=1e-12)
    assert factored._shared["a"] is not None and factored._shared["a"].shape == (24 * 3, factored.dim)
    rows, inner = torch.tensor([3, 7, 8, 20, 21, 0]), torch.tensor([1, 4])
    for a, b in ((factored.on_rows(rows), plain.on_rows(rows)),
                 (factored.on_rows(rows).on_rows(inner), plain.on_rows(rows).on_rows(inner))):
        torch.testing.assert_close(a.matvec(vectors), b.matvec(vectors), rtol=1e-10, atol=1e-12)
    lazy = Curvature(task, AttributionDataset.from_torch(TensorDataset(train.inputs, train.labels), batch_size=5),
                     "ggn")  # a torch Dataset read in batches takes the factor too, its views the same rows
    torch.testing.assert_close(lazy.matvec(vectors), plain.matvec(vectors), rtol=1e-10, atol=1e-12)
    assert lazy._shared["a"] is not None
    torch.testing.assert_close(lazy.on_rows(rows).on_rows(inner).matvec(vectors),
                               plain.on_rows(rows).on_rows(inner).matvec(vectors), rtol=1e-10, atol=1e-12)
    assert Curvature(task, train, "hessian").factor() is None  # the Hessian has no such factor
    # a linear model's forward is 2p flops: with 10 classes A's 40p multiply-adds exceed FACTOR_EFFICIENCY × 2p, so the
    # vectorised products are used; with 3, A's 12p are below it
    wide = AttributionTask(nn.Sequential(nn.Linear(36, 10)).double())
    assert Curvature(wide, train, "ggn").factor() is None
    narrow = AttributionTask(nn.Sequential(nn.Linear(36, 3)).double())
    assert Curvature(narrow, train, "ggn").factor() is not None


def test_a_curvature_in_another_precision_shares_the_factor_already_built():
    """LiSSA's float32 products reuse the float64 curvature's factor, cast, instead of building it again."""
    task, train = _tiny_cnn_task()
    root = Curvature(task, train, "ggn")
    vectors = torch.randn(5, root.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([2, 5, 11, 17])
    want = root.on_rows(rows).matvec(vectors)  # builds A (float64)
    single = root.in_precision(torch.float32)
    assert single.dtype == torch.float32 and single._shared["a"].dtype == torch.float32
    torch.testing.assert_close(single._shared["a"].double(), root._shared["a"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(single.on_rows(rows).matvec(vectors).double(), want, rtol=1e-4, atol=1e-6)
    fresh = Curvature(task, train, "ggn").in_precision(torch.float32)  # nothing built yet: it decides for itself
    assert "a" not in fresh._shared and fresh.factor() is not None



def test_the_ggn_factor_is_the_same_whichever_vectorised_form_builds_it():
    """By default the first chunk is built both ways and the faster builds the rest; either form gives the factor
    whose AᵀA is the GGN's product (less the weight decay), over chunks that do not divide the rows."""
    task, train = _tiny_cnn_task()
    curvature = Curvature(task, train, "ggn")
    plain = Curvature(task, train, "ggn")
    plain._shared["a"] = None  # the vectorised products
    vectors = torch.randn(3, curvature.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = plain.matvec(vectors) - curvature.wd * vectors
    factors = {form: curvature.ggn_factor(chunk=5, form=form) for form in ("jacobian", "per class", None)}
    for factor in factors.values():
        torch.testing.assert_close((vectors @ factor.T) @ factor, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors["jacobian"], factors["per class"], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="form must be one of"):
        curvature.ggn_factor(form="hessian")


class _Attention(nn.Module):
    """One self-attention layer and a linear head: fused scaled dot-product attention (what a Hugging Face model's
    default "sdpa" attention calls), or the same arithmetic written out."""

    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.head, self.fused = nn.Linear(4, 12), nn.Linear(4, 3), fused

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # 2 heads of 2
        if self.fused:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / 2.0 ** 0.5, dim=-1) @ v
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_products_through_fused_attention_equal_those_of_the_written_out_one(kind, monkeypatch):
    """Fused attention has no forward-mode derivative, which every vectorised curvature product takes (the GGN's
    factor, taken in reverse mode, is kept out here): the products run it in its composite form, and equal those of
    the written-out attention."""
    from tda_explorer.compute.engine import curvature

    monkeypatch.setattr(curvature, "FACTOR_MEMORY", 0)
    gen = torch.Generator().manual_seed(1)
    data = AttributionDataset(torch.randn(10, 5, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen))
    vectors = torch.randn(3, sum(p.numel() for p in _Attention(True).parameters()), generator=gen)
    fused = Curvature(AttributionTask(_Attention(True)), data, kind).matvec(vectors)
    written = Curvature(AttributionTask(_Attention(False)), data, kind).matvec(vectors)
    torch.testing.assert_close(fused, written, rtol=1e-4, atol=1e-6)
