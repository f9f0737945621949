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

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.catalogue import (
    POSITIVE,
    POSITIVE_INT,
    Family,
    Interval,
    Options,
    check_arguments,
    option,
    register,
)
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled


@dataclass(frozen=True)
class UnlearnConfig:
    """How a set is unlearned: ``epochs`` of gradient ascent in batches of ``batch_size`` with ``optimizer`` (UnTrac's
    options, checked when made)."""

    lr: float = option(1e-3, "learning rate of the gradient ascent: the one knob that depends on the model's scale "
                             "(default measured on the built-in digits models)", POSITIVE)
    epochs: int = option(1, "passes of gradient ascent over the unlearned set", POSITIVE_INT)
    batch_size: int = option(1, "examples per ascent step", POSITIVE_INT)
    optimizer: str = option("adam", "the ascent's optimizer (the paper finds Adam and RMSProp work, SGD fails)",
                            Options(("adam", "sgd")))
    seed: int = option(0, "seed of the order the unlearned examples are visited in", Interval(0, None, integer=True))

    def __post_init__(self) -> None:
        check_arguments(self)


@dataclass(frozen=True)
class InverseUnlearnConfig(UnlearnConfig):
    """UnTrac-Inv's recipe: a few large-batch steps on the test set (it fails at batch 1); lr measured on digits."""

    lr: float = option(1e-2, "learning rate of the gradient ascent on the test set (default measured on the built-in "
                             "digits models)", POSITIVE)
    epochs: int = option(5, "passes of gradient ascent over the test set", POSITIVE_INT)
    batch_size: int = option(256, "examples per ascent step (UnTrac-Inv needs large batches: it fails at 1)",
                             POSITIVE_INT)


@register("untrac", Family.GROUPS, UnlearnConfig, needs=("groups",))
@register("untrac-inv", Family.GROUPS, InverseUnlearnConfig, needs=("groups",))
class UnTrac:
    """Group influence by unlearning: each group (untrac, ``group_effects``) or the test set (untrac-inv).

    Parameters
    ----------
    task : AttributionTask
        The trained model and its loss / test measurement.
    config : UnlearnConfig
        The options (default ``UnlearnConfig()``; ``InverseUnlearnConfig()`` is UnTrac-Inv's recipe).
    device : str or torch.device
    """

    def __init__(self, task: AttributionTask, config: UnlearnConfig | None = None,
                 device: str | torch.device | None = None):
        if not isinstance(task, AttributionTask):
            raise TDAError(f"task must be an AttributionTask, got {type(task).__name__}")
        if config is not None and not isinstance(config, UnlearnConfig):
            raise TDAError(f"config must be an UnlearnConfig, got {type(config).__name__}")
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
