"""A dataset with stable ids, labels, class names and a renderer."""

from __future__ import annotations

import hashlib
import html
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tda_explorer._validation import TDAError
from tda_explorer.data.batching import to_device
from tda_explorer.data.renderers import Renderer, RowRenderer

IGNORE = -100  # a sequence target left out of the loss (PyTorch's ignore_index)


@dataclass
class AttributionDataset:
    """Inputs and labels of one split, each example with a stable id.

    This is the in-memory dataset (one input tensor, the fast path). ``AttributionDataset.from_torch(dataset)`` wraps
    any map-style torch ``Dataset`` instead, read lazily in batches (tensor, tuple or dict items). The engine reads
    both through ``batches``.

    Parameters
    ----------
    inputs : Tensor of shape [n, ...]
        Model inputs, one row per example. A tensor is kept as it is; an array, DataFrame or list of numbers becomes
        float32 (its pixels, counts and flags as features): give token ids, or another dtype, as a tensor.
    labels : Tensor of shape [n]
        Integer class labels as given (possibly noisy).
    ids : sequence, optional
        Stable ids (ints or strings), unique; defaults to ``0..n-1``.
    class_names : list of str, optional
        Display names of the classes; defaults to ``"0".."C-1"``.
    renderer : Renderer, optional
        Shows one example as HTML / PNG; defaults to a row renderer.
    name : str
        A short name used in fingerprints and file names.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    ids: Sequence[Any] | None = None
    class_names: list[str] | None = None
    renderer: Renderer | None = None
    name: str = "dataset"
    batch_size: ClassVar[int] = 512  # rows per batch of ``batches()`` when none is asked for
    _index: dict = field(default_factory=dict, init=False, repr=False)
    _thumbnails: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Mapping):
            raise TDAError(f"inputs: a dict ({', '.join(map(str, list(self.inputs)[:4]))}) is read as items of a torch "
                           "Dataset: AttributionDataset.from_torch(dataset) with dict items (a tokenizer's); an "
                           "AttributionDataset built directly takes one tensor or array of inputs")
        if not isinstance(self.inputs, torch.Tensor):
            try:
                self.inputs = torch.tensor(np.asarray(self.inputs), dtype=torch.float32)  # a copy: may be read-only
            except (TypeError, ValueError, RuntimeError):
                raise TDAError(f"inputs must be one tensor or array of numbers [n, ...], got "
                               f"{type(self.inputs).__name__} that does not convert to one") from None
        self._setup(len(self.inputs), "inputs")

    def _setup(self, n: int, what: str) -> None:
        """Check and normalise labels, class names, ids and the renderer for ``n`` examples (``what`` names them)."""
        if not isinstance(self.labels, torch.Tensor):
            try:
                self.labels = torch.as_tensor(np.asarray(self.labels))
            except (TypeError, ValueError, RuntimeError):
                raise TDAError(f"labels must be integer class indices, got {type(self.labels).__name__} of "
                               f"{type(next(iter(self.labels), None)).__name__}") from None
        if self.labels.dim() not in (1, 2):
            raise TDAError(
                f"labels must be class labels [n] or sequence targets [n, T], got shape {tuple(self.labels.shape)}"
            )
        if n != len(self.labels):
            raise TDAError(
                f"{what} and labels must have the same length, got {n} {what} and {len(self.labels)} labels"
            )
        if n == 0:
            raise TDAError(f"dataset {self.name!r} is empty: {what} has 0 examples")
        if self.labels.is_floating_point():
            whole = torch.isfinite(self.labels).all() and bool((self.labels == self.labels.round()).all())
            if not whole:  # whole numbers in a float column (read from a CSV) are class indices as they are
                raise TDAError("labels must be integer class indices, got floating-point values that are not whole "
                               "numbers: regression and multi-label targets are not supported (the methods here "
                               "attribute classifiers: class labels [n], or sequence targets [n, T])")
        self.labels = self.labels.long()
        if ((self.labels < 0) & (self.labels != IGNORE if self.is_sequence else True)).any():
            raise TDAError("labels must be non-negative class indices"
                           + (f" (or {IGNORE} for a token left out)" if self.is_sequence else ""))
        n_classes = int(self.labels.max()) + 1
        if self.class_names is None:
            self.class_names = [str(c) for c in range(n_classes)]
        elif len(self.class_names) < n_classes:
            raise TDAError(
                f"class_names has {len(self.class_names)} names but labels go up to {n_classes - 1}"
            )
        ids = list(range(len(self.labels))) if self.ids is None else list(self.ids)
        if len(ids) != len(self.labels):
            raise TDAError(f"ids must have one entry per example: got {len(ids)} ids for {len(self.labels)} examples")
        self.ids = [i.item() if isinstance(i, np.generic) else i for i in ids]
        self._index = {i: p for p, i in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise TDAError("ids must be unique; found duplicates")
        if self.renderer is None:
            self.renderer = RowRenderer()
        if self.renderer.kind == "text":
            self.renderer = self.renderer.bind(self.ids)

    @classmethod
    def from_torch(cls, dataset: Any, collate_fn: Callable[[list], Any] | None = None, ids: Sequence[Any] | None = None,
                   labels: Any = None, class_names: list[str] | None = None, renderer: Renderer | None = None,
                   batch_size: int = 64, name: str = "dataset", num_workers: int = 0) -> AttributionDataset:
        """Any map-style ``torch.utils.data.Dataset``, read lazily in batches (see ``TorchAttributionDataset``).

        Items may be tensors, tuples ``(inputs, label, ...)`` or dicts (``{"input_ids": ..., "labels": ...}``);
        ``collate_fn`` batches them (default: torch's ``default_collate``). Labels are read once: from ``labels`` or,
        when it is None, from the items (a tuple's second element, a dict's ``"labels"`` or ``"label"``).
        """
        from tda_explorer.data.torch_dataset import TorchAttributionDataset

        return TorchAttributionDataset(dataset, collate_fn, ids, labels, class_names, renderer, batch_size, name,
                                       num_workers)

    @property
    def in_memory(self) -> bool:
        """Whether the inputs are one in-memory tensor (``inputs``), rather than items read lazily in batches."""
        return True

    def batches(self, batch_size: int | None = None, rows: Sequence[int] | None = None,
                device: str | torch.device | None = None) -> Iterator[tuple[slice | torch.Tensor, Any, torch.Tensor]]:
        """Yield ``(rows, inputs, labels)`` batches in order: the access rule the engine uses for every dataset.

        ``rows`` is a slice (all rows, in order) or an index tensor (when ``rows`` positions are asked for);
        ``inputs`` is a tensor or a dict of tensors, moved to ``device`` with the labels when it is given.
        """
        size = self.batch_size if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TDAError(f"batch_size must be a positive integer, got {size!r}")
        if rows is None:
            for start in range(0, len(self), size):
                index = slice(start, min(start + size, len(self)))
                yield index, to_device(self.inputs[index], device), to_device(self.labels[index], device)
            return
        positions = torch.as_tensor(list(rows), dtype=torch.long)
        for start in range(0, len(positions), size):
            index = positions[start : start + size]
            yield index, to_device(self.inputs[index], device), to_device(self.labels[index], device)

    def example(self, position: int) -> Any:
        """The inputs of the example at ``position``, unbatched (a tensor, or a dict of tensors)."""
        return self.inputs[position]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_sequence(self) -> bool:
        """Whether labels are per-token targets ``[n, T]`` (a sequence model) rather than class labels."""
        return self.labels.dim() == 2

    def check_class_labels(self, argument: str) -> None:
        """Refuse sequence targets where ``argument`` needs one class label per example."""
        if self.is_sequence:
            raise TDAError(f"{argument} needs one class label per example; dataset {self.name!r} has sequence "
                           f"targets {tuple(self.labels.shape)} (attribute it with get_method(...).fit/attribute)")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def positions(self, ids: Sequence[Any] | Any, argument: str = "ids") -> list[int]:
        """Row positions of ``ids``; raise naming ``argument`` for an id that does not exist."""
        single = not isinstance(ids, (list, tuple, np.ndarray, torch.Tensor, range))
        wanted = [ids] if single else list(ids.tolist() if hasattr(ids, "tolist") else ids)
        missing = [i for i in wanted if i not in self._index]
        if missing:
            raise TDAError(
                f"{argument}: {missing[:10]} not in dataset {self.name!r} "
                f"({len(self)} examples, ids like {self.ids[:3]})"
            )
        return [self._index[i] for i in wanted]

    def group_positions(self, groups: Sequence[Sequence[Any]], argument: str = "groups") -> list[list[int]]:
        """Row positions of each group of ids; refuse a non-list, unknown ids, and a group that is everything."""
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
            raise TDAError(f"{argument} must be a non-empty list of lists of training ids, e.g. [[3, 17], [42]]")
        out = []
        for g, group in enumerate(groups):
            if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
                raise TDAError(f"{argument}[{g}] must be a list of training ids, got {type(group).__name__}")
            rows = self.positions(list(group), f"{argument}[{g}]")
            if len(set(rows)) == len(self):
                raise TDAError(f"{argument}[{g}] removes the whole training set ({len(self)} examples); "
                               "nothing would be left to train on")
            out.append(rows)
        return out

    def subset(self, positions: Sequence[int], name: str | None = None) -> AttributionDataset:
        """A new dataset with the rows at ``positions`` (ids kept)."""
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        return AttributionDataset(
            self.inputs[idx], self.labels[idx], [self.ids[i] for i in idx.tolist()],
            self.class_names, self.renderer, name or self.name,
        )

    def with_labels(self, labels: torch.Tensor) -> AttributionDataset:
        """The same examples with other labels (e.g. after relabelling)."""
        return AttributionDataset(self.inputs, labels, self.ids, self.class_names, self.renderer, self.name)

    def fingerprint(self) -> str:
        """A hash of the inputs, labels and ids: equal data, equal fingerprint."""
        h = hashlib.sha256()
        h.update(self.inputs.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.labels.cpu().numpy().tobytes())
        h.update(repr(self.ids).encode())
        return h.hexdigest()[:16]

    def render_html(self, position: int) -> str:
        """The example at ``position`` as an HTML fragment."""
        if self.renderer.kind == "text":
            return self.renderer.to_html(self.ids[position])
        example = self.example(position)
        if isinstance(example, Mapping):  # dict inputs: each key's first values
            return "<br>".join(f"<code>{html.escape(str(k))}: {html.escape(_first_values(v))}</code>"
                               for k, v in example.items())
        return self.renderer.to_html(example)

    def thumbnail(self, position: int) -> bytes | None:
        """The example at ``position`` as PNG bytes (cached), or None for non-image data."""
        if self.renderer.kind != "image":
            return None
        cache = self._thumbnails
        png = cache.get(position)
        if png is None:
            if len(cache) >= 4096:
                cache.pop(next(iter(cache)))
            png = cache[position] = self.renderer.to_png(self.example(position))
        return png


def _first_values(value: Any, limit: int = 8) -> str:
    """The first ``limit`` values of a tensor, as text (``101, 7, 42, …``)."""
    if not isinstance(value, torch.Tensor):
        return str(value)
    flat = value.detach().cpu().flatten()
    shown = [f"{v:.3g}" if flat.is_floating_point() else str(v) for v in flat[:limit].tolist()]
    return ", ".join(shown) + (", …" if len(flat) > limit else "")


@dataclass
class DataSplit:
    """A train / test split; ``flipped`` marks training labels changed by injected noise."""

    train: AttributionDataset
    test: AttributionDataset
    flipped: torch.Tensor
    clean_train_labels: torch.Tensor
