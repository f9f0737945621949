"""Stability of attributions across seeds and checkpoints (the Bayesian view, seed 001; Nguyen et al. 2023).

A trained model is one draw from the distribution that initialisation and SGD noise induce, so a score is a
random variable too. Scores are computed for several models (seeds × last checkpoints); each (test, train) pair
gets its mean μ, standard deviation σ, z = μ/σ and a two-sided p-value p = 2(1 − Φ(|z|)). Small p: the pair's
sign holds whatever the seed — a proponent or opponent to trust; large p: noise. ``to_frame`` is a tidy
DataFrame the explorer shows and exports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError


def z_and_p(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = μ/σ and the two-sided p-value 2(1 − Φ(|z|)); σ = 0 gives |z| = ∞ (p = 0) unless μ = 0 (p = 1)."""
    mean, std = mean.double(), std.double()
    z = torch.where(std > 0, mean / std.clamp_min(1e-300), torch.where(mean == 0, 0.0, torch.inf) * mean.sign())
    return z, 2 * (1 - torch.special.ndtr(z.abs()))


@dataclass
class Stability:
    """Per-pair statistics ``[n_test, n_train]`` of one method's scores over ``n_models`` models."""

    method: str
    test_ids: list[Any]
    train_ids: list[Any]
    mean: torch.Tensor
    std: torch.Tensor
    z: torch.Tensor
    p_value: torch.Tensor
    n_models: int

    def to_frame(self, test_ids: Sequence[Any] | None = None, alpha: float = 0.05) -> pd.DataFrame:
        """Tidy rows ``test_id, train_id, method, mean, std, z, p_value, stable`` (``stable``: p < alpha)."""
        rows = range(len(self.test_ids)) if test_ids is None else [self.test_ids.index(t) for t in test_ids]
        frames = []
        for j in rows:
            frames.append(pd.DataFrame({
                "test_id": self.test_ids[j], "train_id": self.train_ids, "method": self.method,
                "mean": self.mean[j].numpy(), "std": self.std[j].numpy(), "z": self.z[j].numpy(),
                "p_value": self.p_value[j].numpy(), "stable": (self.p_value[j] < alpha).numpy(),
            }))
        return pd.concat(frames, ignore_index=True)


def stability_from_scores(method: str, scores: torch.Tensor, test_ids: Sequence[Any],
                          train_ids: Sequence[Any]) -> Stability:
    """Statistics of stacked scores ``[n_models, n_test, n_train]`` (n_models ≥ 2)."""
    if scores.dim() != 3 or scores.shape[0] < 2:
        raise TDAError(f"scores must be [n_models >= 2, n_test, n_train], got {tuple(scores.shape)}")
    s = scores.double()
    mean, std = s.mean(0), s.std(0, unbiased=True)
    z, p = z_and_p(mean, std)
    return Stability(method, list(test_ids), list(train_ids), mean, std, z, p, s.shape[0])
