"""Arnoldi influence (Schioppa et al. 2022): the inverse of H + λI in the subspace of its top eigenvectors.

An Arnoldi iteration (full re-orthogonalisation; Lanczos in exact arithmetic, since H is symmetric) builds an
orthonormal Krylov basis Q and the projected matrix T = QᵀHQ; its eigenpairs (μ, w) give Ritz pairs (μ, Qw).
The ``rank`` largest are kept, and of those only eigenvalues above the damping λ: near-zero or negative ones
cannot be trusted and inverting them returns non-finite scores (methods.md). Then, with P = I − UUᵀ the projection
onto the rest of the parameter space,
    τ(z, z′) = (1/n) [Σ_k (u_kᵀ∇f(z′)) (u_kᵀ∇ℓ(z)) / (μ_k + λ) + (P∇f(z′))ᵀ(P∇ℓ(z)) / (μ_c + λ)],
the second term (``complement``, on by default) taking the curvature outside the kept eigenspace as the one the
training gradients see there: μ_c = Σ_i (Pg_i)ᵀH(Pg_i) / Σ_i ‖Pg_i‖², the Rayleigh quotient of their parts outside
it (on at most 64 of them, seeded; at least the weight decay). Exact where the curvature is flat there (the weight
decay alone: a GGN's rank is at most n·C), where dropping the term (Schioppa et al.'s form, ``complement=False``)
weighs those directions zero. The mean eigenvalue there, tr(PHP) / (p − k), is smaller: most of those directions
carry no gradient, so it over-weighs the term. Measured on the zoo against both (benchmarks/README.md, "Task zoo").
With ``rank`` = p and every eigenvalue above λ all three are the explicit solve.

Back-off (``backoff.py``): a kept subspace that gives non-finite features, or no eigenvalue above a default damping,
raises the damping by decades and then falls back to EK-FAC, with a ``SolverBackoffWarning``; with an explicit
``damping`` it raises a ``TDAError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, all_finite
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, Options, option, register
from tda_explorer.compute.methods.influence.backoff import BackoffSolver, Diverged
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


COMPLEMENT_SAMPLES = 64  # training gradients whose Rayleigh quotient sets the complement's curvature


@dataclass
class ArnoldiArguments(InfluenceArguments):
    rank: int = option(100, "Ritz pairs (top eigenpairs) kept; of those, eigenvalues not above the damping are "
                            "dropped as well", POSITIVE_INT)
    iterations: int | None = option(None, "Arnoldi steps (curvature-vector products), at least rank; None: 2 × rank "
                                          "(at most p)", POSITIVE_INT)
    seed: int = option(0, "seed of the starting vector", Interval(0, None, integer=True))
    complement: bool = option(True, "add the gradients' part outside the kept eigenspace divided by the damping plus "
                                    "the curvature the training gradients see there (the Rayleigh quotient of their "
                                    "parts outside it); False drops it (Schioppa et al.)",
                              Options((False, True)))


@register("if-arnoldi", Family.PAIRWISE, ArnoldiArguments, uses=("recipe",))
class ArnoldiInfluence(BackoffSolver, InfluenceFunction):
    """Influence functions in the top-``rank`` eigenspace of the curvature, found by Arnoldi iteration.

    Fitted: ``eigenvalues_`` and ``eigenvectors_`` (the kept Ritz pairs), ``complement_eigenvalue_`` (μ_c, None without
    ``complement``), ``solver_report_`` (the settings used).
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
        self.ritz_ = values[: a.rank], vectors[:, : a.rank]
        self._reset_backoff()
        self.train_coords_ = self._solve_with_backoff(self.g_train_, attempt=self._keep)

    def _keep(self, g_train: torch.Tensor) -> torch.Tensor:
        """Keep the Ritz pairs above the damping; the training features in their basis (``Diverged`` if none or
        non-finite)."""
        a = self.args
        values, vectors = self.ritz_
        keep = values > self.lam_
        if not bool(keep.any()):
            raise Diverged(float("inf"), f"no eigenvalue of the {a.curvature} above the damping {self.lam_:.3g} "
                                         f"among the top {a.rank}; lower damping or use curvature='ggn'")
        self.eigenvalues_, self.eigenvectors_ = values[keep], vectors[:, keep]
        self.complement_eigenvalue_ = self._complement_eigenvalue() if a.complement else None
        coords = self._coords(g_train)
        if not all_finite(coords):
            raise Diverged(float("inf"), f"{self.name}: non-finite eigenpairs at damping {self.lam_:.3g}; raise "
                                         "damping or lower rank")
        return coords

    def _settings(self) -> dict:
        return {"damping": self.lam_}

    def _raise_damping(self, factor: float) -> str:
        old, self.lam_ = self.lam_, self.lam_ * factor
        return f"damping {self.lam_:.3g} (was {old:.3g})"

    def _fallen_back(self) -> bool:
        return bool(self.solver_report_["fallback"])

    def _coords(self, g: torch.Tensor) -> torch.Tensor:
        """Gradients in the kept eigenbasis, scaled by 1/√(μ + λ)."""
        return (g.double() @ self.eigenvectors_) / (self.eigenvalues_ + self.lam_).sqrt()

    def _outside(self, g: torch.Tensor) -> torch.Tensor:
        """The part of each gradient outside the kept eigenspace, P g."""
        g = g.double()
        return g - (g @ self.eigenvectors_) @ self.eigenvectors_.T

    def _floor(self) -> float:
        """The curvature's eigenvalue taken outside the kept eigenspace, plus the damping: μ_c + λ."""
        return self.complement_eigenvalue_ + self.lam_

    def _complement_eigenvalue(self, samples: int = COMPLEMENT_SAMPLES) -> float:
        """The curvature the training gradients see outside the kept eigenspace: Σ_i (Pg_i)ᵀH(Pg_i) / Σ_i ‖Pg_i‖² over
        at most ``samples`` of them (seeded); at least the weight decay."""
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        rows = torch.randperm(len(self.g_train_), generator=gen)[:samples].to(self.g_train_.device)
        z = self._outside(self.g_train_[rows])
        quotient = float((self.curvature_.matvec(z).double() * z).sum() / (z * z).sum().clamp_min(1e-300))
        return max(quotient, self.curvature_.wd)

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self._fallen_back():
            return self._ekfac_solve(rhs)
        inside = self._coords(rhs) / (self.eigenvalues_ + self.lam_).sqrt() @ self.eigenvectors_.T
        return inside + self._outside(rhs) / self._floor() if self.args.complement else inside

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        if self._fallen_back():
            return super()._attribute(test)
        g_test = self._features(test, test=True)
        scores = self._coords(g_test) @ self.train_coords_.T
        if self.args.complement:  # (P g′)ᵀ(P g) = (P g′)ᵀ g: the training gradients need no projection
            scores = scores + self._outside(g_test) @ self.g_train_.double().T / self._floor()
        return (scores / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        if self._fallen_back():
            return super()._self_influence()
        inside = (self.train_coords_**2).sum(1)
        if self.args.complement:  # ‖P g‖² = ‖g‖² − ‖Uᵀg‖², with Uᵀg = train_coords_ · √(μ + λ)
            kept = ((self.train_coords_ * (self.eigenvalues_ + self.lam_).sqrt()) ** 2).sum(1)
            inside = inside + ((self.g_train_.double() ** 2).sum(1) - kept).clamp_min(0) / self._floor()
        return (inside / len(self.train_)).float()
