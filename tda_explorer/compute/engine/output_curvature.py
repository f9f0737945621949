"""The training loss's curvature in the model's outputs: what turns the model's Jacobian into the Gauss-Newton
matrix (Jᵀ H J) and the expected Fisher's output gradients (roots of H).

For the default cross-entropy on class logits H is diag(p) − ppᵀ (p = softmax), in closed form. For any other loss
(the user's ``loss_fn`` or ``batch_loss_fn``: class weights, label smoothing, a focal loss, a masked sequence loss, or
a cross-entropy over sequences, whose per-example loss is a mean over its tokens) H is read off the loss itself:
its Hessian-vector products in the outputs, example by example (each example's loss depends on its own outputs only).
"""

from __future__ import annotations

import torch
from torch.func import grad, vjp

from tda_explorer.compute.engine.losses import Batch
from tda_explorer.compute.engine.task import AttributionTask


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
