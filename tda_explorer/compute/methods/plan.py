"""A plan before long work: an attributor's time and memory on the whole data, measured on a few batches.

The method is run as configured on two small training subsets (and a few test examples); fitting is taken as linear
in the training set and scoring as linear in training × test pairs, and the fitted state as linear in the training
set. Chunks of per-sample gradients are sized to ``max_memory``. An estimate, not a promise: it says so, and what it
was measured on. A method that changes regime with the data's size (TRAK solves in the dual below k examples, in the
primal above) is measured in the small regime, which over-estimates its memory by a small factor.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tda_explorer._validation import TDAError
from tda_explorer.data.dataset import AttributionDataset

if TYPE_CHECKING:
    from tda_explorer.compute.methods.base import Attributor

DEFAULT_CHUNK_BYTES = 256 * 2**20  # the per-sample gradient chunk when max_memory is not given


@dataclass(frozen=True)
class Plan:
    """Estimated cost of ``fit(train)`` + ``attribute(test)`` on the whole data."""

    method: str
    n_train: int
    n_test: int
    seconds: float  # fit + attribute, extrapolated
    fitted_bytes: int  # what the fitted attributor keeps
    scores_bytes: int  # the [n_test, n_train] float32 scores
    chunk_bytes: int  # one chunk of per-sample gradients
    chunk_rows: int  # examples per chunk so that it fits max_memory
    measured_on: tuple[int, int, int]  # (small train, larger train, test) sizes run

    @property
    def peak_bytes(self) -> int:
        return self.fitted_bytes + self.scores_bytes + self.chunk_bytes

    def __str__(self) -> str:
        mb = lambda b: f"{b / 2**20:,.0f} MB" if b >= 2**20 else f"{b / 2**10:,.0f} kB"
        return (f"{self.method} on {self.n_train:,} × {self.n_test:,}: about {self.seconds:,.1f} s and "
                f"{mb(self.peak_bytes)} at the peak (fitted {mb(self.fitted_bytes)}, scores {mb(self.scores_bytes)}, "
                f"gradient chunks of {self.chunk_rows:,} examples, {mb(self.chunk_bytes)}); estimated from runs on "
                f"{self.measured_on[0]} and {self.measured_on[1]} training and {self.measured_on[2]} test examples")


def fitted_bytes(attributor: Attributor) -> int:
    """Bytes of the tensors a fitted attributor keeps (in its attributes, lists and dicts)."""
    total = 0
    for value in vars(attributor).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


def _run(attributor: Attributor, train: AttributionDataset, test: AttributionDataset) -> tuple[float, float, int]:
    """(fit seconds, attribute seconds, fitted bytes) of a fresh copy of ``attributor`` on ``train``, ``test``."""
    options = {f.name: getattr(attributor.args, f.name) for f in dataclasses.fields(attributor.args)}
    fresh = type(attributor)(attributor.task, **options)
    t0 = time.perf_counter()
    fresh.fit(train)
    t1 = time.perf_counter()
    fresh.attribute(test)
    return t1 - t0, time.perf_counter() - t1, fitted_bytes(fresh)


def estimate_plan(attributor: Attributor, train: AttributionDataset, test: AttributionDataset,
                  sizes: tuple[int, int] = (32, 96), n_test: int = 8) -> Plan:
    """Measure ``attributor`` (as configured) on the first ``sizes`` training examples and ``n_test`` test examples,
    and extrapolate to all of ``train`` and ``test``."""
    small, large = sizes
    if not 0 < small < large:
        raise TDAError(f"sizes must be two increasing positive sizes, got {sizes}")
    small, large = min(small, max(len(train) // 2, 1)), min(large, len(train))
    probe_test = test.subset(list(range(min(n_test, len(test)))))
    fit_a, attr_a, bytes_a = _run(attributor, train.subset(list(range(small))), probe_test)
    if large > small:
        fit_b, attr_b, bytes_b = _run(attributor, train.subset(list(range(large))), probe_test)
        per_example_fit = max(fit_b - fit_a, 0.0) / (large - small)
        per_example_bytes = max(bytes_b - bytes_a, 0) / (large - small)
    else:
        fit_b, attr_b, bytes_b = fit_a, attr_a, bytes_a
        per_example_fit, per_example_bytes = fit_a / small, bytes_a / small
    fit_seconds = fit_b + per_example_fit * (len(train) - large)
    attribute_seconds = attr_b / (large * len(probe_test)) * len(train) * len(test)
    fitted = int(bytes_b + per_example_bytes * (len(train) - large))
    gradient_bytes = 4 * max(attributor.n_params, 1)
    budget = attributor.max_memory or DEFAULT_CHUNK_BYTES
    chunk_rows = max(1, min(len(train), budget // gradient_bytes))
    return Plan(attributor.name, len(train), len(test), fit_seconds + attribute_seconds, fitted,
                4 * len(train) * len(test), chunk_rows * gradient_bytes, chunk_rows, (small, large, len(probe_test)))
