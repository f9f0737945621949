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

from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, option, register
from tda_explorer.compute.methods.influence.direct import InfluenceArguments, InfluenceFunction
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


@dataclass
class ArnoldiArguments(InfluenceArguments):
    rank: int = option(100, "Ritz pairs (top eigenpairs) kept; of those, eigenvalues not above the damping are "
                            "dropped as well", POSITIVE_INT)
    iterations: int | None = option(None, "Arnoldi steps (curvature-vector products), at least rank; None: 2 × rank "
                                          "(at most p)", POSITIVE_INT)
    seed: int = option(0, "seed of the starting vector", Interval(0, None, integer=True))


@register("if-arnoldi", Family.PAIRWISE, ArnoldiArguments)
class ArnoldiInfluence(InfluenceFunction):
    """Influence functions in the top-``rank`` eigenspace of the curvature, found by Arnoldi iteration.

    Fitted: ``eigenvalues_`` and ``eigenvectors_`` (the kept Ritz pairs).
    """

    def _setup(self) -> None:
        super()._setup()
        a = self.args
        if a.iterations is not None and a.iterations < a.rank:
            raise TDAError(f"iterations ({a.iterations}) must be >= rank ({a.rank})")

    def _prepare(self) -> None:
        super()._prepare()
        a = self.args
        iterations = 2 * a.rank if a.iterations is None else a.iterations
        values, vectors = arnoldi_eigenpairs(self.curvature_.matvec, self.curvature_.dim, iterations, a.seed,
                                            self.device)
        values, vectors = values[: a.rank], vectors[:, : a.rank]
        keep = values > self.lam_
        if not bool(keep.any()):
            raise TDAError(
                f"no eigenvalue of the {a.curvature} above the damping {self.lam_:.3g} among the top "
                f"{a.rank}; lower damping or use curvature='ggn'"
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
