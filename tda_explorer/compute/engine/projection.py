"""Seeded random projections to k dimensions, streamed in blocks of input rows.

The same seed gives the same matrix on every device (blocks are drawn on the CPU).

The p×k matrix is never held in memory when p is large: block ``b`` (rows ``b·B … (b+1)·B``) is
regenerated from ``(seed, b)`` whenever it is needed, so every call projects with the same matrix.
Scaled by 1/√k so that inner products are preserved in expectation (Johnson–Lindenstrauss).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from tda_explorer._validation import as_device, check_choice, check_positive_int
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients

if TYPE_CHECKING:
    from tda_explorer.compute.engine.task import AttributionTask
    from tda_explorer.data.dataset import AttributionDataset

PROJECTION_KINDS = ("rademacher", "gaussian")
_DENSE_CACHE: dict[tuple, torch.Tensor] = {}  # regenerating a seeded matrix is pure cost


class Projector(ABC):
    """How per-example gradient features are formed: the part the featurisation loop (``featurize.iter_features``)
    is given, so a new kind of projection is one new subclass and touches nothing else.

    ``features`` yields ``(rows, [chunk, dim] features)`` of ``loss_fn``'s per-example gradients of the task's
    tracked parameters over ``data`` (in memory or read in batches: ``data.batches``; tensor or dict inputs);
    ``loss_fn`` is a ``(logits, targets)`` loss or one marked ``takes_batch`` (``engine.task.apply_loss``);
    ``config()`` is what identifies the projection in cache keys.
    """

    kind: str = "exact"

    @abstractmethod
    def config(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def features(self, task: AttributionTask, data: AttributionDataset,
                 loss_fn: Callable[..., torch.Tensor], *,
                 params: dict[str, torch.Tensor] | None = None, max_memory: int | None = None,
                 device: torch.device | str = "cpu", dropout_seed: int | None = None, argument: str = "inputs",
                 ) -> Iterator[tuple[slice, torch.Tensor]]: ...


class ExactGradients(Projector):
    """No projection: the per-example gradients themselves (``torch.func`` ``vmap(grad)``, chunked)."""

    def config(self) -> None:
        return None

    def features(self, task, data, loss_fn, *, params=None, max_memory=None, device="cpu", dropout_seed=None,
                 argument="inputs"):
        yield from iter_per_sample_gradients(
            task.model, task.tracked_names(), data, None, loss_fn, params=params, max_memory=max_memory,
            device=device, ids=data.ids, dropout_seed=dropout_seed, argument=argument, output=task.output)


class RandomProjector(ExactGradients):
    """Projects ``[n, p]`` rows to ``[n, k]`` with a seeded Gaussian or Rademacher matrix.

    Parameters
    ----------
    dim_in, dim_out : int
        p and k.
    kind : {"rademacher", "gaussian"}
    seed : int
    block_rows : int
        Rows of the p×k matrix generated at a time (memory: ``block_rows · k`` floats).
    cache_bytes : int
        Keep the whole matrix in memory when it is at most this big (speed), else stream.
    device : str or torch.device
    """

    def __init__(self, dim_in: int, dim_out: int, kind: str = "rademacher", seed: int = 0,
                 block_rows: int = 8192, cache_bytes: int = 256 * 2**20, device: str | torch.device | None = None):
        self.dim_in = check_positive_int(dim_in, "dim_in")
        self.dim_out = check_positive_int(dim_out, "projection_dim")
        self.kind = check_choice(kind, "projection kind", PROJECTION_KINDS)
        self.seed = int(seed)
        self.block_rows = check_positive_int(block_rows, "block_rows")
        self.device = as_device(device)
        self._dense = None
        if dim_in * dim_out * 4 <= cache_bytes:
            key = (self.dim_in, self.dim_out, self.kind, self.seed, self.block_rows, str(self.device))
            if key not in _DENSE_CACHE:
                while len(_DENSE_CACHE) >= 4:  # keep a few recent matrices, not all of them
                    _DENSE_CACHE.pop(next(iter(_DENSE_CACHE)))
                _DENSE_CACHE[key] = self._matrix()
            self._dense = _DENSE_CACHE[key]

    def config(self) -> dict:
        return {"dim_in": self.dim_in, "dim_out": self.dim_out, "kind": self.kind, "seed": self.seed}

    def features(self, task, data, loss_fn, **options):
        for rows, gradients in super().features(task, data, loss_fn, **options):
            yield rows, self.project(gradients)

    def _block(self, index: int) -> torch.Tensor:
        start = index * self.block_rows
        rows = min(self.block_rows, self.dim_in - start)
        # Drawn on the CPU whatever the device: CUDA's generator gives other numbers for the same seed,
        # and the same seed must mean the same matrix everywhere (stores are shared across devices).
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        if self.kind == "gaussian":
            block = torch.randn(rows, self.dim_out, generator=gen)
        else:
            block = torch.randint(0, 2, (rows, self.dim_out), generator=gen, dtype=torch.float32).mul_(2).sub_(1)
        return (block / self.dim_out**0.5).to(self.device)

    def _matrix(self) -> torch.Tensor:
        n_blocks = -(-self.dim_in // self.block_rows)
        return torch.cat([self._block(b) for b in range(n_blocks)])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ P`` for ``x`` of shape ``[n, p]``, in float32 on the projector's device."""
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"projector expects {self.dim_in} input features, got {x.shape[-1]}")
        x = x.to(self.device, torch.float32)
        if self._dense is not None:
            return x @ self._dense
        out = torch.zeros(x.shape[0], self.dim_out, device=self.device)
        for b, start in enumerate(range(0, self.dim_in, self.block_rows)):
            out += x[:, start : start + self.block_rows] @ self._block(b)
        return out

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of P as rows ``[stop - start, p]`` (the directions features are read along)."""
        if self._dense is not None:
            return self._dense[:, start:stop].T
        n_blocks = -(-self.dim_in // self.block_rows)
        return torch.cat([self._block(b)[:, start:stop] for b in range(n_blocks)]).T
