"""Per-example losses for classifiers (outputs ``[B, C]``, targets ``[B]``) and sequence models (outputs
``[B, T, V]``, targets ``[B, T]``, positions with target ``IGNORE`` left out).

A sequence example's value is the *mean over its scored tokens*: a causal language model's per-token loss,
so attributing it asks which training sequences made these tokens likely. Restrict the measurement to
chosen tokens (an answer, a fact's object) by setting the other targets to ``IGNORE``.

Below them, the training loss's curvature in the outputs, what turns the model's Jacobian into the Gauss-Newton
matrix and the expected Fisher (``loss_curvature`` and the functions beside it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import grad, vjp

from tda_explorer._validation import TDAError
from tda_explorer.data.batching import Batch
from tda_explorer.data.dataset import IGNORE

if TYPE_CHECKING:
    from tda_explorer.compute.engine.task import AttributionTask

__all__ = ["Batch", "IGNORE", "check_logits", "closed_form", "cross_entropy", "curvature_roots", "gauss_newton_times",
           "loss_curvature", "loss_curvature_times", "neg_margin", "softmax_curvature", "takes_batch"]


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

# -- the training loss's curvature in the outputs ---------------------------------------------------------
# The training loss's curvature in the model's outputs: what turns the model's Jacobian into the Gauss-Newton
# matrix (Jᵀ H J) and the expected Fisher's output gradients (roots of H).
#
# For the default cross-entropy on class logits H is diag(p) − ppᵀ (p = softmax), in closed form. For any other loss
# (the user's ``loss_fn`` or ``batch_loss_fn``: class weights, label smoothing, a focal loss, a masked sequence loss, or
# a cross-entropy over sequences, whose per-example loss is a mean over its tokens) H is read off the loss itself:
# its Hessian-vector products in the outputs, example by example (each example's loss depends on its own outputs only).


def closed_form(task: AttributionTask, logits: torch.Tensor) -> bool:
    """Whether H is the cross-entropy's diag(p) − ppᵀ: the task's default loss on ``[B, C]`` logits."""
    return task.cross_entropy_loss and logits.dim() == 2


def softmax_curvature(logits: torch.Tensor) -> torch.Tensor:
    """diag(p) − ppᵀ ``[B, C, C]`` for logits ``[B, C]`` (float64)."""
    probs = logits.double().softmax(-1)
    return torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]


def loss_curvature_times(task: AttributionTask, logits: torch.Tensor, batch: Batch,
                         directions: torch.Tensor) -> torch.Tensor:
    """``H_i d_i`` for every example i: the task's training loss's Hessian in the outputs ``logits`` times
    ``directions`` (the same shape), one reverse-over-reverse product of the summed loss (H is symmetric; reverse mode
    also takes losses without a forward-mode derivative, such as the Huber loss)."""
    _, pullback = vjp(grad(lambda z: task.train_loss(z, batch).sum()), logits)
    return pullback(directions)[0]


def loss_curvature(task: AttributionTask, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each example's H ``[B, C, C]`` for outputs ``[B, C]``: C products with the unit directions (float64)."""
    logits = logits.detach()
    columns = []
    for c in range(logits.shape[1]):
        unit = torch.zeros_like(logits)
        unit[:, c] = 1.0
        columns.append(loss_curvature_times(task, logits, batch, unit))
    hessians = torch.stack(columns, dim=2).double()
    return 0.5 * (hessians + hessians.transpose(1, 2))


def gauss_newton_times(task: AttributionTask, logits: torch.Tensor, batch: Batch,
                       directions: torch.Tensor) -> torch.Tensor:
    """``Hᵢ⁺ dᵢ`` for every example: the loss's curvature in the outputs, its negative eigenvalues dropped as in
    ``curvature_roots`` (the Gauss-Newton matrix stays positive semi-definite, and the same whether its products go
    through the factor or not), times ``directions``; for outputs other than ``[B, C]`` (sequences) H itself."""
    if logits.dim() != 2:
        return loss_curvature_times(task, logits, batch, directions)
    roots = curvature_roots(loss_curvature(task, logits, batch)).to(directions.dtype)
    return torch.einsum("bkc,bk->bc", roots, torch.einsum("bkc,bc->bk", roots, directions))


def curvature_roots(hessians: torch.Tensor) -> torch.Tensor:
    """``F`` ``[B, C, C]`` with FᵢᵀFᵢ = Hᵢ: each Hᵢ's eigenvectors scaled by √eigenvalue, as rows (negative eigenvalues,
    where the loss is not convex in the outputs, dropped: the Gauss-Newton matrix stays positive semi-definite)."""
    values, vectors = torch.linalg.eigh(hessians)
    return (vectors * values.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2)
