"""The one protocol every built-in scenario satisfies, so a session, the CLI and the benchmarks treat them alike."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# what a scenario supplies for methods' declared needs
from tda_explorer.compute.catalogue import Resources
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset


@runtime_checkable
class Scenario(Protocol):
    """A built-in scenario: the data attributed (``train``: what is scored; ``test``: what is explained), the task
    (model, checkpoints, measurement), and what it supplies for methods' needs (``compute.catalogue.NEEDS``)."""

    @property
    def train(self) -> AttributionDataset: ...

    @property
    def test(self) -> AttributionDataset: ...

    def task(self) -> AttributionTask: ...

    def resources(self, device: str = "cpu") -> Resources: ...
