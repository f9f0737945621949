"""Recording a training run step by step: each step's batch, learning rate and projected per-example gradients.

``StepRecorder`` is a callable for any training loop: call ``recorder(step, batch_positions, params, lr)`` before
each optimizer step (``train_weighted(..., callback=recorder)`` does), then ``recorder.finish(params)`` with the
final parameters. Per-example gradients are taken at the step's parameters, of the task's training loss, and
projected to ``projection_dim`` (the same seeded projection for every step), so memory is steps × batch × k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, as_device, check_positive_int
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients
from tda_explorer.compute.engine.projection import RandomProjector
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class RecordedStep:
    """One optimizer step: the batch (training positions), its learning rate and projected gradients [B, k]."""

    positions: torch.Tensor
    lr: float
    gradients: torch.Tensor


class StepRecorder:
    """Records the steps of one SGD run on ``train`` for trajectory-aware methods (data value embedding).

    Parameters
    ----------
    task : AttributionTask
        The model (its architecture), training loss and tracked parameters.
    train : AttributionDataset
        The data the positions refer to.
    batch_size : int
        The divisor of each step's summed loss (the nominal batch size of a mean loss).
    projection_dim : int, optional
        Project gradients to k dimensions (None: keep all p; only for small models).
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, batch_size: int,
                 projection_dim: int | None = 1024, seed: int = 0, device: str | torch.device | None = None):
        self.task, self.train = task, train
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = as_device(device)
        self.n_params = sum(p.numel() for n, p in task.model.named_parameters() if n in task.tracked_names())
        self.projector = None
        if projection_dim is not None and check_positive_int(projection_dim, "projection_dim") < self.n_params:
            self.projector = RandomProjector(self.n_params, projection_dim, seed=seed, device=self.device)
        self.steps: list[RecordedStep] = []
        self.final: dict[str, torch.Tensor] | None = None

    def __call__(self, step: int, positions: torch.Tensor, params: dict[str, torch.Tensor], lr: float) -> None:
        if step != len(self.steps):
            raise TDAError(f"steps must be recorded in order: expected step {len(self.steps)}, got {step}")
        rows = positions.cpu()
        if self.train.in_memory:
            inputs = self.train.inputs[rows]
        else:  # a lazy dataset (AttributionDataset.from_torch): this step's rows through its batches
            (_, inputs, _), = self.train.batches(batch_size=len(rows), rows=rows.tolist())
        chunks = [g for _, g in iter_per_sample_gradients(
            self.task.model, self.task.tracked_names(), inputs, self.train.labels[rows],
            self.task.train_loss, params={k: v.detach() for k, v in params.items()}, device=self.device)]
        grads = torch.cat(chunks)
        if self.projector is not None:
            grads = self.projector.project(grads)
        self.steps.append(RecordedStep(rows, float(lr), grads.double()))

    def finish(self, params: dict[str, torch.Tensor]) -> None:
        """The parameters after the last step (where test gradients are taken)."""
        self.final = {k: v.detach().clone() for k, v in params.items()}

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        """Test-side gradients in the recorded steps' space."""
        return (self.projector.project(gradients) if self.projector is not None else gradients).double()
