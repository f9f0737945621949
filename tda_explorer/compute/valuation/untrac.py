"""UnTrac and UnTrac-Inv (Isonuma & Titov, 2024): a training group's influence read off by unlearning it.

UnTrac: from the trained parameters θ₀, run gradient *ascent* on the group's examples, then read how much every test
measurement rose: I(Z′, Z) = f(z′; θ_unlearned) − f(z′; θ₀), positive = the group helped that test example (as a
proponent's removal would raise its loss). UnTrac-Inv unlearns the *test* set once instead and reads the rise of
each group's mean training loss (cheap when there are many groups; the paper finds it tracks UnTrac only for a few
large-batch steps).

Choices (the paper's defaults are for an LM: Adam, constant lr 5e-5, batch 1, one epoch; the sensitivity table
shows SGD failing and Adam/RMSProp working): Adam, one epoch, batch 1, in a seeded order; the learning rate is the
one knob that depends on the model's scale, so ``UnlearnConfig.lr`` defaults to the value measured on the
built-in digits models (see benchmarks/README.md). The model is never modified: ascent runs on a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tda_explorer._validation import TDAError, as_device, check_choice, check_positive_int
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled


@dataclass(frozen=True)
class UnlearnConfig:
    """How a set is unlearned: ``epochs`` of gradient ascent in batches of ``batch_size`` with ``optimizer``."""

    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 1
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise TDAError(f"lr must be > 0, got {self.lr}")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_choice(self.optimizer, "optimizer", ("adam", "sgd"))


class UnTrac:
    """Group influence by unlearning.

    Parameters
    ----------
    task : AttributionTask
        The trained model and its loss / test measurement.
    config : UnlearnConfig
    device : str or torch.device
    """

    def __init__(self, task: AttributionTask, config: UnlearnConfig | None = None,
                 device: str | torch.device | None = None):
        if not isinstance(task, AttributionTask):
            raise TDAError(f"task must be an AttributionTask, got {type(task).__name__}")
        self.task, self.config, self.device = task, config or UnlearnConfig(), as_device(device)

    def _unlearned(self, data: AttributionDataset) -> torch.nn.Module:
        """A copy of the model after gradient ascent on ``data``."""
        c = self.config
        model = copy.deepcopy(self.task.model).to(self.device).eval()
        optimizer = (torch.optim.Adam if c.optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=c.lr)
        gen = torch.Generator().manual_seed(c.seed)
        x, y = data.inputs.to(self.device), data.labels.to(self.device)
        for _ in range(c.epochs):
            order = torch.randperm(len(data), generator=gen)
            for start in range(0, len(data), c.batch_size):
                check_cancelled()
                rows = order[start : start + c.batch_size].to(self.device)
                optimizer.zero_grad()
                (-self.task.train_loss(model(x[rows]), y[rows]).mean()).backward()  # ascent
                optimizer.step()
        return model

    def _measure(self, model: torch.nn.Module, data: AttributionDataset, test: bool) -> torch.Tensor:
        with torch.no_grad():
            out = model(data.inputs.to(self.device))
            labels = data.labels.to(self.device)
            values = self.task.test_measurement(out, labels) if test else self.task.train_loss(out, labels)
        return values.double().cpu()

    def group_effects(self, train: AttributionDataset, groups: Sequence[Sequence[Any]],
                      test: AttributionDataset) -> torch.Tensor:
        """UnTrac: ``[n_groups, n_test]`` rise of each test measurement after unlearning each group."""
        positions = train.group_positions(groups)
        before = self._measure(self.task.model.to(self.device), test, test=True)
        return torch.stack([self._measure(self._unlearned(train.subset(rows)), test, test=True) - before
                            for rows in positions])

    def inverse_group_effects(self, train: AttributionDataset, groups: Sequence[Sequence[Any]],
                              test: AttributionDataset) -> torch.Tensor:
        """UnTrac-Inv: ``[n_groups]`` rise of each group's mean training loss after unlearning the test set."""
        positions = train.group_positions(groups)
        before = self._measure(self.task.model.to(self.device), train, test=False)
        after = self._measure(self._unlearned(test), train, test=False)
        return torch.stack([(after[rows] - before[rows]).mean() for rows in positions])
