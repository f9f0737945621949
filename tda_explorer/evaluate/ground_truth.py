"""Retraining ground truth for LDS: models retrained on random subsets, cached by fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from tda_explorer._validation import check_fraction, check_positive_int
from tda_explorer.atomic import load_tensors, save_tensors
from tda_explorer.compute.training import train_ensemble
from tda_explorer.evaluate.experiment import Experiment


@dataclass
class SubsetGroundTruth:
    """``masks[m, i]``: model m kept training example i; ``measurements[m, j]``: its test loss on j."""

    masks: torch.Tensor
    measurements: torch.Tensor


def default_cache_dir() -> Path:
    return Path(".tda_cache")


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
    train, test = experiment.split.train, experiment.split.test
    n = len(train)
    size = max(1, int(round(fraction * n)))
    gen = torch.Generator().manual_seed(seed)
    subsets = torch.stack([torch.randperm(n, generator=gen)[:size] for _ in range(n_subsets)])
    masks = torch.zeros(n_subsets, n, dtype=torch.bool)
    masks.scatter_(1, subsets, True)
    base = experiment.factory(0).to("meta")
    measurements = []
    for start in range(0, n_subsets, chunk):
        rows = subsets[start : start + chunk]
        seeds = [seed * 100_003 + 1 + start + i for i in range(len(rows))]
        params = train_ensemble(experiment.factory, train.inputs, train.labels, rows, experiment.config,
                                seeds=seeds, device=device)
        with torch.no_grad():
            outputs = vmap(lambda p: functional_call(base, p, (test.inputs.to(device),)))(params)
            losses = torch.nn.functional.cross_entropy(
                outputs.flatten(0, 1), test.labels.to(device).repeat(len(rows)), reduction="none"
            ).view(len(rows), -1)
        measurements.append(losses.cpu())
    truth = SubsetGroundTruth(masks, torch.cat(measurements))
    save_tensors({"masks": truth.masks, "measurements": truth.measurements}, path,
                 {"experiment": experiment.fingerprint(), "n_subsets": n_subsets, "fraction": fraction, "seed": seed})
    return truth
