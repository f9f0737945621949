"""A map-style ``torch.utils.data.Dataset`` as an ``AttributionDataset``: items read lazily, in batches.

Build one with ``AttributionDataset.from_torch(dataset, collate_fn=None, labels=None, ...)``. Items are read
through a ``DataLoader`` with the collate function, one batch at a time, only when a computation asks
(``batches``); the whole input is never held in memory. Labels are read once, when the dataset is built.

An item is a tensor, a tuple ``(inputs, label, ...)`` or a dict (``{"input_ids": ..., "attention_mask": ...,
"labels": ...}``). After collation the inputs are a tensor or a dict of tensors; a dict's ``"labels"`` /
``"label"`` key is the label and is never passed to the model.

Paths that need one in-memory input tensor (``dataset.inputs``) refuse such a dataset with a ``TDAError`` naming
the method; ``to_memory()`` loads tensor items into an in-memory ``AttributionDataset`` where they fit.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Subset, default_collate

from tda_explorer._validation import TDAError
from tda_explorer.data.batching import LABEL_KEYS, check_inputs, describe, take_rows, to_device
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.renderers import Renderer

STREAMING_METHODS = ("grad-dot", "grad-cos", "tracin", "trak", "if-ekfac", "if-kfac", "if-explicit", "if-cg",
                     "if-lissa", "if-arnoldi", "if-astra", "if-datainf")  # and any LoGra projection
_FINGERPRINT_ITEMS = 8  # items whose contents enter a lazy dataset's fingerprint


class _Collate:
    """The user's collate function (or ``default_collate``), refusing items it cannot batch by name (picklable,
    so that ``num_workers > 0`` works)."""

    def __init__(self, collate_fn: Callable[[list], Any] | None):
        self.collate_fn = collate_fn

    def __call__(self, items: list) -> Any:
        fn = self.collate_fn or default_collate
        try:
            return fn(items)
        except TDAError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the user's function is reported by name
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            which = "collate_fn" if self.collate_fn is not None else "the default collate_fn (default_collate)"
            kinds = sorted({type(item).__name__ for item in items})
            raise TDAError(f"dataset/collate_fn: {which} cannot batch these dataset items ({', '.join(kinds)}): "
                           f"{first}. Items must be tensors, tuples (inputs, label) or dicts of equally shaped "
                           "tensors, or pass a collate_fn that batches them (e.g. pads sequences)") from None


def _split(batch: Any, argument: str = "dataset") -> tuple[Any, Any]:
    """A collated batch as ``(inputs, labels or None)``."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        return check_inputs(inputs, argument), None if label_key is None else batch[label_key]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TDAError(f"{argument}: the collated batch is an empty {type(batch).__name__}")
        return check_inputs(batch[0], argument), batch[1] if len(batch) > 1 else None
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TDAError(f"{argument}: a collated batch must be a tensor, a tuple (inputs, labels, ...) or a dict of "
                   f"tensors; collate_fn returned {type(batch).__name__}")


class NondeterministicItemsWarning(UserWarning):
    """A torch Dataset returned other inputs for the same item when read again (a random augmentation)."""


def _method_name() -> str:
    """Who asked for ``inputs``: the registered name of the nearest method object on the call stack (a class with a
    ``name``), else the calling function."""
    frame = inspect.currentframe()
    caller = None
    depth = 0
    while frame is not None and depth < 40:
        frame, depth = frame.f_back, depth + 1
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, AttributionDataset) or frame.f_code.co_name in ("inputs", "_method_name"):
            continue
        if caller is None:
            module = frame.f_globals.get("__name__", "?")
            caller = f"{module}.{frame.f_code.co_name}"
        name = getattr(type(owner), "name", None) if owner is not None else None
        if isinstance(name, str) and name and name != "attributor":
            return name
    return caller or "this path"


