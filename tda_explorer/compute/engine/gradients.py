"""Per-sample gradients with ``torch.func`` (``functional_call`` + ``vmap(grad)``), chunked, over tensor or dict inputs
(in memory or read from a dataset in batches)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from tda_explorer._validation import TDAError, check_finite
from tda_explorer.compute.engine.task import Output, apply_loss, call_model, eval_mode
from tda_explorer.compute.training.dropout_masks import DropoutMasks
from tda_explorer.data.batching import Batch, check_inputs, describe, n_rows, take_rows, to_device
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

BATCHED_ROWS = 16  # examples per batched backward where vmap cannot run the model (see batched below)


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


class UnvectorisedWarning(UserWarning):
    """``vmap`` refused the model (a branch on the data, an in-place op in a recurrent layer, ...): its per-example
    products run unvectorised, slower, with the same numbers."""


def vmap_refused(err: RuntimeError, what: str) -> bool:
    """Whether a ``vmap`` that raised ``err`` refused the model, so that ``what`` falls back to its unvectorised form
    (said once, naming the refusal): any error but running out of memory, which the slower path would only hide (a
    fault of the model's own is raised again by that path)."""
    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return False
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    warnings.warn(f"{what} run unvectorised: vmap refused the model ({first[:160]})", UnvectorisedWarning,
                  stacklevel=3)
    return True


def _unsqueeze(x: Any) -> Any:
    return {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, Mapping) else x.unsqueeze(0)


def _source(inputs: Any, targets: torch.Tensor | None, chunk: int, device: torch.device | str,
            ) -> Iterator[tuple[slice | torch.Tensor, Any, torch.Tensor]]:
    """``(rows, inputs, targets)`` chunks on ``device``: from a dataset's ``batches`` or from in-memory inputs."""
    if isinstance(inputs, AttributionDataset):
        for rows, x, y in inputs.batches(chunk, device=device):
            yield rows, x, y if targets is None else targets[rows].to(device)
        return
    n = n_rows(inputs)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        yield rows, to_device(take_rows(inputs, rows), device), targets[rows].to(device)


def iter_per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: Callable[..., torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
    max_memory: int | None = None,
    device: str | torch.device = "cpu",
    ids: list | None = None,
    dropout_seed: int | None = None,
    argument: str = "inputs",
    output: Output = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, gradients [chunk, p])`` of ``loss_fn`` per example w.r.t. ``names``.

    ``inputs`` is a tensor ``[n, ...]``, a dict of such tensors (the model is called as ``model(**inputs)``) or an
    ``AttributionDataset`` read in batches (``targets=None``: its labels; ``ids``: its ids). ``loss_fn`` is a plain
    ``(logits, targets)`` loss, given the logits chosen by ``output``, or one marked ``takes_batch`` (the task's
    ``train_loss`` / ``test_measurement``), given the model's outputs and the ``Batch``.

    The model is run in eval mode (BatchNorm uses running statistics, Dropout is off) so that
    each example's gradient does not depend on the rest of its batch. With ``dropout_seed`` each
    example's Dropout mask is drawn from ``(dropout_seed, row)`` (``DropoutMasks``): one member of a
    dropout ensemble, the same whatever the chunking.

    Gradients come from ``vmap(grad)`` over the examples; a model that ``vmap`` cannot run (data-dependent control
    flow, as in Hugging Face attention masks) gets them from one batched forward and a backward batched over the
    examples' losses (``autograd.grad(..., is_grads_batched=True)``), which is the same per-example gradient.
    """
    if isinstance(inputs, AttributionDataset):
        ids = inputs.ids if ids is None else ids
        n = len(inputs)
    else:
        inputs = check_inputs(inputs, argument)
        n = n_rows(inputs)
        if targets is None or len(targets) != n:
            raise TDAError(f"{argument}: targets must have one row per example ({n}), got "
                           f"{None if targets is None else len(targets)}")
    restore = eval_mode(model)
    try:
        all_params = {k: v.detach().to(device) for k, v in model.named_parameters()}
        buffers = {k: v.to(device) for k, v in model.named_buffers()}
        if params is not None:  # parameters, and buffers (BatchNorm statistics) of e.g. a checkpoint
            for k, v in params.items():
                (buffers if k in buffers else all_params)[k] = v.detach().to(device)
        tracked = {k: all_params[k] for k in names}
        frozen = {k: v for k, v in all_params.items() if k not in tracked}
        n_params = sum(v.numel() for v in tracked.values())

        masks: DropoutMasks | None = None
        current: list[torch.Tensor] = []

        def one(p: dict, x: Any, y: torch.Tensor, m: list[torch.Tensor]) -> torch.Tensor:
            current[:] = m
            xb = _unsqueeze(x)
            out = call_model(model, xb, {**frozen, **p, **buffers})
            return apply_loss(loss_fn, out, Batch(xb, y.unsqueeze(0)), output).sum()

        def batched(x: Any, y: torch.Tensor, m: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            """The fallback in slices of ``BATCHED_ROWS`` examples: a backward batched over B losses runs B backward
            passes through the B-row graph, so its work grows as B² in one piece and linearly in slices."""
            slices = [slice(s, min(s + BATCHED_ROWS, len(y))) for s in range(0, len(y), BATCHED_ROWS)]
            parts = [batched_slice(take_rows(x, s), y[s], [mask[s] for mask in m]) for s in slices]
            return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

        def batched_slice(x: Any, y: torch.Tensor, m: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            current[:] = m
            leaves = {k: v.detach().requires_grad_(True) for k, v in tracked.items()}
            with torch.enable_grad():
                out = call_model(model, x, {**frozen, **leaves, **buffers})
                losses = apply_loss(loss_fn, out, Batch(x, y), output)
                if losses.shape != (len(y),):
                    raise TDAError(f"{argument}: the loss must give one value per example, got shape "
                                   f"{tuple(losses.shape)} for a batch of {len(y)}")
                eye = torch.eye(len(y), dtype=losses.dtype, device=losses.device)
                grads = torch.autograd.grad(losses, list(leaves.values()), eye, is_grads_batched=True,
                                            allow_unused=True)
            return {k: torch.zeros(len(y), *v.shape, dtype=v.dtype, device=v.device) if g is None else g
                    for (k, v), g in zip(leaves.items(), grads)}

        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))
        use_vmap = True
        chunk = _chunk_size(n_params, max_memory, n)
        for rows, x, y in _source(inputs, targets, chunk, device):
            check_cancelled()
            if isinstance(rows, slice):
                count, where = rows.stop - rows.start, f"{rows.start}..{rows.stop - 1}"
            else:
                count, where = len(rows), f"at rows {rows[:5].tolist()}"
            try:
                if dropout_seed is not None and masks is None:
                    first = take_rows(x, slice(0, 1))
                    masks = DropoutMasks(model, dropout_seed, lambda first=first: call_model(
                        model, first, {**frozen, **tracked, **buffers}))
                m = [] if masks is None else masks.rows(rows, device)
                with masks.applied(current) if masks is not None else nullcontext():
                    if use_vmap:
                        try:
                            g = per_sample(tracked, x, y, m)
                        except RuntimeError as err:  # vmap refused the model (its messages vary): the
                            # unvectorised form from here on, which raises the model's own error where the fault is
                            # not vmap's
                            if not vmap_refused(err, "per-example gradients"):
                                raise
                            use_vmap = False
                    if not use_vmap:
                        g = batched(x, y, m)
            except TDAError:
                raise
            except (RuntimeError, IndexError, TypeError) as err:  # shape / dtype / device mismatches
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TDAError(
                    f"{argument}: the model failed on examples {where} "
                    f"(inputs {describe(x)}, targets {y.dtype}): {first_line}"
                ) from err
            flat = torch.cat([g[k].reshape(count, -1) for k in names], dim=1)
            row_ids = None if ids is None else (ids[rows] if isinstance(rows, slice) else [ids[i] for i in rows])
            check_finite(flat, "per-sample gradients", row_ids)
            yield rows, flat
    finally:
        restore()


def per_sample_gradients(
    model: nn.Module,
    names: list[str],
    inputs: Any,
    targets: torch.Tensor | None,
    loss_fn: Callable[..., torch.Tensor],
    **kwargs,
) -> torch.Tensor:
    """All per-sample gradients as one ``[n, p]`` tensor (see ``iter_per_sample_gradients``)."""
    return torch.cat([g for _, g in iter_per_sample_gradients(model, names, inputs, targets, loss_fn, **kwargs)])
