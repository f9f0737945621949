"""TrackStar (Chang et al., ICLR 2025): corrected, projected, unit-normalised gradient similarity.

    score(z, q) = Ĝ(z) · Ĝ(q),   Ĝ = G / ‖G‖,   G(z) = R^{-1/2} P (∇ℓ(z; θ_T) ⊘ (√V + ε))

in this order, each step on both sides with the same V, P and R:
1. per-example gradients at the final parameters;
2. ⊘ (√V + ε), V the optimiser's second moment (coordinates with V = 0 are dropped). Elementwise in parameter
   space, so it comes before the projection.
   Pass ``second_moment=`` (e.g. Adam's ``exp_avg_sq`` by parameter name); by default V is the mean of g² over the
   training set at θ_T (bergson's definition of its Adam normaliser), accumulated in a first gradient pass;
3. the seeded random projection P to ``projection_dim``;
4. R, the autocorrelation of the projected, corrected gradients: of the training set, or with ``query_mix`` the
   task-specific mix λ R_queries + (1−λ) R_train. ``query_mix="auto"`` picks λ so that the two sorted eigenvalue
   curves cross at component ⌈1.5% · d⌉ (TrackStar's rule for T-REx, d the projected dimension; capped below the
   queries' rank); R^{-1/2} with eigenvalues damped as (e + 0.1 · mean e)^{-1/2};
5. unit normalisation — only then are scores dot products (aggregate queries after this step, never before).

Self-influence (for mislabel rankings) is the squared norm of the corrected gradient before normalisation, since a
cosine with itself is always one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, check_fraction
from tda_explorer.compute.catalogue import NONNEGATIVE, POSITIVE_INT, Family, Options, option, register
from tda_explorer.compute.engine.featurize import iter_features
from tda_explorer.compute.engine.projection import PROJECTION_KINDS
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.data.dataset import AttributionDataset


def inverse_sqrt(matrix: torch.Tensor, relative_damping: float = 0.1) -> torch.Tensor:
    """(R + 0.1 · mean eigenvalue)^{-1/2} of a symmetric PSD ``matrix``, in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    values = values.clamp_min(0)
    damped = values + relative_damping * values.mean().clamp_min(1e-30)
    return (vectors * damped.rsqrt()) @ vectors.T


def crossing_mix(r_queries: torch.Tensor, r_train: torch.Tensor, fraction: float = 0.015) -> float:
    """λ with λ·e_q[c] = (1−λ)·e_train[c] at component c = ⌈fraction · d⌉ of the sorted eigenvalues (c capped
    below the queries' rank)."""
    e_q = torch.linalg.eigvalsh(r_queries.double()).flip(0).clamp_min(0)
    e_t = torch.linalg.eigvalsh(r_train.double()).flip(0).clamp_min(0)
    rank = int((e_q > e_q[0] * 1e-10).sum()) if e_q[0] > 0 else 1
    c = min(max(1, math.ceil(fraction * len(e_q))), max(rank - 1, 0))
    denominator = float(e_q[c] + e_t[c])
    return float(e_t[c]) / denominator if denominator > 0 else 0.0


@dataclass
class TrackStarArguments(AttributorArguments):
    projection_dim: int | None = option(1024, "the projected features per example (after the elementwise "
                                              "correction); None keeps the corrected gradients exact", POSITIVE_INT)
    projection_kind: str = option("rademacher", "random projection: dense Rademacher or Gaussian signs (LoGra's "
                                                "factored projection cannot follow the elementwise correction)",
                                  Options(PROJECTION_KINDS))
    second_moment: dict[str, torch.Tensor] | None = option(None, "the optimiser's second moment V per tracked "
                                                                 "parameter name (e.g. Adam's exp_avg_sq); None: "
                                                                 "mean g² over the training set at the final "
                                                                 "parameters", config=False)
    query_mix: float | str = option("auto", "weight λ in [0, 1] of the queries' autocorrelation in R (0: the training "
                                            "set's only, the non-task-specific variant), or 'auto': the λ where the "
                                            "two eigenvalue curves cross at component ⌈1.5% · d⌉", cli=False)
    eps: float | None = option(None, "ε in √V + ε (absolute, in units of √V); None: 10⁻³ · mean √V over the "
                                     "coordinates with V > 0 (an absolute 1e-8 lets coordinates the training set "
                                     "barely touches dominate)", NONNEGATIVE)


@register("trackstar", Family.TRACING, TrackStarArguments)
class TrackStar(Attributor):
    """TrackStar scores: corrected, projected, unit-normalised gradient similarity (see the module docstring).

    Works on any task (text or not): the corrected gradients are the task's. Fitted: ``second_moment_`` (V as one
    flat tensor over the tracked parameters, given or measured), ``train_features_``, ``r_train_``.
    """

    def _setup(self) -> None:
        a = self.args
        mix = a.query_mix if a.query_mix == "auto" else check_fraction(a.query_mix, "query_mix", inclusive_zero=True)
        self.query_mix, self.eps = mix, None if a.eps is None else float(a.eps)
        self.second_moment_ = None
        if a.second_moment is not None:
            names = self.task.tracked_names()
            missing = [n for n in names if n not in a.second_moment]
            if missing:
                raise TDAError(f"second_moment has no entry for tracked parameters {missing}")
            self.second_moment_ = torch.cat([a.second_moment[n].reshape(-1).float() for n in names]).to(self.device)

    def _scale(self) -> torch.Tensor:
        """1 / (√V + ε), and 0 where V = 0: no training gradient reaches those coordinates, so they add nothing to
        any score, yet a query's gradient there (a word no document has) would be blown up by 1/ε and, once
        projected, drown every other coordinate."""
        root = self.second_moment_.sqrt()
        eps = self.eps if self.eps is not None else 1e-3 * float(root[root > 0].mean()) if (root > 0).any() else 1.0
        return torch.where(root > 0, 1 / (root + eps), torch.zeros_like(root))

    def _corrected(self, data: AttributionDataset, test: bool) -> torch.Tensor:
        loss_fn = self.task.test_measurement if test else self.task.train_loss
        scale = self._scale()
        chunks = []
        for _, g in iter_features(self.task, data, loss_fn, None, max_memory=self.max_memory, device=self.device,
                                  argument="test" if test else "train"):
            g = g.to(self.device) * scale
            chunks.append(self.projector.project(g) if self.projector is not None else g.float())
        return torch.cat(chunks)

    def _fit(self, train: AttributionDataset) -> None:
        if self.args.second_moment is None:
            total = None
            for _, g in iter_features(self.task, train, self.task.train_loss, None, max_memory=self.max_memory,
                                      device=self.device, argument="train"):
                square = g.to(self.device).square().sum(0)
                total = square if total is None else total + square
            self.second_moment_ = total / len(train)
        self.train_features_ = self._corrected(train, test=False)
        self.r_train_ = self.train_features_.T.double() @ self.train_features_.double() / len(train)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        queries = self._corrected(test, test=True)
        r_queries = queries.T.double() @ queries.double() / len(test)
        mix = crossing_mix(r_queries, self.r_train_) if self.query_mix == "auto" else self.query_mix
        self.query_mix_ = mix
        whiten = inverse_sqrt(mix * r_queries + (1 - mix) * self.r_train_).to(queries)
        unit = lambda g: (g @ whiten) / (g @ whiten).norm(dim=1, keepdim=True).clamp_min(1e-30)
        return unit(queries) @ unit(self.train_features_).T

    def _self_influence(self) -> torch.Tensor:
        return self.train_features_.square().sum(1)
