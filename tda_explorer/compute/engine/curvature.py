"""Curvature of the mean training objective: Hessian- and GGN-vector products, and dense matrices.

Objective: J(θ) = mean_i ℓ(z_i; θ) + wd/2 ‖θ‖² over the task's tracked parameters (others frozen).
The GGN replaces the Hessian of the network by Jᵀ H_out J (H_out = ∂²ℓ/∂logits², positive semi-definite for
cross-entropy), so G + wd·I is positive definite — the default for influence functions on non-convex models.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from tda_explorer._validation import check_choice
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset

CURVATURES = ("ggn", "hessian")


class Curvature:
    """Products with the curvature of the mean training objective at the model's parameters.

    Parameters
    ----------
    task : AttributionTask
    train : AttributionDataset
    kind : {"ggn", "hessian"}
    device : torch.device
    dtype : torch.dtype
        Float64 by default: these products feed solvers that need the precision.
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, kind: str = "ggn",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.kind = check_choice(kind, "curvature", CURVATURES)
        self.task, self.device, self.dtype = task, torch.device(device), dtype
        self.names = task.tracked_names()
        model = task.model
        state = {k: v.detach().to(device, dtype) for k, v in model.named_parameters()}
        self.buffers = {k: v.to(device) for k, v in model.named_buffers()}
        self.shapes = [(k, state[k].shape) for k in self.names]
        self.theta = torch.cat([state[k].flatten() for k in self.names])
        self.frozen = {k: v for k, v in state.items() if k not in self.names}
        self.x = train.inputs.to(device, dtype) if train.inputs.is_floating_point() else train.inputs.to(device)
        self.y = train.labels.to(device)
        self.n = len(train)
        self.wd = float(task.weight_decay)
        self.model = model

    def on_rows(self, rows: torch.Tensor) -> Curvature:
        """The same curvature over a subset of the training rows (a minibatch), sharing everything else."""
        view = copy.copy(self)
        view.x, view.y, view.n = self.x[rows], self.y[rows], len(rows)
        return view

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in self.shapes:
            size = shape.numel()
            out[name] = flat[start : start + size].view(shape)
            start += size
        return out

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        params = {**self.frozen, **self._unflatten(flat), **self.buffers}
        return functional_call(self.model, params, (self.x,))

    def _objective(self, flat: torch.Tensor) -> torch.Tensor:
        loss = self.task.train_loss(self._logits(flat), self.y).mean()
        return loss + 0.5 * self.wd * (flat * flat).sum()

    def _one(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "hessian":
            return jvp(grad(self._objective), (self.theta,), (v,))[1]
        logits, jv = jvp(self._logits, (self.theta,), (v,))
        p = logits.softmax(-1)
        h_jv = p * jv - p * (p * jv).sum(-1, keepdim=True)  # Hessian of cross-entropy w.r.t. logits, times Jv
        _, pullback = vjp(self._logits, self.theta)
        return pullback(h_jv / self.n)[0] + self.wd * v

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(curvature) @ v`` for each row of ``vectors`` ``[r, p]``."""
        return vmap(self._one)(vectors.to(self.device, self.dtype))

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The ``[p, p]`` matrix (symmetrised), built from products with the identity in chunks."""
        eye = torch.eye(self.dim, device=self.device, dtype=self.dtype)
        cols = torch.cat([self.matvec(eye[i : i + chunk]) for i in range(0, self.dim, chunk)])
        return 0.5 * (cols + cols.T)


def largest_eigenvalue(matvec, dim: int, iterations: int = 30, seed: int = 1,
                       device: torch.device | str = "cpu") -> float:
    """λ_max of a positive semi-definite operator (or one similar to it) by power iteration, from below."""
    z = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    estimate = 0.0
    for _ in range(iterations):
        y = matvec(z)
        estimate = float(y.norm() / z.norm())
        z = y / y.norm().clamp_min(1e-300)
    return estimate
