"""``AttributionDataset.from_torch``: a map-style torch Dataset read lazily in batches, by one access rule shared
with the in-memory dataset (``batches``), and ``to_device`` for tensor, tuple and dict batches."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from tda_explorer import TDAError
from tda_explorer.data import AttributionDataset, ImageRenderer
from tda_explorer.data.batching import Batch, to_device


class Counted(Dataset):
    """Dict items, counting every read, so laziness can be checked."""

    def __init__(self, n: int):
        self.x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        self.reads += 1
        return {"x": self.x[i], "mask": torch.ones(3, dtype=torch.long), "label": i % 2}


def test_tuple_items_read_labels_once_and_batch_like_the_in_memory_dataset():
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    lazy = AttributionDataset.from_torch(TensorDataset(x, y), batch_size=4, ids=[f"e{i}" for i in range(10)])
    dense = AttributionDataset(x, y, ids=[f"e{i}" for i in range(10)])
    assert torch.equal(lazy.labels, y) and lazy.n_classes == 3 and lazy.ids[3] == "e3"
    for (r1, x1, y1), (r2, x2, y2) in zip(lazy.batches(4), dense.batches(4), strict=True):
        assert r1 == r2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    picked = list(lazy.batches(2, rows=[7, 1, 4]))
    assert [r.tolist() for r, _, _ in picked] == [[7, 1], [4]]
    assert torch.equal(torch.cat([b for _, b, _ in picked]), x[[7, 1, 4]])
    assert torch.equal(lazy.to_memory().inputs, x) and torch.equal(lazy.example(5), x[5])
    sub = lazy.subset([9, 0])
    assert sub.ids == ["e9", "e0"] and torch.equal(next(sub.batches())[1], x[[9, 0]])
    relabelled = lazy.with_labels(torch.zeros(10, dtype=torch.long))
    assert relabelled.labels.sum() == 0 and torch.equal(next(relabelled.batches(3))[1], x[:3])


def test_dict_items_are_read_lazily_and_their_label_never_reaches_the_model():
    source = Counted(9)
    data = AttributionDataset.from_torch(source, batch_size=4)
    assert data.input_kind == "dict" and torch.equal(data.labels, torch.arange(9) % 2)
    reads = source.reads  # the first two items twice (can they be batched? do they repeat?), a pass for the labels
    assert reads == 4 + 9
    rows, inputs, labels = next(data.batches(4, device="cpu"))
    assert source.reads == reads + 4  # one batch read, not the dataset
    assert rows == slice(0, 4) and set(inputs) == {"x", "mask"} and torch.equal(inputs["x"], source.x[:4])
    assert "x: 6, 7, 8" in data.render_html(2) and "mask: 1, 1, 1" in data.render_html(2)
    with pytest.raises(TDAError, match="has dict inputs"):
        data.to_memory()


def test_given_labels_skip_the_label_pass():
    source = Counted(6)
    data = AttributionDataset.from_torch(source, labels=[1, 0, 1, 0, 1, 0], class_names=["a", "b"])
    assert source.reads == 4 and data.class_names == ["a", "b"] and data.labels.tolist() == [1, 0, 1, 0, 1, 0]
    with pytest.raises(TDAError, match=r"dataset items and labels must have the same length, got 6 dataset items and "
                                       r"2 labels"):
        AttributionDataset.from_torch(Counted(6), labels=[0, 1])


def test_a_lazy_fingerprint_sees_labels_ids_and_item_contents_and_is_stable():
    x, y = torch.randn(20, 2), torch.arange(20) % 2
    first = AttributionDataset.from_torch(TensorDataset(x, y)).fingerprint()
    assert AttributionDataset.from_torch(TensorDataset(x.clone(), y)).fingerprint() == first
    assert AttributionDataset.from_torch(TensorDataset(x, 1 - y)).fingerprint() != first
    assert AttributionDataset.from_torch(TensorDataset(x + 1, y)).fingerprint() != first
    assert AttributionDataset.from_torch(TensorDataset(x, y), ids=range(1, 21)).fingerprint() != first


def test_image_items_render_thumbnails():
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0])
    data = AttributionDataset.from_torch(TensorDataset(x, y), renderer=ImageRenderer((8, 8)))
    dense = AttributionDataset(x, y, renderer=ImageRenderer((8, 8)))
    assert data.thumbnail(1) == dense.thumbnail(1) and data.thumbnail(1)[:4] == b"\x89PNG"


def test_workers_read_the_same_batches():
    x, y = torch.randn(12, 2), torch.arange(12) % 2
    data = AttributionDataset.from_torch(TensorDataset(x, y), batch_size=5, num_workers=2)
    assert torch.equal(torch.cat([b for _, b, _ in data.batches()]), x)


def test_code_that_needs_the_input_tensor_is_refused_by_name():
    data = AttributionDataset.from_torch(TensorDataset(torch.randn(4, 2), torch.arange(4) % 2))

    def flatten_everything(dataset):
        return dataset.inputs.flatten(1)

    with pytest.raises(TDAError, match=r"test_torch_dataset.flatten_everything needs in-memory tensor inputs.*"
                                       r"grad-dot.*dataset.to_memory\(\)"):
        flatten_everything(data)


def test_bad_arguments_are_refused():
    with pytest.raises(TDAError, match="batch_size must be a positive integer, got 0"):
        AttributionDataset.from_torch(TensorDataset(torch.zeros(2, 1), torch.zeros(2)), batch_size=0)
    with pytest.raises(TDAError, match="collate_fn must be a function"):
        AttributionDataset.from_torch(TensorDataset(torch.zeros(2, 1), torch.zeros(2)), collate_fn="stack")
    with pytest.raises(TDAError, match="dataset 'dataset' is empty"):
        AttributionDataset.from_torch(TensorDataset(torch.zeros(0, 1), torch.zeros(0)))
    with pytest.raises(TDAError, match=r"every value of a dict batch must be a tensor; got \{'text': 'list'\}"):
        AttributionDataset.from_torch([{"text": "a", "labels": 0}, {"text": "b", "labels": 1}])

    class Broken(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                raise KeyError("missing file 2.png")
            return torch.zeros(2), 0

    with pytest.raises(TDAError, match=r"dataset: reading items 2\.\.2 failed: KeyError: 'missing file 2.png'"):
        AttributionDataset.from_torch(Broken(), batch_size=2)


def test_to_device_moves_tensors_inside_any_batch():
    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.zeros(2), "nested": [torch.ones(1), (torch.ones(1), "name")], "pair": Pair(torch.ones(1), 3)}
    moved = to_device(batch, "meta")
    assert moved["x"].device.type == "meta" and moved["nested"][1][0].device.type == "meta"
    assert moved["nested"][1][1] == "name" and isinstance(moved["pair"], Pair) and moved["pair"].b == 3
    assert to_device(batch, None) is batch


def test_a_batch_gives_labels_and_dict_inputs_by_key():
    batch = Batch({"input_ids": torch.ones(2, 3)}, torch.tensor([0, 1]))
    assert torch.equal(batch["labels"], batch.labels) and batch["input_ids"].shape == (2, 3)
    with pytest.raises(TDAError, match=r"batch\['mask'\]: the inputs have keys \['input_ids'\]"):
        batch["mask"]
    with pytest.raises(TDAError, match="called with labels only"):
        _ = Batch(None, torch.tensor([0])).inputs
