"""Stability across seeds and checkpoints on the built-in experiments: train the variants, score them all.

The statistics (mean, std, z, p per pair) are in ``tda_explorer.compute.engine.stability``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.stability import Stability, stability_from_scores
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.training.train import EnsembleTrainer, unstack
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.experiments.digits import Experiment


def model_variants(experiment: Experiment, n_seeds: int = 3, last_checkpoints: int = 1,
                   device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Parameters of ``n_seeds`` models trained with the experiment's recipe (the first is its own seed), each
    at its last ``last_checkpoints`` epochs: seeds × checkpoints variants, trained in lock-step."""
    check_positive_int(n_seeds, "n_seeds")
    if not 1 <= check_positive_int(last_checkpoints, "last_checkpoints") <= experiment.config.epochs:
        raise TDAError(f"last_checkpoints must be in 1..{experiment.config.epochs} (the recipe's epochs)")
    train = experiment.split.train
    seeds = [experiment.config.seed + i for i in range(n_seeds)]
    rows = torch.arange(len(train)).expand(n_seeds, -1)
    trainer = EnsembleTrainer(experiment.factory, train.inputs, train.labels, rows, experiment.config, seeds, device)
    trainer.run(experiment.config.epochs - last_checkpoints + 1)
    snapshots = [{k: v.clone() for k, v in trainer.params.items()}]
    for _ in range(last_checkpoints - 1):
        snapshots.append({k: v.clone() for k, v in trainer.run(1).items()})
    return [unstack(snap, i) for i in range(n_seeds) for snap in snapshots]


def score_stability(method: str, task: AttributionTask, variants: Sequence[dict[str, torch.Tensor]],
                    train: AttributionDataset, test: AttributionDataset, **options: Any) -> Stability:
    """Attribute ``test`` with ``method`` under each parameter variant of ``task``'s model; per-pair statistics."""
    if len(variants) < 2:
        raise TDAError(f"stability needs at least 2 models (seeds × checkpoints), got {len(variants)}")
    scores = []
    for params in variants:
        model = copy.deepcopy(task.model)
        model.load_state_dict(params)
        variant = dataclasses.replace(task, model=model, checkpoints=[])
        scores.append(get_method(method, variant, **options).fit(train).attribute(test).scores)
    return stability_from_scores(method, torch.stack(scores), test.ids, train.ids)
