"""Per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``), chunked."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tda_explorer._validation import TDAError, check_finite
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
    each example's gradient does not depend on the rest of its batch. With ``dropout_seed`` the
    Dropout modules alone are switched to train mode with one mask shared by every example (the
    same sub-network for all, re-drawn identically for each chunk): one member of a dropout
    ensemble.
    """
    was_training = model.training
    model.eval()
    if dropout_seed is not None:
        dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if not dropouts:
            raise TDAError("dropout ensemble requested but the model has no Dropout module")
        for m in dropouts:
            m.train()
    try:
        all_params = {k: v.detach().to(device) for k, v in model.named_parameters()}
        if params is not None:
            all_params.update({k: v.detach().to(device) for k, v in params.items()})
        buffers = {k: v.to(device) for k, v in model.named_buffers()}
        tracked = {k: all_params[k] for k in names}
        frozen = {k: v for k, v in all_params.items() if k not in tracked}
        n_params = sum(v.numel() for v in tracked.values())

        def one(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {**frozen, **p, **buffers}, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0)).sum()

        per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="same" if dropout_seed is not None else "error")
        chunk = _chunk_size(n_params, max_memory, len(inputs))
        for start in range(0, len(inputs), chunk):
            check_cancelled()
            rows = slice(start, min(start + chunk, len(inputs)))
            with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]):
                if dropout_seed is not None:
                    torch.manual_seed(dropout_seed)
                try:
                    g = per_sample(tracked, inputs[rows].to(device), targets[rows].to(device))
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
