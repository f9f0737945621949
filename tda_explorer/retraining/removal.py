"""Removal ground truth: leave-one-out retraining, LOO correlation, and brittleness.

Removal models are trained with the *same* initialisation seed as their reference model (paired
runs), which removes most of the seed noise from single-example effects on small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.attribution import Attribution
from tda_explorer.compute.training.train import stacked_outputs, train_ensemble

if TYPE_CHECKING:  # experiments build on retraining; only their type is named here
    from tda_explorer.experiments.digits import Experiment


def _losses_and_predictions(experiment: Experiment, params: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    test = experiment.split.test
    out = stacked_outputs(experiment.factory(0), params, test.inputs, device)
    m = out.shape[0]
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), test.labels.to(out.device).repeat(m), reduction="none")
    return loss.view(m, -1).cpu(), out.argmax(-1).cpu()


def _train_without(experiment: Experiment, removed: Sequence[Sequence[int]], seeds: Sequence[int], device: str,
                   chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Test losses and predictions ``[M, n_test]`` of models trained without each group in ``removed``."""
    train = experiment.split.train
    n = len(train)
    losses, preds = [], []
    for start in range(0, len(removed), chunk):
        groups = removed[start : start + chunk]
        kept = []
        for group in groups:
            mask = torch.ones(n, dtype=torch.bool)
            mask[list(group)] = False
            kept.append(torch.nonzero(mask).flatten())
        sizes = {len(k) for k in kept}
        if len(sizes) != 1:
            raise TDAError("groups trained together must have equal sizes")
        params = train_ensemble(experiment.factory, train.inputs, train.labels, torch.stack(kept), experiment.config,
                                seeds=list(seeds[start : start + chunk]), device=device)
        loss, pred = _losses_and_predictions(experiment, params, device)
        losses.append(loss)
        preds.append(pred)
    return torch.cat(losses), torch.cat(preds)


@dataclass
class LOOGroundTruth:
    """``delta[r, j]``: change of test loss j when training example ``positions[r]`` is removed."""

    positions: list[int]
    delta: torch.Tensor


def loo_ground_truth(experiment: Experiment, positions: Sequence[int] | None = None, n_seeds: int = 1,
                     device: str = "cpu") -> LOOGroundTruth:
    """Retrain without each training example (paired with a full-data model of the same seed)."""
    n_seeds = check_positive_int(n_seeds, "n_seeds")
    n = len(experiment.split.train)
    positions = list(range(n)) if positions is None else list(positions)
    bad = [p for p in positions if not 0 <= p < n]
    if bad:
        raise TDAError(f"positions {bad[:5]} are outside the training set (0..{n - 1})")
    if not positions:
        raise TDAError("positions must name at least one training example")
    delta = torch.zeros(len(positions), len(experiment.split.test), dtype=torch.float64)
    full_rows = torch.arange(n).expand(n_seeds, -1)
    seeds = [experiment.config.seed + 10_000 * (s + 1) for s in range(n_seeds)]
    full = train_ensemble(experiment.factory, experiment.split.train.inputs, experiment.split.train.labels,
                          full_rows, experiment.config, seeds=seeds, device=device)
    base_loss, _ = _losses_and_predictions(experiment, full, device)
    for s, seed in enumerate(seeds):
        loss, _ = _train_without(experiment, [[p] for p in positions], [seed] * len(positions), device)
        delta += (loss - base_loss[s]).double()
    return LOOGroundTruth(positions, delta / n_seeds)


def loo_correlation(attribution: Attribution, truth: LOOGroundTruth, kind: str = "spearman") -> float:
    """Mean over test points of the correlation between scores and the actual LOO change of test loss."""
    corr = {"spearman": spearmanr, "pearson": pearsonr}.get(kind)
    if corr is None:
        raise TDAError(f"kind must be 'spearman' or 'pearson', got {kind!r}")
    scores = attribution.scores[:, truth.positions].double().numpy()
    actual = truth.delta.T.numpy()  # positive = removal raised the loss = proponent
    values = [corr(scores[j], actual[j]).statistic for j in range(scores.shape[0]) if np.std(actual[j]) > 0]
    return float(np.nanmean(values))


def brittleness(experiment: Experiment, attribution: Attribution, test_ids: Sequence[Any],
                ks: Sequence[int] = (5, 10, 20, 40, 80), device: str = "cpu") -> pd.DataFrame:
    """Smallest k (from ``ks``) such that removing the top-k proponents and retraining flips the prediction.

    Returns a DataFrame with ``test_id, method, k_flip`` (NaN when no k in ``ks`` flips it).
    """
    test = experiment.split.test
    positions = test.positions(list(test_ids), "test_ids")
    train_pos = {t: i for i, t in enumerate(experiment.split.train.ids)}
    seed = experiment.config.seed
    full = train_ensemble(experiment.factory, experiment.split.train.inputs, experiment.split.train.labels,
                          torch.arange(len(experiment.split.train)).unsqueeze(0), experiment.config, seeds=[seed],
                          device=device)
    _, base_pred = _losses_and_predictions(experiment, full, device)
    k_flip = {t: float("nan") for t in test_ids}
    for k in sorted(ks):
        pending = [(t, p) for t, p in zip(test_ids, positions) if np.isnan(k_flip[t])]
        if not pending:
            break
        groups = [[train_pos[i] for i in attribution.topk(t, k)[0]] for t, _ in pending]
        _, pred = _train_without(experiment, groups, [seed] * len(groups), device)
        for r, (t, p) in enumerate(pending):
            if pred[r, p] != base_pred[0, p]:
                k_flip[t] = k
    return pd.DataFrame({"test_id": list(test_ids), "method": attribution.method, "k_flip": list(k_flip.values())})
