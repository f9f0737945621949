"""Influence functions: τ(z, z′) = (1/n) ∇f(z′)ᵀ (H + λI)⁻¹ ∇ℓ(z).

Convention: H is the curvature of the *mean* training objective (weight decay included), so removing z
changes the parameters by ≈ (1/n) H⁻¹∇ℓ(z), and τ is in "change of the test loss per removed example"
units. Positive = proponent. Solvers:

* ``explicit``: the dense matrix in float64 and a Cholesky factorisation (never an inverse); the oracle on
  tiny models. An indefinite matrix without enough damping is refused, not silently inverted.
* ``cg``: conjugate gradients on curvature-vector products (double backward or GGN), all test points as one
  block of right-hand sides; a solve that does not reach ``tol`` raises with its residual.

Damping: ``damping=None`` takes 1e-3 of the mean eigenvalue (trace / p) of the chosen curvature, a scale
read from the spectrum rather than a fixed number; pass a float (absolute λ) to override.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.curvature import Curvature
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset


class InfluenceFunction(Attributor):
    """Influence functions with a choice of iHVP solver.

    Parameters
    ----------
    task : AttributionTask
    solver : {"explicit", "cg"}
    curvature : {"ggn", "hessian"}
        GGN (positive semi-definite; default) or the exact Hessian.
    damping : float, optional
        Absolute λ ≥ 0; default 1e-3 · trace(H)/p.
    max_iter, tol : int, float
        CG iteration budget and relative residual target.
    """

    name = "if"
    solver: ClassVar[str] = "explicit"

    def __init__(self, task: AttributionTask, *, curvature: str = "ggn", damping: float | None = None,
                 max_iter: int = 200, tol: float = 1e-6, solver: str | None = None, **kwargs):
        super().__init__(task, **kwargs)
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by if-explicit / if-cg yet; leave it None")
        if solver is not None:
            self.solver = solver
        if self.solver not in ("explicit", "cg"):
            raise TDAError(f"unknown solver {self.solver!r}; expected one of: explicit, cg")
        if damping is not None and not float(damping) >= 0:
            raise TDAError(f"damping must be >= 0, got {damping}")
        self.curvature_kind, self.damping = curvature, damping
        self.max_iter = check_positive_int(max_iter, "max_iter")
        if not 0 < float(tol) < 1:
            raise TDAError(f"tol must be in (0, 1), got {tol}")
        self.tol = float(tol)

    def config(self) -> dict:
        return {**super().config(), "solver": self.solver, "curvature": self.curvature_kind,
                "damping": self.damping, "max_iter": self.max_iter, "tol": self.tol}

    def _fit(self, train: AttributionDataset) -> None:
        self.curvature_ = Curvature(self.task, train, self.curvature_kind, self.device)
        self.g_train_ = self._features(train, test=False).double()
        if self.solver == "explicit":
            matrix = self.curvature_.dense()
            self.lam_ = self._lambda(matrix.diagonal().mean())
            matrix.diagonal().add_(self.lam_)
            chol, info = torch.linalg.cholesky_ex(matrix)
            if int(info) != 0:
                smallest = float(torch.linalg.eigvalsh(matrix)[0])
                raise TDAError(
                    f"the damped {self.curvature_kind} is not positive definite (smallest eigenvalue {smallest:.3g} "
                    f"with damping {self.lam_:.3g}); use curvature='ggn' or raise damping above "
                    f"{self.lam_ - smallest:.3g}"
                )
            self.chol_ = chol
        else:
            probe = torch.randn(8, self.curvature_.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            trace = float((probe * self.curvature_.matvec(probe)).sum(1).mean())  # Hutchinson estimate
            self.lam_ = self._lambda(torch.tensor(trace / self.curvature_.dim))

    def _lambda(self, mean_eigenvalue: torch.Tensor) -> float:
        return float(1e-3 * mean_eigenvalue) if self.damping is None else float(self.damping)

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ rhs`` for each row of ``rhs`` ``[r, p]``."""
        if self.solver == "explicit":
            return torch.cholesky_solve(rhs.T.double(), self.chol_).T
        return self._cg(rhs.double())

    def _cg(self, b: torch.Tensor) -> torch.Tensor:
        op = lambda v: self.curvature_.matvec(v) + self.lam_ * v
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        b_norm = b.norm(dim=1).clamp_min(1e-300)
        for _ in range(self.max_iter):
            if bool(((rs.sqrt() / b_norm) <= self.tol).all()):
                return x
            ap = op(p)
            alpha = rs / (p * ap).sum(1).clamp_min(1e-300)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            p = r + (rs_new / rs.clamp_min(1e-300))[:, None] * p
            rs = rs_new
        residual = float((rs.sqrt() / b_norm).max())
        if residual > self.tol:
            raise TDAError(
                f"CG did not converge in max_iter={self.max_iter} iterations: relative residual {residual:.2e} "
                f"> tol={self.tol:g}; raise max_iter or damping (now {self.lam_:.3g})"
            )
        return x

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        g_test = self._features(test, test=True).double()
        return (self._solve(g_test) @ self.g_train_.T / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        if self.solver == "explicit":
            z = torch.linalg.solve_triangular(self.chol_, self.g_train_.T, upper=False)
            return ((z * z).sum(0) / len(self.train_)).float()
        return ((self._solve(self.g_train_) * self.g_train_).sum(1) / len(self.train_)).float()


class ExplicitInfluence(InfluenceFunction):
    """Influence functions with the dense damped curvature and a Cholesky solve (``if-explicit``)."""

    name = "if-explicit"
    solver = "explicit"


class CGInfluence(InfluenceFunction):
    """Influence functions with conjugate gradients on curvature-vector products (``if-cg``)."""

    name = "if-cg"
    solver = "cg"
