"""Final-model-only gold standard (Wei et al., NeurIPS 2025): what further training says about each example.

When only the final model θ̂ is available (no recipe, no checkpoints), an example's attribution is how the test
losses would move if training went on without it. For each seed s a permutation of the training set is drawn; a
*full* run trains θ̂ for T more epochs in that order, and a leave-one-out run per chosen example j trains the same
batches with j's term zeroed (paired: the retraining engine's weighted runs, all in lock-step). Then
Δ_s(j, x) = ℓ(x; θ^{−j}_s) − ℓ(x; θ_s), optionally centred over j (the reference code's default), averaged over
seeds: τ_FT(j, x), positive when removing j would raise x's loss, the sign of every score here.

A method is scored by the cosine, per test point, between its scores on the chosen examples and τ_FT (both centred
over j when ``centre``), averaged over test points; plotting it against T shows which methods track short and
long further training (first-order ones early, influence functions steadier, as the paper reports).

Pure training code (``compute``): ``retraining.further_training`` re-exports it, and ``methods.calibration`` builds
its final-model-only truth on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.training.train import TrainConfig, stacked_outputs, train_weighted
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class FurtherTrainingTruth:
    """``effects[x, j]``: the seed-averaged (centred) rise of test loss x when example ``ids[j]`` is left out of
    ``epochs`` epochs of further training."""

    ids: list[Any]
    effects: torch.Tensor
    epochs: int
    seeds: list[int]
    centred: bool


def further_training_truth(task: AttributionTask, train: AttributionDataset, test: AttributionDataset,
                           ids: Sequence[Any], epochs: int, lr: float, batch_size: int = 64,
                           seeds: Sequence[int] = (0,), weight_decay: float | None = None, centre: bool = True,
                           device: str = "cpu", optimizer: str = "sgd", momentum: float = 0.0
                           ) -> FurtherTrainingTruth:
    """τ_FT for the training examples ``ids`` after ``epochs`` epochs of ``optimizer`` (default plain SGD) at ``lr``
    from the task's model."""
    epochs = check_positive_int(epochs, "epochs")
    rows = train.positions(list(ids), "ids")
    if len(set(rows)) != len(rows):
        raise TDAError("ids must not repeat")
    if not seeds:
        raise TDAError("seeds must hold at least one seed")
    n = len(train)
    state = copy.deepcopy(task.model.state_dict())

    def from_final(seed: int) -> torch.nn.Module:
        model = copy.deepcopy(task.model)
        model.load_state_dict(state)
        return model

    wd = task.weight_decay if weight_decay is None else weight_decay
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=wd, optimizer=optimizer,
                         momentum=momentum)
    weights = torch.ones(1 + len(rows), n)
    weights[torch.arange(1, 1 + len(rows)), torch.tensor(rows)] = 0
    deltas = []
    for seed in seeds:
        params = train_weighted(from_final, train.inputs, train.labels, weights, config, [int(seed)] * len(weights),
                                device=device)
        outputs = stacked_outputs(task.model, params, test.inputs, device)
        losses = torch.stack([task.test_measurement(o, test.labels.to(o.device)) for o in outputs]).double().cpu()
        delta = (losses[1:] - losses[0]).T  # [n_test, |ids|]
        deltas.append(delta - delta.mean(1, keepdim=True) if centre else delta)
    return FurtherTrainingTruth(list(ids), torch.stack(deltas).mean(0), epochs, [int(s) for s in seeds], centre)


def further_training_cosines(scores: torch.Tensor, train: AttributionDataset, truth: FurtherTrainingTruth
                             ) -> torch.Tensor:
    """Per test point ``[n_test]``: the cosine between a method's scores ``[n_test, n_train]`` on the truth's examples
    (centred over them when the truth is) and τ_FT."""
    columns = scores[:, train.positions(truth.ids, "ids")].double()
    if truth.centred:
        columns = columns - columns.mean(1, keepdim=True)
    return torch.nn.functional.cosine_similarity(columns, truth.effects, dim=1)


def further_training_cosine(scores: torch.Tensor, train: AttributionDataset, truth: FurtherTrainingTruth) -> float:
    """Mean over test points of ``further_training_cosines``."""
    return float(further_training_cosines(scores, train, truth).mean())
