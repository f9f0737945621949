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


def baseline_metrics(suspicion: torch.Tensor, flipped: torch.Tensor, loss: torch.Tensor,
                     oof_confidence: torch.Tensor | None = None) -> dict[str, float]:
    """A mislabel ranking beside the honest baselines, so that a method that adds nothing shows it: the ranking by
    training ``loss`` (``loss_baseline_mislabel_auc``, ``loss_baseline_recall_at_10``, ``mislabel_auc_minus_loss``,
    ``recall_at_10_minus_loss`` and ``spearman_with_loss``) and, given the out-of-fold probability of each given
    label, the ranking by it ascending (cleanlab's self-confidence: ``oof_baseline_*``, ``*_minus_oof``)."""
    auc, recall = mislabel_auc(suspicion, flipped), recall_at(suspicion, flipped, 0.1)
    result = {"loss_baseline_mislabel_auc": mislabel_auc(loss, flipped),
              "loss_baseline_recall_at_10": recall_at(loss, flipped, 0.1)}
    result.update(mislabel_auc_minus_loss=auc - result["loss_baseline_mislabel_auc"],
                  recall_at_10_minus_loss=recall - result["loss_baseline_recall_at_10"],
                  spearman_with_loss=rank_correlation(suspicion, loss))
    if oof_confidence is not None:
        self_confidence = -torch.as_tensor(oof_confidence).double()
        result.update(oof_baseline_mislabel_auc=mislabel_auc(self_confidence, flipped),
                      oof_baseline_recall_at_10=recall_at(self_confidence, flipped, 0.1))
        result.update(mislabel_auc_minus_oof=auc - result["oof_baseline_mislabel_auc"],
                      recall_at_10_minus_oof=recall - result["oof_baseline_recall_at_10"])
    return result
