"""Per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``), chunked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tda_explorer._validation import TDAError, check_finite
from tda_explorer.compute.training.dropout_masks import DropoutMasks
from tda_explorer.jobs import check_cancelled


def _chunk_size(n_params: int, max_memory: int | None, n: int) -> int:
    """Rows per chunk so one chunk of gradients (plus the same again for work space) fits the budget."""
    if max_memory is None:
        return min(n, 512)
    per_row = 3 * 4 * n_params
    if per_row > max_memory:
        raise TDAError(
            f"max_memory={max_memory} bytes is too small for one example's gradient "
            f"({n_params} parameters need about {per_row} bytes); raise max_memory"
        )
    return max(1, min(n, max_memory // per_row))


def iter_per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    max_memory: int | None = None,
    device: str | torch.device = "cpu",
    ids: list | None = None,
    dropout_seed: int | None = None,
    argument: str = "inputs",
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, gradients [chunk, p])`` of ``loss_fn`` per example w.r.t. ``names``.

    The model is run in eval mode (BatchNorm uses running statistics, Dropout is off) so that
    each example's gradient does not depend on the rest of its batch. With ``dropout_seed`` each
    example's Dropout mask is drawn from ``(dropout_seed, row)`` (``DropoutMasks``): one member of a
    dropout ensemble, the same whatever the chunking.
    """
    was_training = model.training
    model.eval()
    try:
        all_params = {k: v.detach().to(device) for k, v in model.named_parameters()}
        if params is not None:
            all_params.update({k: v.detach().to(device) for k, v in params.items()})
        buffers = {k: v.to(device) for k, v in model.named_buffers()}
        tracked = {k: all_params[k] for k in names}
        frozen = {k: v for k, v in all_params.items() if k not in tracked}
        n_params = sum(v.numel() for v in tracked.values())

        masks: DropoutMasks | None = None
        current: list[torch.Tensor] = []

        def one(p: dict, x: torch.Tensor, y: torch.Tensor, m: list[torch.Tensor]) -> torch.Tensor:
            current[:] = m
            out = functional_call(model, {**frozen, **p, **buffers}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).sum()

        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))
        chunk = _chunk_size(n_params, max_memory, len(inputs))
        for start in range(0, len(inputs), chunk):
            check_cancelled()
            rows = slice(start, min(start + chunk, len(inputs)))
            try:
                if dropout_seed is not None and masks is None:
                    masks = DropoutMasks(model, dropout_seed, lambda: functional_call(
                        model, {**frozen, **tracked, **buffers}, (inputs[:1].to(device),)))
                m = [] if masks is None else masks.rows(rows, device)
                with masks.applied(current) if masks is not None else nullcontext():
                    g = per_sample(tracked, inputs[rows].to(device), targets[rows].to(device), m)
            except (RuntimeError, IndexError) as err:  # shape / dtype / device mismatches
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TDAError(
                    f"{argument}: the model failed on examples {start}..{rows.stop - 1} "
                    f"(inputs {tuple(inputs.shape[1:])} {inputs.dtype}, targets {targets.dtype}): {first}"
                ) from err
            flat = torch.cat([g[k].reshape(rows.stop - start, -1) for k in names], dim=1)
            check_finite(flat, "per-sample gradients", None if ids is None else ids[rows])
            yield rows, flat
    finally:
        model.train(was_training)


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    **kwargs,
) -> torch.Tensor:
    """All per-sample gradients as one ``[n, p]`` tensor (see ``iter_per_sample_gradients``)."""
    return torch.cat([g for _, g in iter_per_sample_gradients(model, names, inputs, targets, loss_fn, **kwargs)])
