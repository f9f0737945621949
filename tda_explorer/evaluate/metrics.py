"""Evaluation metrics: LDS, mislabel-detection ROC-AUC and recall after inspecting a fraction."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from tda_explorer._validation import TDAError, check_fraction


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` ([M, n] each)."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / denom, np.nan)


def lds(scores: torch.Tensor, masks: torch.Tensor, measurements: torch.Tensor) -> tuple[float, np.ndarray]:
    """Linear datamodeling score.

    Parameters
    ----------
    scores : Tensor [n_test, n_train]
        Attribution scores (positive = proponent).
    masks : BoolTensor [M, n_train]
        Which training examples each retrained model kept.
    measurements : Tensor [M, n_test]
        The retrained models' test loss (loss-oriented: lower is better).

    Returns
    -------
    mean : float
        Mean over test points of Spearman(Σ_{i∈S} τ_i, −loss) across the M subsets.
    per_test : ndarray [n_test]
    """
    n_models = masks.shape[0]
    if scores.dim() != 2 or masks.shape[1] != scores.shape[1] or measurements.shape != (n_models, scores.shape[0]):
        raise TDAError(
            f"lds: shapes do not line up: scores {tuple(scores.shape)}, masks {tuple(masks.shape)}, "
            f"measurements {tuple(measurements.shape)}"
        )
    if n_models < 3 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise TDAError(
            f"lds needs at least 3 retrained subsets, 1 test and 1 training example; got masks "
            f"{tuple(masks.shape)} and scores {tuple(scores.shape)}"
        )
    predicted = masks.double() @ scores.double().T  # [M, n_test]
    per_test = _spearman_columns(predicted.numpy(), -measurements.double().numpy())
    return float(np.nanmean(per_test)), per_test


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two scores over the same examples (ties get their mean rank); NaN when either
    is constant."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if a.shape != b.shape:
        raise TDAError(f"rank_correlation: {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    return float(_spearman_columns(a.numpy()[:, None], b.numpy()[:, None])[0])


def mislabel_auc(suspicion: torch.Tensor, flipped: torch.Tensor) -> float:
    """ROC-AUC of ranking flipped labels first by ``suspicion`` (higher = more suspicious)."""
    from sklearn.metrics import roc_auc_score

    _check_pair(suspicion, flipped)
    return float(roc_auc_score(flipped.numpy().astype(int), suspicion.double().numpy()))


def recall_at(suspicion: torch.Tensor, flipped: torch.Tensor, fraction: float) -> float:
    """Share of flipped labels found after inspecting the top ``fraction`` of the ranking."""
    fraction = check_fraction(fraction, "fraction")
    _check_pair(suspicion, flipped)
    k = int(round(fraction * len(suspicion)))
    top = torch.argsort(suspicion, descending=True)[:k]
    return float(flipped[top].sum()) / max(int(flipped.sum()), 1)


def _check_pair(suspicion: torch.Tensor, flipped: torch.Tensor) -> None:
    if suspicion.shape != flipped.shape:
        raise TDAError(f"suspicion {tuple(suspicion.shape)} and flipped {tuple(flipped.shape)} differ in shape")
    if not flipped.any() or flipped.all():
        raise TDAError("flipped must contain both flipped and clean examples")