class TorchAttributionDataset(AttributionDataset):
    """An ``AttributionDataset`` over a map-style torch ``Dataset``, read lazily in batches (see the module).

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style: ``len(dataset)`` and ``dataset[i]``; its length must not change while it is attributed.
    collate_fn : callable, optional
        Batches a list of items (default: ``torch.utils.data.default_collate``).
    ids, labels, class_names, renderer, name
        As for ``AttributionDataset``; ``labels=None`` reads them from the items once.
    batch_size : int
        Items per batch when a computation does not choose (and while reading labels).
    num_workers : int
        ``DataLoader`` worker processes.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list], Any] | None = None, ids: Sequence[Any] | None = None,
                 labels: Any = None, class_names: list[str] | None = None, renderer: Renderer | None = None,
                 batch_size: int = 64, name: str = "dataset", num_workers: int = 0):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not (
                hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TDAError(f"dataset must be a map-style torch Dataset (len(dataset) and dataset[i]), got "
                           f"{type(dataset).__name__}")
        if collate_fn is not None and not callable(collate_fn):
            raise TDAError(f"collate_fn must be a function batching a list of items, got {type(collate_fn).__name__}")
        for value, argument in ((batch_size, "batch_size"), (num_workers, "num_workers")):
            if not isinstance(value, int) or isinstance(value, bool) or value < (argument == "batch_size"):
                raise TDAError(f"{argument} must be a {'positive' if argument == 'batch_size' else 'non-negative'} "
                               f"integer, got {value!r}")
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.name = name
        self.ids, self.class_names, self.renderer = ids, class_names, renderer
        self._index, self._thumbnails, self._fingerprint = {}, {}, None
        self._length = self._current_length()
        if self._length == 0:
            raise TDAError(f"dataset {name!r} is empty: dataset has 0 items")
        first = self._collate_items(range(min(2, self._length)))  # can the items be batched at all?
        self._kind = "dict" if isinstance(first, Mapping) else "tensor"
        self._check_repeatable(first)
        if labels is None:
            labels = self._read_labels()
        elif not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(np.asarray(labels))
        self.labels = labels
        self._setup(self._length, "dataset items")

    def _check_repeatable(self, first: Any) -> None:
        """Warn when the first two items, ``first`` as collated, read again give other inputs (a random augmentation
        in ``__getitem__``): every method reads the items again, and a recorded run's replay reads them too."""
        with torch.random.fork_rng(devices=[]):  # the second read leaves the caller's random stream as it was
            again = self._collate_items(range(min(2, self._length)))
        leaves = [(a, b) for a, b in zip(tree_leaves(first), tree_leaves(again)) if isinstance(a, torch.Tensor)]
        if any(a.shape != b.shape or not torch.equal(a, b) for a, b in leaves):
            warnings.warn(f"dataset {self.name!r}: reading its first items again gave other inputs (a random "
                          "augmentation in __getitem__?); attribution reads the items again, so give the dataset "
                          "without its training transform", NondeterministicItemsWarning, stacklevel=4)

    # -- reading ----------------------------------------------------------------------------
    def _current_length(self) -> int:
        try:
            return int(len(self.dataset))
        except Exception as err:  # noqa: BLE001
            raise TDAError(f"dataset: len(dataset) failed: {err}") from err

    def _check_length(self) -> None:
        now = self._current_length()
        if now != self._length:
            raise TDAError(f"dataset: its length changed between reads, from {self._length} to {now} items; a "
                           "Dataset must keep its items while it is attributed (build a new AttributionDataset)")

    def _collate_items(self, positions: Sequence[int]) -> Any:
        """The inputs of the items at ``positions``, read and collated in this process (no DataLoader workers)."""
        try:
            items = [self.dataset[i] for i in positions]
        except Exception as err:  # noqa: BLE001 - the user's Dataset failed
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TDAError(f"dataset: reading items {positions[0]}..{positions[-1]} failed: {type(err).__name__}: "
                           f"{first}") from err
        return _split(_Collate(self.collate_fn)(items))[0]

    def _read(self, positions: Sequence[int], batch_size: int | None = None) -> Iterator[tuple[Any, Any, Any]]:
        """Yield ``(chunk positions, inputs, labels or None)`` for ``positions`` in batches, through a DataLoader."""
        size = batch_size or self.batch_size
        chunks = [list(positions[i : i + size]) for i in range(0, len(positions), size)]
        loader = DataLoader(self.dataset, batch_sampler=chunks, collate_fn=_Collate(self.collate_fn),
                            num_workers=self.num_workers)
        batches = iter(loader)
        for chunk in chunks:
            try:
                batch = next(batches)
            except TDAError:
                raise
            except StopIteration:
                self._check_length()
                raise TDAError(f"dataset: the DataLoader stopped before items {chunk[0]}..{chunk[-1]}") from None
            except Exception as err:  # noqa: BLE001 - the user's Dataset failed
                self._check_length()
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TDAError(f"dataset: reading items {chunk[0]}..{chunk[-1]} failed: {type(err).__name__}: "
                               f"{first}") from err
            inputs, labels = _split(batch)
            yield chunk, inputs, labels

    def _read_labels(self) -> torch.Tensor:
        parts = []
        for chunk, _, labels in self._read(range(self._length)):
            if labels is None:
                raise TDAError(f"labels: dataset items {chunk[0]}..{chunk[-1]} carry no label (the items are "
                               f"{'dicts without a' if self._kind == 'dict' else 'tensors or 1-tuples without a'} "
                               "label); pass labels=, or make each item (inputs, label) or a dict with 'labels'")
            try:
                part = torch.as_tensor(labels if not isinstance(labels, (list, tuple)) else np.asarray(labels))
            except (TypeError, ValueError, RuntimeError):
                shown = list(labels[:3]) if isinstance(labels, (list, tuple)) else labels
                raise TDAError(f"labels: the labels of dataset items {chunk[0]}..{chunk[-1]} must be integer class "
                               f"indices, got {type(labels).__name__} like {shown!r}; map them to class indices "
                               "(class_names= keeps their names) or pass labels=") from None
            parts.append(part)
        self._check_length()
        return torch.cat(parts)

    # -- the AttributionDataset interface ----------------------------------------------------
    @property
    def inputs(self) -> torch.Tensor:
        """Refused: the items are read lazily; a ``TDAError`` names the method that asked."""
        streaming = ", ".join(STREAMING_METHODS)
        dict_note = " (its inputs are dicts of tensors)" if self._kind == "dict" else ""
        raise TDAError(f"{_method_name()} needs in-memory tensor inputs (AttributionDataset(inputs, labels)); "
                       f"dataset {self.name!r} reads its items lazily from a torch Dataset{dict_note}. Methods that "
                       f"stream batches: {streaming}, and any projection_kind='logra'"
                       + ("" if self._kind == "dict" else "; or load it with dataset.to_memory()"))

    @property
    def in_memory(self) -> bool:
        return False

    @property
    def input_kind(self) -> str:
        """``"dict"`` (the model is called as ``model(**inputs)``) or ``"tensor"``."""
        return self._kind

    def batches(self, batch_size: int | None = None, rows: Sequence[int] | None = None,
                device: str | torch.device | None = None) -> Iterator[tuple[slice | torch.Tensor, Any, torch.Tensor]]:
        size = self.batch_size if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TDAError(f"batch_size must be a positive integer, got {size!r}")
        self._check_length()
        positions = range(self._length) if rows is None else [int(r) for r in rows]
        start = 0
        for chunk, inputs, _ in self._read(positions, size):
            if rows is None:
                index: slice | torch.Tensor = slice(chunk[0], chunk[-1] + 1)
            else:
                index = torch.as_tensor(positions[start : start + len(chunk)], dtype=torch.long)
            start += len(chunk)
            yield index, to_device(inputs, device), to_device(self.labels[index], device)
        self._check_length()

    def example(self, position: int) -> Any:
        return take_rows(self._collate_items([int(position)]), 0)

    def to_memory(self, name: str | None = None) -> AttributionDataset:
        """All items loaded into an in-memory ``AttributionDataset`` (tensor inputs only): the fast path, for data
        that fits in memory and for the methods that need ``inputs``."""
        if self._kind == "dict":
            raise TDAError(f"dataset {self.name!r} has dict inputs; an in-memory AttributionDataset holds one input "
                           "tensor (keep it lazy, or stack the inputs into one tensor with a wrapper model)")
        inputs = torch.cat([x for _, x, _ in self.batches()])
        return AttributionDataset(inputs, self.labels, self.ids, self.class_names, self.renderer, name or self.name)

    def subset(self, positions: Sequence[int], name: str | None = None) -> AttributionDataset:
        idx = [int(p) for p in positions]
        return TorchAttributionDataset(Subset(self.dataset, idx), self.collate_fn, [self.ids[i] for i in idx],
                                       self.labels[torch.as_tensor(idx, dtype=torch.long)], self.class_names,
                                       self.renderer, self.batch_size, name or self.name, self.num_workers)

    def with_labels(self, labels: torch.Tensor) -> AttributionDataset:
        return TorchAttributionDataset(self.dataset, self.collate_fn, self.ids, labels, self.class_names,
                                       self.renderer, self.batch_size, self.name, self.num_workers)

    def fingerprint(self) -> str:
        """A hash of the labels, ids, length and the contents of a few items spread over the dataset (reading every
        item would cost a pass over the data): equal data, equal fingerprint; an edit to an item outside those few
        is not seen, so build a new dataset (or a new store) after changing items in place."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"{type(self.dataset).__name__}|{self._length}|{self._kind}".encode())
            h.update(self.labels.cpu().numpy().tobytes())
            h.update(repr(self.ids).encode())
            picks = sorted({round(i * (self._length - 1) / max(1, _FINGERPRINT_ITEMS - 1))
                            for i in range(_FINGERPRINT_ITEMS)})
            for _, inputs, _ in self.batches(len(picks), rows=picks):
                for key, value in sorted(inputs.items()) if isinstance(inputs, Mapping) else [("", inputs)]:
                    h.update(key.encode())
                    h.update(value.detach().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"TorchAttributionDataset(name={self.name!r}, n={self._length}, dataset={type(self.dataset).__name__},"
                f" inputs={self._kind}, batch_size={self.batch_size})")

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = None  # type: ignore[assignment]

    def describe_inputs(self) -> str:
        """One example's input shapes and dtypes (from the first item), for messages."""
        return describe(self._collate_items([0]))


def in_memory(data: AttributionDataset, method: str) -> AttributionDataset:
    """``data`` with its inputs in one tensor, for ``method``: as it is, or a lazy dataset of tensors read once through
    ``batches`` (kept with it); dict items (a tokenizer's) are a ``TDAError`` naming the methods that stream them."""
    if data.in_memory:
        return data
    if data.input_kind == "dict":
        raise TDAError(f"{method} needs one input tensor; dataset {data.name!r} gives dicts of tensors (a "
                       f"tokenizer's). Methods that stream them: {', '.join(STREAMING_METHODS)}, and any "
                       "projection_kind='logra'")
    cached = getattr(data, "_in_memory_copy", None)
    if cached is not None and cached[0] == data.fingerprint():
        return cached[1]
    out = AttributionDataset(torch.cat([inputs for _, inputs, _ in data.batches()]), data.labels, list(data.ids),
                             data.class_names, data.renderer, data.name)
    data._in_memory_copy = (data.fingerprint(), out)
    return out
