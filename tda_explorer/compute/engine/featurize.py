"""Per-example gradient features: which projector, and the one loop that computes them for every caller
(attributors and the sharded featuriser)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from tda_explorer._validation import TDAError, check_choice, check_positive_int
from tda_explorer.compute.engine.logra import LoGraProjector
from tda_explorer.compute.engine.projection import PROJECTION_KINDS, ExactGradients, Projector, RandomProjector
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset

ALL_KINDS = (*PROJECTION_KINDS, LoGraProjector.kind)


def make_projector(task: AttributionTask, projection_dim: int | None, kind: str = "rademacher", seed: int = 0,
                   device: torch.device | str | None = None) -> Projector | None:
    """The projector for ``task``'s tracked gradients, or None to keep them exact.

    ``kind="logra"`` projects each tracked Linear/Conv2d layer through its inputs and output gradients, with
    ``projection_dim`` the per-layer rank (each layer gives rank² features); a dense kind projects the flat
    gradient to ``projection_dim`` (None or at least the parameter count keeps it exact).
    """
    check_choice(kind, "projection_kind", ALL_KINDS)
    check_positive_int(seed, "projection_seed", allow_zero=True)
    if kind == LoGraProjector.kind:
        if projection_dim is None:
            raise TDAError("projection_kind='logra' needs projection_dim: the rank each layer side is projected to")
        return LoGraProjector(task, projection_dim, seed, device=device)
    if projection_dim is None:
        return None
    n_params = sum(p.numel() for n, p in task.model.named_parameters() if n in task.tracked_names())
    if check_positive_int(projection_dim, "projection_dim") >= n_params:
        return None
    return RandomProjector(n_params, projection_dim, kind, seed, device=device)


def iter_features(task: AttributionTask, data: AttributionDataset,
                  loss_fn: Callable[..., torch.Tensor], projector: Projector | None = None,
                  *, params: dict[str, torch.Tensor] | None = None, max_memory: int | None = None,
                  device: torch.device | str = "cpu", dropout_seed: int | None = None, argument: str = "inputs",
                  ) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, features)``: per-example gradients of ``loss_fn`` w.r.t. the tracked parameters, projected
    by ``projector`` (LoGra from layer hooks; a dense projector after ``vmap`` gradients; none: exact).

    ``data`` is read batch by batch (``data.batches``): an in-memory tensor dataset or one from ``from_torch`` with
    tensor or dict inputs; ``loss_fn`` is a ``(logits, targets)`` loss or the task's own (``task.train_loss``)."""
    source = projector if projector is not None else ExactGradients()
    yield from source.features(task, data, loss_fn, params=params, max_memory=max_memory, device=device,
                               dropout_seed=dropout_seed, argument=argument)
