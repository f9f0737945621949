"""The ``Attributor`` interface every method implements: ``fit``, ``attribute``, ``self_influence``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.attribution import Attribution
from tda_explorer.compute.gradients import per_sample_gradients
from tda_explorer.compute.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset


class Attributor(ABC):
    """Scores training examples for test examples.

    Parameters
    ----------
    task : AttributionTask
        What is attributed (model, checkpoints, measurement, tracked parameters).
    device : str or torch.device, optional
        Where the computation runs (default CPU).
    max_memory : int, optional
        Budget in bytes for one chunk of per-sample gradients.
    """

    name: ClassVar[str] = "attributor"

    def __init__(self, task: AttributionTask, *, device: str | torch.device | None = None,
                 max_memory: int | None = None):
        if not isinstance(task, AttributionTask):
            raise TDAError(f"task must be an AttributionTask, got {type(task).__name__}")
        self.task = task
        self.device = as_device(device)
        self.max_memory = max_memory
        self.train_: AttributionDataset | None = None

    # -- public API -------------------------------------------------------------------------
    def fit(self, train: AttributionDataset) -> Attributor:
        """Featurise the training set; returns ``self``."""
        if not isinstance(train, AttributionDataset):
            raise TDAError(f"train must be an AttributionDataset, got {type(train).__name__}")
        self.train_ = train
        self._fit(train)
        return self

    def attribute(self, test: AttributionDataset) -> Attribution:
        """Scores ``[n_test, n_train]`` of every test example against every training example."""
        train = self._check_fitted()
        if not isinstance(test, AttributionDataset):
            raise TDAError(f"test must be an AttributionDataset, got {type(test).__name__}")
        scores = self._attribute(test)
        return Attribution(scores.float().cpu(), test.ids, train.ids, self.name, self.config())

    def self_influence(self) -> torch.Tensor:
        """Self-influence ``[n_train]`` (larger = more surprising), never via an n×n matrix."""
        self._check_fitted()
        return self._self_influence().float().cpu()

    def config(self) -> dict[str, Any]:
        """The method's configuration (JSON-able)."""
        return {"task": self.task.config()}

    # -- for subclasses ---------------------------------------------------------------------
    @abstractmethod
    def _fit(self, train: AttributionDataset) -> None: ...

    @abstractmethod
    def _attribute(self, test: AttributionDataset) -> torch.Tensor: ...

    @abstractmethod
    def _self_influence(self) -> torch.Tensor: ...

    def _check_fitted(self) -> AttributionDataset:
        if self.train_ is None:
            raise TDAError(f"{type(self).__name__} is not fitted: call fit(train) before attribute()")
        return self.train_

    def _gradients(self, data: AttributionDataset, *, test: bool, params: dict | None = None) -> torch.Tensor:
        """Per-sample gradients ``[n, p]`` of the training loss (or the test measurement)."""
        loss_fn = self.task.test_measurement if test else self.task.train_loss
        return per_sample_gradients(
            self.task.model, self.task.tracked_names(), data.inputs, data.labels, loss_fn,
            params=params, max_memory=self.max_memory, device=self.device, ids=data.ids,
        )
