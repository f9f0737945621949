"""Batches as the engine sees them: inputs that are a tensor or a dict of tensors, moved by one rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tda_explorer._validation import TDAError

LABEL_KEYS = ("labels", "label")  # a dict item's label, never passed to the model


def to_device(batch: Any, device: str | torch.device | None) -> Any:
    """``batch`` on ``device``: a tensor, or the tensors inside a dict (or ``Mapping``), tuple or list; other values
    are returned as they are. ``device=None`` leaves everything where it is."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def take_rows(inputs: Any, rows: slice | torch.Tensor) -> Any:
    """Rows ``rows`` of batched inputs: a tensor's, or each tensor's of a dict."""
    if isinstance(inputs, Mapping):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def n_rows(inputs: Any) -> int:
    """How many examples batched ``inputs`` (a tensor or a dict of tensors) hold."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def describe(inputs: Any) -> str:
    """One example's shape and dtype of batched ``inputs``, for messages: ``(8,) torch.float32`` or
    ``{input_ids: (12,) torch.int64, attention_mask: (12,) torch.int64}``."""
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, torch.Tensor):
        return f"{tuple(inputs.shape[1:])} {inputs.dtype}"
    return type(inputs).__name__


def check_inputs(inputs: Any, argument: str) -> Any:
    """Refuse batched inputs other than a tensor or a dict of tensors with the same number of rows."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, Mapping) and inputs:
        bad = {k: type(v).__name__ for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise TDAError(f"{argument}: the model is called as model(**inputs), so every value of a dict batch must "
                           f"be a tensor; got {bad} (leave such keys out of the items or the collate_fn)")
        lengths = {k: len(v) for k, v in inputs.items()}
        if len(set(lengths.values())) != 1:
            raise TDAError(f"{argument}: the tensors of a dict batch must have one row per example; got lengths "
                           f"{lengths}")
        return dict(inputs)
    raise TDAError(f"{argument}: inputs must be a tensor or a non-empty dict of tensors, got {type(inputs).__name__}")


class Batch:
    """What a per-example loss or measurement sees of its examples: ``inputs`` (a tensor or a dict of tensors) and
    ``labels``. ``batch["labels"]`` is the labels and ``batch[key]`` a dict input's value, as in a Hugging Face batch.
    """

    __slots__ = ("_inputs", "labels")

    def __init__(self, inputs: Any, labels: torch.Tensor | None):
        self._inputs = inputs
        self.labels = labels

    @property
    def inputs(self) -> Any:
        if self._inputs is None:
            raise TDAError("this loss reads batch.inputs, but it was called with labels only (loss(outputs, "
                           "targets)); pass it through a path that gives the batch (the engine's per-sample gradients, "
                           "LoGra, K-FAC/EK-FAC)")
        return self._inputs

    def __getitem__(self, key: str) -> Any:
        if key in LABEL_KEYS:
            return self.labels
        inputs = self.inputs
        if not isinstance(inputs, Mapping):
            raise TDAError(f"batch[{key!r}]: the inputs are a tensor, not a dict; use batch.inputs")
        if key not in inputs:
            raise TDAError(f"batch[{key!r}]: the inputs have keys {sorted(inputs)} (and 'labels')")
        return inputs[key]

    def __repr__(self) -> str:
        labels = None if self.labels is None else tuple(self.labels.shape)
        return f"Batch(inputs={describe(self._inputs)}, labels={labels})"
