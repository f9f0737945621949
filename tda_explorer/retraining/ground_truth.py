"""Retraining ground truth for LDS: models retrained on random subsets, cached by fingerprint."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tda_explorer._validation import check_fraction, check_positive_int
from tda_explorer.atomic import load_tensors, save_tensors
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.training.train import stacked_outputs, train_ensemble, train_weighted

if TYPE_CHECKING:  # experiments build on retraining; only their type is named here
    from tda_explorer.experiments.digits import Experiment


@dataclass
class SubsetGroundTruth:
    """``masks[m, i]``: model m kept training example i; ``measurements[m, j]``: its test loss on j."""

    masks: torch.Tensor
    measurements: torch.Tensor


CACHE_VARIABLE = "TDA_EXPLORER_CACHE"


def default_cache_dir() -> Path:
    """Where retraining truths are cached unless a ``cache_dir`` is given: the directory named by the environment
    variable ``TDA_EXPLORER_CACHE`` (so runs from any working directory share one cache), else ``.tda_cache`` under the
    working directory."""
    return Path(os.environ.get(CACHE_VARIABLE) or ".tda_cache").expanduser()


def subset_ground_truth(
    experiment: Experiment,
    n_subsets: int = 100,
    fraction: float = 0.5,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    chunk: int = 50,
) -> SubsetGroundTruth:
    """Retrain on ``n_subsets`` random subsets of ``fraction`` of the training set (fresh seeds).

    Each retrained model gets its own initialisation seed, so the truth includes seed noise
    ("fresh-seed" truth). Results are cached under ``cache_dir`` keyed by the experiment's
    fingerprint and the subset settings; a second call is a cache hit.
    """
    n_subsets = check_positive_int(n_subsets, "n_subsets")
    fraction = check_fraction(fraction, "fraction")
    key = hashlib.sha256(f"{experiment.fingerprint()}|{n_subsets}|{fraction}|{seed}".encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "ground_truth" / f"subsets-{key}.pt"
    data = load_tensors(path)
    if data is not None:
        return SubsetGroundTruth(data["masks"], data["measurements"])
    train = experiment.split.train
    subsets, masks = random_subsets(len(train), n_subsets, fraction, seed)
    measurements = []
    for start in range(0, n_subsets, chunk):
        rows = subsets[start : start + chunk]
        seeds = [seed * 100_003 + 1 + start + i for i in range(len(rows))]
        params = train_ensemble(experiment.factory, train.inputs, train.labels, rows, experiment.config,
                                seeds=seeds, device=device)
        measurements.append(_test_losses(experiment, params, device))
    truth = SubsetGroundTruth(masks, torch.cat(measurements))
    save_tensors({"masks": truth.masks, "measurements": truth.measurements}, path,
                 {"experiment": experiment.fingerprint(), "n_subsets": n_subsets, "fraction": fraction, "seed": seed})
    return truth


def random_subsets(n: int, n_subsets: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_subsets`` random ``fraction``-subsets of ``n`` training rows (seeded): their positions
    ``[n_subsets, size]`` and membership masks ``[n_subsets, n]``."""
    size = max(1, int(round(fraction * n)))
    gen = torch.Generator().manual_seed(seed)
    subsets = torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(n_subsets)])
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    masks.scatter_(1, subsets, True)
    return subsets, masks


def _removal_masks(n: int, n_subsets: int, fraction_removed: float, seed: int) -> torch.Tensor:
    """``[n_subsets, n]`` kept-masks, each dropping ``round(fraction_removed · n)`` (at least one) examples."""
    size = max(1, int(round(fraction_removed * n)))
    gen = torch.Generator().manual_seed(seed)
    masks = torch.ones(n_subsets, n, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.randperm(n, generator=gen)[:size]] = False
    return masks


def _test_losses(experiment: Experiment, params: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """Test losses ``[M, n_test]`` of M stacked parameter sets of the experiment's architecture."""
    test = experiment.split.test
    outputs = stacked_outputs(experiment.record.model, params, test.inputs, device)
    labels = test.labels.to(outputs.device)
    return torch.stack([cross_entropy(o, labels) for o in outputs]).cpu()


def _weighted_losses(experiment: Experiment, weights: torch.Tensor, seeds: list[int], device: str,
                     chunk: int) -> torch.Tensor:
    """Test losses ``[M, n_test]`` after the engine's weighted runs (one per row, each with its seed)."""
    train = experiment.split.train
    out = []
    for start in range(0, len(weights), chunk):
        rows = slice(start, start + chunk)
        params = train_weighted(experiment.factory, train.inputs, train.labels, weights[rows].float(),
                                experiment.config, seeds[rows], device=device)
        out.append(_test_losses(experiment, params, device))
    return torch.cat(out)


def removal_ground_truth(
    experiment: Experiment,
    n_subsets: int = 100,
    fraction_removed: float = 0.01,
    same_seed: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    chunk: int = 50,
) -> SubsetGroundTruth:
    """The change of every test loss when random ``fraction_removed`` subsets are dropped, by retraining.

    ``same_seed=True``: the recipe's own run (its seed's initialisation and batch order) with the dropped
    examples' weights zeroed, so only the removal differs — the truth trajectory-exact methods estimate.
    ``same_seed=False``: for each subset a fresh seed, both the full and the reduced run (their difference), so
    the truth includes what changes from seed to seed. Measurements are differences from the full run; masks
    mark the kept examples (as ``subset_ground_truth``). Cached under ``cache_dir``.
    """
    n_subsets = check_positive_int(n_subsets, "n_subsets")
    fraction_removed = check_fraction(fraction_removed, "fraction_removed")
    kind = "same-seed" if same_seed else "fresh-seed-paired"
    key = hashlib.sha256(f"{experiment.fingerprint()}|{kind}|{n_subsets}|{fraction_removed}|{seed}".encode()
                         ).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "ground_truth" / f"removals-{key}.pt"
    data = load_tensors(path)
    if data is not None:
        return SubsetGroundTruth(data["masks"], data["measurements"])
    n = len(experiment.split.train)
    masks = _removal_masks(n, n_subsets, fraction_removed, seed)
    if same_seed:
        weights = torch.cat([torch.ones(1, n, dtype=torch.bool), masks])
        losses = _weighted_losses(experiment, weights, [experiment.config.seed] * len(weights), device, chunk)
        measurements = losses[1:] - losses[0]
    else:
        seeds = [seed * 100_003 + 7 + m for m in range(n_subsets)]
        full = _weighted_losses(experiment, torch.ones(n_subsets, n, dtype=torch.bool), seeds, device, chunk)
        measurements = _weighted_losses(experiment, masks, seeds, device, chunk) - full
    truth = SubsetGroundTruth(masks, measurements)
    save_tensors({"masks": truth.masks, "measurements": truth.measurements}, path,
                 {"experiment": experiment.fingerprint(), "kind": kind, "n_subsets": n_subsets,
                  "fraction_removed": fraction_removed, "seed": seed})
    return truth


def truth_ceiling(a: SubsetGroundTruth, b: SubsetGroundTruth) -> float:
    """Mean over test points of the Spearman correlation between two truths of the same subsets: the best LDS any
    method could score against one truth if it predicted the other exactly."""
    if not torch.equal(a.masks, b.masks):
        raise ValueError("the two truths must measure the same subsets")
    from scipy.stats import spearmanr

    values = [spearmanr(a.measurements[:, j], b.measurements[:, j])[0] for j in range(a.measurements.shape[1])]
    return float(torch.tensor(values, dtype=torch.float64).nanmean())
