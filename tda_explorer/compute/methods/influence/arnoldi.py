"""Arnoldi influence (Schioppa et al. 2022): the inverse of H + λI in the subspace of its top eigenvectors.

An Arnoldi iteration (full re-orthogonalisation; Lanczos in exact arithmetic, since H is symmetric) builds an
orthonormal Krylov basis Q and the projected matrix T = QᵀHQ; its eigenpairs (μ, w) give Ritz pairs (μ, Qw).
The ``rank`` largest are kept, and of those only eigenvalues above the damping λ: near-zero or negative ones
cannot be trusted and inverting them returns non-finite scores (methods.md). Then
    τ(z, z′) = (1/n) Σ_k (u_kᵀ∇f(z′)) (u_kᵀ∇ℓ(z)) / (μ_k + λ),
so queries and self-influence are dot products of r-dimensional features. With ``rank`` = p and every eigenvalue
above λ this is the explicit solve.
"""

from __future__ import annotations

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.influence.direct import InfluenceFunction
from tda_explorer.data.dataset import AttributionDataset


def arnoldi_eigenpairs(matvec, dim: int, iterations: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (descending) and vectors ``[dim, k]`` of a symmetric operator after ``iterations`` steps."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, dtype=torch.float64, generator=gen).to(device)
    basis = [q / q.norm()]
    steps = min(iterations, dim)
    t = torch.zeros(steps + 1, steps, dtype=torch.float64, device=device)
    for k in range(steps):
        w = matvec(basis[k][None])[0]
        stacked = torch.stack(basis)
        for _ in range(2):  # re-orthogonalise twice: one pass loses orthogonality in float arithmetic
            coeffs = stacked @ w
            w = w - coeffs @ stacked
            t[: k + 1, k] += coeffs
        norm = w.norm()
        t[k + 1, k] = norm
        if k + 1 == steps or norm <= 1e-10 * t[: k + 1, : k + 1].abs().max():
            steps = k + 1  # an invariant subspace: the Ritz pairs are exact
            break
        basis.append(w / norm)
    square = t[:steps, :steps]
    values, vectors = torch.linalg.eigh(0.5 * (square + square.T))
    order = values.argsort(descending=True)
    return values[order], torch.stack(basis[:steps], dim=1) @ vectors[:, order]


class ArnoldiInfluence(InfluenceFunction):
    """Influence functions in the top-``rank`` eigenspace found by Arnoldi iteration (``if-arnoldi``).

    Parameters
    ----------
    rank : int
        Ritz pairs kept (those below the damping are dropped as well).
    iterations : int, optional
        Arnoldi steps (curvature-vector products); default 2 × rank, at most p.
    seed : int
        Seed of the starting vector.
    """

    name = "if-arnoldi"
    solver = "arnoldi"

    def __init__(self, task: AttributionTask, *, rank: int = 100, iterations: int | None = None, seed: int = 0,
                 **kwargs):
        super().__init__(task, **kwargs)
        self.rank = check_positive_int(rank, "rank")
        self.iterations = check_positive_int(iterations, "iterations") if iterations is not None else 2 * self.rank
        if self.iterations < self.rank:
            raise TDAError(f"iterations ({self.iterations}) must be >= rank ({self.rank})")
        self.seed = int(seed)

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "iterations": self.iterations, "seed": self.seed}

    def _prepare(self) -> None:
        super()._prepare()
        values, vectors = arnoldi_eigenpairs(self.curvature_.matvec, self.curvature_.dim, self.iterations, self.seed,
                                            self.device)
        values, vectors = values[: self.rank], vectors[:, : self.rank]
        keep = values > self.lam_
        if not bool(keep.any()):
            raise TDAError(
                f"no eigenvalue of the {self.curvature_kind} above the damping {self.lam_:.3g} among the top "
                f"{self.rank}; lower damping or use curvature='ggn'"
            )
        self.eigenvalues_, self.eigenvectors_ = values[keep], vectors[:, keep]
        self.train_coords_ = self._coords(self.g_train_)

    def _coords(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients in the kept eigenbasis, scaled by 1/√(μ + λ)."""
        return (g.double() @ self.eigenvectors_) / (self.eigenvalues_ + self.lam_).sqrt()

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._coords(rhs) / (self.eigenvalues_ + self.lam_).sqrt() @ self.eigenvectors_.T

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        coords = self._coords(self._features(test, test=True))
        return (coords @ self.train_coords_.T / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        return ((self.train_coords_**2).sum(1) / len(self.train_)).float()
