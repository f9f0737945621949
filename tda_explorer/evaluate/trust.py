"""Trust checks that need no ground truth: does a method's answer depend on the model it explains?

``model_randomization`` (Adebayo et al.'s sanity check, quanda's model-randomization metric): the same method on the
same data with the model's parameters re-initialised; the mean over test points of the Spearman correlation between
the two score rows. An attribution that barely changes when the model is destroyed explains the data, not the model:
lower is better (near 0: the scores depend on what the model learned).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.evaluate.metrics import _spearman_columns


def randomized_task(task: AttributionTask, seed: int = 0) -> AttributionTask:
    """The task with every module's parameters re-initialised (seeded); its checkpoints all become that model."""
    model = copy.deepcopy(task.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    state = model.state_dict()
    # the run's optimizer kind and moments stay: only the parameters are randomised
    checkpoints = [replace(c, state_dict=copy.deepcopy(state)) for c in task.checkpoints]
    return replace(task, model=model, checkpoints=checkpoints)


def model_randomization(scores: torch.Tensor, method: str, task: AttributionTask, train: AttributionDataset,
                        test: AttributionDataset, seed: int = 0, device: str = "cpu", **options: Any) -> float:
    """Mean Spearman correlation between ``scores`` (``method`` on ``task``) and the same method's scores on the
    randomised model (lower is better)."""
    randomized = get_method(method, randomized_task(task, seed), device=device, **options).fit(train)
    other = randomized.attribute(test).scores
    return float(np.nanmean(_spearman_columns(scores.double().numpy().T, other.double().numpy().T)))
