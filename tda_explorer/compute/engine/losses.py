"""Per-example losses for classifiers (outputs ``[B, C]``, targets ``[B]``) and sequence models (outputs
``[B, T, V]``, targets ``[B, T]``, positions with target ``IGNORE`` left out).

A sequence example's value is the *mean over its scored tokens*: a causal language model's per-token loss,
so attributing it asks which training sequences made these tokens likely. Restrict the measurement to
chosen tokens (an answer, a fact's object) by setting the other targets to ``IGNORE``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.data.batching import Batch
from tda_explorer.data.dataset import IGNORE

__all__ = ["Batch", "IGNORE", "check_logits", "cross_entropy", "neg_margin", "takes_batch"]


def takes_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as a loss of ``(outputs, batch)`` (a ``Batch``: inputs and labels) rather than of
    ``(outputs, targets)``: the engine then gives it the whole batch."""
    fn.takes_batch = True
    return fn


def check_logits(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Refuse outputs that are not logits matching ``targets``: ``[B, C]`` for class labels ``[B]``, ``[B, T, V]``
    for sequence targets ``[B, T]`` (a ``TDAError`` naming the task's ``output``)."""
    if not isinstance(outputs, torch.Tensor):
        raise TDAError(f"output: the loss needs a logits tensor but got {type(outputs).__name__}; choose the logits "
                       "with AttributionTask(output='logits' or a function of the model's outputs)")
    if outputs.shape == targets.shape and targets.dim() == 2:
        raise TDAError(f"output: the labels {tuple(targets.shape)} are read as sequence targets (a class per "
                       f"position), which need logits [n, T, vocabulary], but the model's outputs are "
                       f"{tuple(outputs.shape)}: multi-label targets (a 0 / 1 per class) are not supported; give one "
                       "class label per example")
    if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        raise TDAError(f"output: the model's outputs {tuple(outputs.shape)} do not match the labels "
                       f"{tuple(targets.shape)}: class labels [n] need logits [n, n_classes] and sequence targets "
                       "[n, T] need [n, T, vocabulary]; choose the logits with AttributionTask(output=...)")
    if not outputs.is_floating_point():
        raise TDAError(f"output: the model's outputs must be floating-point logits, got {outputs.dtype}")
    return outputs


def _token_mean(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    mask = (targets != IGNORE).to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example; for sequences, the mean over tokens whose target is not ``IGNORE``."""
    check_logits(outputs, targets)
    if outputs.dim() == 2:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    per_token = nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none",
                                            ignore_index=IGNORE).view_as(targets)
    return _token_mean(per_token, targets)


def neg_margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log(p / (1 − p)) of the target class: loss-oriented (lower is better), as TRAK's margin; for sequences,
    the mean over scored tokens."""
    check_logits(outputs, targets)
    logp = torch.log_softmax(outputs, dim=-1)
    index = targets.clamp_min(0).unsqueeze(-1)
    correct = logp.gather(-1, index).squeeze(-1)
    others = logp.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
    margin = others - correct
    return margin if outputs.dim() == 2 else _token_mean(margin, targets)
