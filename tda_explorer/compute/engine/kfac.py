"""Kronecker-factored curvature (K-FAC / EK-FAC) for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers, fitted
with hooks.

Per layer, each example contributes input patches a_t (a 1 appended for the bias) and output gradients s_t at
positions t: one position for a Linear layer on [B, in], the sequence positions of a Linear layer on [B, …, in],
the output pixels of a convolution (its output positions for a Conv1d; a_t the unfolded kernel-sized patch,
C_in·k_h·k_w values). The example's layer gradient is G = Σ_t s_t a_tᵀ, shaped like ``weight.view(out, -1)`` with
the bias as a last column.
Factors (KFC's spatially-uncorrelated convention, so that E[vec G vec Gᵀ] ≈ A ⊗ S):
A = E[(1/T) Σ_t a_t a_tᵀ], S = E[Σ_t s_t s_tᵀ], eigendecomposed A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ. K-FAC takes
Λ_S ⊗ Λ_A as the eigenvalues; EK-FAC refits them in the Kronecker eigenbasis, Λ_ij = E[((Q_Sᵀ G Q_A)_ij)²].
Fisher kinds (``fisher``): ``"expected"`` takes the exact expectation over the model's predicted distribution,
S = E[Σ_c p_c s_c s_cᵀ] with s_c the output gradient of the loss at label c (C − 1 backward passes per batch, one per
non-null eigenvector of the logits' curvature diag(p) − ppᵀ: ``output_curvature_roots``; classification outputs
``[B, C]`` with C ≤ ``EXPECTED_MAX_CLASSES``, otherwise one sampled label as ``"true"``); ``"true"`` samples one label
per example from the model (the same expectation, estimated: noisy, and on a near-certain model it is the observed
label); ``"empirical"`` takes the observed labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice, check_finite_rows
from tda_explorer.compute.engine.losses import (
    IGNORE,
    Batch,
    check_logits,
    cross_entropy,
    loss_curvature,
    softmax_curvature,
    takes_batch,
)
from tda_explorer.compute.engine.task import (
    AttributionTask,
    Output,
    apply_loss,
    call_model,
    eval_mode,
    pick_output,
    tied_layers,
)
from tda_explorer.data.batching import describe, n_rows, take_rows, to_device
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
SUPPORTED = (nn.Linear, *CONVOLUTIONS)
FISHERS = ("expected", "true", "empirical")
SQUARES_CHUNK_BYTES = 32 << 20  # rows of rotated gradients squared at once when refitting EK-FAC's eigenvalues
EXPECTED_MAX_CLASSES = 64  # the expected Fisher costs C − 1 backward passes; above this many classes, one sampled label
# (outputs of a batch, its first row) -> per-example loss; or, marked ``takes_batch``, (outputs, Batch) -> the same
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class LayerFactors:
    """Eigenbases and eigenvalues of one layer (weight as ``[out, in·k]`` and the bias as one more column)."""

    name: str
    q_a: torch.Tensor
    q_s: torch.Tensor
    eigenvalues: torch.Tensor  # [out, r_a]: EK-FAC corrected or K-FAC products
    # the patch side's full dimension in·k (+1) when q_a is thin (the span of the training patches: every training
    # gradient lies in it, the rest of the basis has eigenvalue 0); None: q_a is square
    width: int | None = None

    def mean_eigenvalue(self) -> float:
        """The mean over the layer's full Kronecker basis (a thin basis's missing directions count as zeros)."""
        return float(self.eigenvalues.sum()) / (self.q_s.shape[1] * (self.width or self.q_a.shape[1]))

    def to_dict(self) -> dict:
        return {"name": self.name, "q_a": self.q_a, "q_s": self.q_s, "eigenvalues": self.eigenvalues,
                "width": self.width}


def _check_conv(name: str, module: nn.Conv1d | nn.Conv2d, purpose: str, alternatives: str) -> None:
    problems = []
    if module.groups != 1:
        problems.append(f"groups={module.groups}")
    if module.padding_mode != "zeros":
        problems.append(f"padding_mode={module.padding_mode!r}")
    if isinstance(module.padding, str) and module.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
        problems.append("padding='same' with an even kernel (asymmetric padding)")
    if problems:
        raise TDAError(
            f"{purpose} cannot factor {type(module).__name__} {name!r} with {', '.join(problems)}; supported: "
            f"groups=1, zero padding. Leave this layer out (parameters=[...]) or use {alternatives}"
        )


KFAC_ALTERNATIVES = "if-explicit / if-cg / if-lissa, which take any module"


def tracked_layers(task: AttributionTask, purpose: str = "K-FAC/EK-FAC",
                   alternatives: str = KFAC_ALTERNATIVES) -> list[tuple[str, nn.Module]]:
    """The ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` modules with tracked parameters; refuse other tracked modules
    by name, saying what needs them (``purpose``) and what to use instead (``alternatives``)."""
    tracked = set(task.tracked_names())
    layers, unsupported = [], []
    shared = tied_layers(task.model)
    for name, module in task.model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if not any(p in tracked for p in own):
            continue
        if not isinstance(module, SUPPORTED):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        if name in shared:
            raise TDAError(f"layer {name!r} shares a parameter with {', '.join(map(repr, shared[name]))} (tied "
                           f"weights): {purpose} factors one layer's own weight; leave the tied layers out "
                           "(parameters=...) or use " + alternatives)
        prefix = f"{name}." if name else ""
        if prefix + "weight" not in tracked or (module.bias is not None and prefix + "bias" not in tracked):
            raise TDAError(f"layer {name!r}: track both its weight and bias (or neither) for {purpose}")
        if isinstance(module, CONVOLUTIONS):
            _check_conv(name, module, purpose, alternatives)
        layers.append((name, module))
    if unsupported:
        can = linear_layer_names(task.model)
        shown = ", ".join(repr(n) for n in can[:12]) + (f", … ({len(can)} in all)" if len(can) > 12 else "")
        raise TDAError(
            f"{purpose} supports nn.Linear, nn.Conv1d and nn.Conv2d; tracked parameters include "
            f"{', '.join(unsupported)}, which it cannot track. The layers it can track in this model: "
            f"[{shown or 'none'}]. Track only those (parameters=linear_layer_names(model)) or use {alternatives}"
        )
    return layers


def default_layers(task: AttributionTask) -> tuple[list[str], list[str]]:
    """For a task that tracks every parameter (``parameters=None``): the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
    modules a Kronecker method can factor (``parameters=`` names), and the other modules with trainable parameters it
    skips (each as ``"name (Type)"``; a convolution it cannot factor, e.g. grouped, and layers whose weights are tied
    to another's are skipped too)."""
    keep, skipped = [], []
    shared = tied_layers(task.model)
    for name, module in task.model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if name in shared:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}, tied with {', '.join(shared[name])})")
            continue
        if isinstance(module, SUPPORTED):
            try:
                if isinstance(module, CONVOLUTIONS):
                    _check_conv(name, module, "", "")
                keep.append(name)
                continue
            except TDAError:
                pass
        skipped.append(f"{name or '<root>'} ({type(module).__name__})")
    return keep, skipped


def linear_layer_names(model: nn.Module, under: str = "") -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` modules of ``model`` (below the module ``under``),
    ready for ``AttributionTask(parameters=...)`` when a method needs Kronecker-structured layers."""
    prefix = f"{under}." if under else ""
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED) and (not under or n == under
                                                                                 or n.startswith(prefix))]


def conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """A convolution's zero padding, one integer per spatial dimension (``'valid'`` / symmetric ``'same'``
    resolved)."""
    padding = module.padding
    if isinstance(padding, str):
        padding = (0,) * len(module.kernel_size) if padding == "valid" else tuple(
            d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return tuple(padding)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches ``[B, in·k, T]`` of a layer (feature-major, ``unfold``'s layout; the bias's constant 1 is
    implied, never materialised). Convolutions take windows of the padded input as a view and copy them once,
    which equals ``unfold`` and on the CPU is 5× faster."""
    if isinstance(module, nn.Conv2d):
        (ph, pw), (dh, dw) = conv_padding(module), module.dilation
        (sh, sw), (kh, kw) = module.stride, module.kernel_size
        padded = nn.functional.pad(x, (pw, pw, ph, ph))
        windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        return windows.permute(0, 1, 4, 5, 2, 3).reshape(len(x), -1, windows.shape[2] * windows.shape[3])
    if isinstance(module, nn.Conv1d):  # the same windows along one dimension: [B, in, L] -> [B, in·k, T]
        (p,), (d,), (stride,), (k,) = conv_padding(module), module.dilation, module.stride, module.kernel_size
        windows = nn.functional.pad(x, (p, p)).unfold(2, d * (k - 1) + 1, stride)[..., ::d]  # [B, in, T, k]
        return windows.permute(0, 1, 3, 2).reshape(len(x), -1, windows.shape[2])
    return x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2)


def _output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients ``[B, out, T]`` of a layer."""
    if isinstance(module, CONVOLUTIONS):
        return g.flatten(2)
    return g.reshape(len(g), -1, g.shape[-1]).transpose(1, 2)


def _overflow(argument: str, ids: Sequence, tensors: list[torch.Tensor]) -> TDAError:
    """The error for a batch whose per-example products overflowed: the ids of the rows (of ``ids``, the batch's)
    with a value of ``tensors`` that is non-finite or whose square is (all of them when none stands out)."""
    bad = torch.zeros(len(ids), dtype=torch.bool)
    for t in tensors:  # a tensor with a block of rows per class (the expected Fisher) folds onto the batch's rows
        rows_bad = (~torch.isfinite(t.detach() * t.detach()).reshape(len(t), -1)).any(1).cpu()
        bad |= rows_bad.reshape(-1, len(ids)).any(0)
    rows = torch.nonzero(bad).flatten().tolist() or list(range(len(ids)))
    named = [ids[r] for r in rows[:10]]
    more = f" and {len(rows) - len(named)} more" if len(rows) > len(named) else ""
    return TDAError(f"{argument}: per-sample gradients overflow (values too large for {tensors[0].dtype}) for ids "
                    f"{named}{more}; rescale or drop these examples")


def _batch_ids(ids: Sequence, start: int, patches: dict[str, torch.Tensor]) -> tuple[Sequence, int]:
    """The ids of the batch whose patches are ``patches`` (it starts at row ``start``), and the next batch's start."""
    stop = start + len(next(iter(patches.values())))
    return ids[start:stop], stop


def _check_finite_inputs(x: Any, argument: str, ids: Sequence | None) -> None:
    for value in (x.values() if isinstance(x, Mapping) else [x]):
        check_finite_rows(value, argument, ids)


def _row_range(rows: slice | torch.Tensor) -> str:
    return f"{rows.start}..{rows.stop - 1}" if isinstance(rows, slice) else f"at rows {rows[:5].tolist()}"


def layer_activity(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Any,
                   losses: list[LossFn], batch_size: int, device: torch.device | str,
                   params: dict[str, torch.Tensor] | None = None, *, argument: str | None = None,
                   ids: Sequence | None = None, output: Output = None,
                   ) -> Iterator[tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Per batch: each layer's input patches ``[B, in, T]``, and for each loss its output gradients
    ``[B, out, T]`` (one forward, one backward per loss; parameter gradients are never accumulated).
    With ``params`` the model runs on ``device`` with those parameters in place of its own (e.g. a
    checkpoint's; ``{}``: its own, copied to ``device`` — the model itself is never moved).

    ``inputs`` is a tensor, a dict of tensors (the model is called as ``model(**inputs)``) or an
    ``AttributionDataset``, read in batches of ``batch_size``. A loss is called as ``loss(outputs, first_row)``, or,
    when marked ``takes_batch``, as ``loss(outputs, batch)`` with the ``Batch`` (labels only from a dataset).

    With ``argument`` (the caller's name for ``inputs``, e.g. ``"train"``) bad input is a ``TDAError`` naming it,
    as for the gradient methods: non-finite inputs, outputs or output gradients with the first offending ``ids``
    (row positions without them), and a model failure (shape / dtype / device mismatch) with the examples'
    range; without it, errors propagate as raised."""
    if isinstance(inputs, AttributionDataset):
        if argument is not None and ids is None:
            ids = inputs.ids
        source = inputs.batches(batch_size)
    else:
        n = n_rows(inputs)
        if argument is not None and ids is None:
            ids = range(n)
        source = ((slice(s, min(s + batch_size, n)), take_rows(inputs, slice(s, min(s + batch_size, n))), None)
                  for s in range(0, n, batch_size))
    if params is not None:
        weights = {**dict(model.named_parameters()), **params}  # leaves that need grad keep layer outputs in the graph
        state = {**{k: v.to(device) for k, v in model.named_buffers()},
                 **{k: v.detach().to(device).requires_grad_(v.is_floating_point()) for k, v in weights.items()}}
    else:
        state = None
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in layers:
        def hook(mod, args, out, name=name):
            if name in captured:  # a module the forward runs twice: its weight's gradient sums both uses
                raise TDAError(f"layer {name!r} runs more than once in one forward (a reused module): a Kronecker "
                               "factor belongs to one use of a weight; leave it out (parameters=...) or use if-cg / "
                               "if-lissa, which take any module")
            captured[name] = (args[0].detach(), out)
        handles.append(module.register_forward_hook(hook))
    try:
        for rows, x, y in source:
            check_cancelled()
            start = rows.start if isinstance(rows, slice) else int(rows[0])
            batch_ids = None if ids is None else (
                ids[rows] if isinstance(rows, slice) else [ids[i] for i in rows.tolist()])
            if argument is not None:
                _check_finite_inputs(x, argument, batch_ids)
            try:
                x, y = to_device(x, device), to_device(y, device)
                batch = Batch(x, y)
                captured.clear()
                with torch.enable_grad():
                    out = call_model(model, x, state)
                    if argument is not None:
                        logits = pick_output(out, output)
                        check_finite_rows(logits.detach(), argument, batch_ids, "the model's outputs")
                    outputs = [captured[name][1] for name, _ in layers]
                    patches = {name: _patches(module, captured[name][0]) for name, module in layers}
                    grads = []
                    for loss in losses:
                        if getattr(loss, "expected_fisher", False):
                            grads.append(_expected_output_grads(loss, out, batch, outputs, layers, argument,
                                                                batch_ids))
                            continue
                        value = loss(out, batch) if getattr(loss, "takes_batch", False) else loss(out, start)
                        g = torch.autograd.grad(value.sum(), outputs, retain_graph=True, allow_unused=True)
                        g = [torch.zeros_like(o) if gi is None else gi for o, gi in zip(outputs, g)]
                        grads.append({name: _output_grads(m, gi.detach()) for (name, m), gi in zip(layers, g)})
                        if argument is not None:
                            for gi in grads[-1].values():
                                check_finite_rows(gi, argument, batch_ids, "per-sample gradients")
            except TDAError:
                raise
            except (RuntimeError, IndexError, TypeError) as err:  # shape / dtype / device mismatches
                if argument is None:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TDAError(f"{argument}: the model failed on examples {_row_range(rows)} "
                               f"(inputs {describe(x)}): {first}") from err
            yield patches, grads
    finally:
        for h in handles:
            h.remove()


def _expected_output_grads(loss: Any, out: Any, batch: Batch, outputs: list[torch.Tensor],
                           layers: list[tuple[str, nn.Module]], argument: str | None,
                           batch_ids: Sequence | None) -> dict[str, torch.Tensor]:
    """The expected Fisher's output gradients, stacked in blocks of rows ``[k·B, out, T]`` whose Σ s sᵀ is
    Σ_c p_c s_c s_cᵀ (s_c: the output gradient of the cross-entropy at label c). At the logits that sum is
    Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag(p) − ppᵀ, of rank C − 1 (the constant vector is in its null space), so each
    example's cotangents are that matrix's C − 1 non-null eigenvectors scaled by √eigenvalue: one vector-Jacobian
    product per eigenvector index, C − 1 in all instead of one per class, and the same Fisher, its factors and
    eigenvalue corrections (each a sum over the rows of squares or products, unchanged by an orthogonal change of the
    rows). Outputs that are not ``[B, C]`` logits with C ≤ ``EXPECTED_MAX_CLASSES`` (sequences, large vocabularies)
    take one label sampled from the model instead (``loss.sampled``)."""
    logits, labels = loss(out, batch)
    if logits.dim() != 2 or logits.shape[-1] > EXPECTED_MAX_CLASSES:
        if loss.curvature is not None:  # not the cross-entropy: no labels to sample, the given ones serve
            warnings.warn(f"the expected Fisher of your loss is expanded over at most {EXPECTED_MAX_CLASSES} classes "
                          f"of [n, C] outputs; over outputs {tuple(logits.shape[1:])} per example its empirical "
                          "Fisher (the loss at the given labels) is used", UserWarning, stacklevel=2)
        value = loss.sampled(out, batch)
        g = torch.autograd.grad(value.sum(), outputs, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(o) if gi is None else gi for o, gi in zip(outputs, g)]
        per_class = [[_output_grads(m, gi.detach()) for (_, m), gi in zip(layers, g)]]
    else:
        per_class = []
        curvature = None if loss.curvature is None else loss.curvature(logits, batch)
        for v in output_curvature_roots(logits.detach(), labels, getattr(loss, "most_rows", None),
                                        getattr(loss, "generator", None), curvature):
            g = torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(o) if gi is None else gi for o, gi in zip(outputs, g)]
            per_class.append([_output_grads(m, gi.detach()) for (_, m), gi in zip(layers, g)])
    result = {}
    for i, (name, _) in enumerate(layers):
        if argument is not None:
            for grads in per_class:
                check_finite_rows(grads[i], argument, batch_ids, "per-sample gradients")
        result[name] = torch.cat([grads[i] for grads in per_class]) if len(per_class) > 1 else per_class[0][i]
    return result


def output_curvature_roots(logits: torch.Tensor, labels: torch.Tensor | None, most: int | None = None,
                           generator: torch.Generator | None = None,
                           curvature: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For logits ``[B, C]``: C − 1 cotangents ``[B, C]`` (``max(C − 1, 1)``) whose Σ_k v_k v_kᵀ is, example by example,
    the cross-entropy's expected curvature at the logits diag(p) − ppᵀ (p = softmax(logits)): its eigenvectors scaled
    by √eigenvalue, the null one (the smallest, along the constant vector) left out; rows whose label is ``IGNORE``
    are zero. With ``curvature`` ``[B, C, C]``, another loss's Hessian in the outputs (``losses.loss_curvature``), its C
    roots instead (no null direction known). With ``most`` (≥ 2) and more roots than that, ``most`` cotangents
    instead: the ``most − 1`` largest exactly and the rest sketched into one, Σ_j ε_j v_j with random signs ε_j (from
    ``generator``), whose expected outer product is theirs (E[ε_i ε_j] = δ_ij): the same curvature in expectation, in
    fewer rows."""
    classes = logits.shape[1]
    keep = list(range(1, classes)) if curvature is None and classes > 1 else list(range(classes))
    if curvature is None:
        curvature = softmax_curvature(logits)
    values, vectors = torch.linalg.eigh(curvature)
    roots = vectors * values.clamp_min(0).sqrt()[:, None, :]
    if labels is not None:
        roots = roots * (labels != IGNORE).to(roots.dtype)[:, None, None]
    if most is not None and most < 2:
        raise ValueError(f"most must be at least 2 (the largest root and the sketch of the rest), got {most}")
    if most is not None and len(keep) > most:  # ascending eigenvalues: the tail first
        tail, keep = keep[:-(most - 1)], keep[-(most - 1):]
        signs = torch.randint(0, 2, (len(logits), len(tail)), generator=generator).to(roots) * 2 - 1
        sketch = (roots[:, :, tail] * signs[:, None, :]).sum(2)
        return [sketch.to(logits.dtype)] + [roots[:, :, k].to(logits.dtype) for k in keep]
    return [roots[:, :, k].to(logits.dtype) for k in keep]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Σ over examples and positions of x_t x_tᵀ for ``x`` ``[B, d, T]``, by the fastest route for the shape
    (measured: one product for T = 1, batched products for small d, one flattened product otherwise)."""
    batch, d, positions = x.shape
    if positions == 1:
        flat = x[:, :, 0]
        return flat.T @ flat
    if batch * d * d <= 2**24:
        return torch.bmm(x, x.transpose(1, 2)).sum(0)
    flat = x.permute(1, 0, 2).reshape(d, -1)
    return flat @ flat.T


def _patch_covariance(a: torch.Tensor, bias: bool) -> torch.Tensor:
    """Σ over examples and positions of [a; 1][a; 1]ᵀ (float64)."""
    m = _gram(a).double()
    if not bias:
        return m
    total = a.sum((0, 2)).double()
    count = torch.tensor([[float(a.shape[0] * a.shape[2])]], dtype=torch.float64, device=a.device)
    return torch.cat([torch.cat([m, total[:, None]], 1), torch.cat([total[None], count], 1)], 0)


def _layer_gradients(a: torch.Tensor, s: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-example layer gradients ``[B, out, in (+1)]`` = Σ_t s_t [a_t; 1]ᵀ."""
    g = s @ a.transpose(1, 2)
    return torch.cat([g, s.sum(2, keepdim=True)], dim=2) if bias else g


def sandwich(q_s: torch.Tensor, a: torch.Tensor, s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Per-example ``q_sᵀ (Σ_t s_t [a_t; 1]ᵀ) q_a`` ``[len(s), r_s, r_a]`` for patches ``a`` ``[B, in, T]`` and output
    gradients ``s`` ``[k·B, out, T]`` (k blocks of rows sharing the patches: the expected Fisher's C − 1);
    the bias's 1 is implied when ``q_a`` has ``in + 1`` rows. Projects the patches (once for the k blocks) and the
    gradients first when that is cheaper (few positions, or narrow ``q``: then the layer's full gradient is never
    formed), else forms the gradient and multiplies it."""
    width, positions, out = a.shape[1], a.shape[2], s.shape[1]
    r_a, r_s, blocks = q_a.shape[1], q_s.shape[1], len(s) // len(a)
    bias = q_a.shape[0] == width + 1
    q_a, q_s = q_a.to(a), q_s.to(a)
    project_first = positions * (width * r_a / blocks + out * r_s + r_s * r_a)
    gradient_first = out * width * (positions + r_s) + r_s * width * r_a
    if project_first <= gradient_first:
        projected = _projected_patches(a, q_a)
        if blocks > 1:
            projected = projected.repeat(blocks, 1, 1)
        return (s.transpose(1, 2) @ q_s).transpose(1, 2) @ projected
    a = a.repeat(blocks, 1, 1) if blocks > 1 else a
    return q_s.T @ _layer_gradients(a, s, bias) @ q_a


def _projected_patches(a: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Patches ``a`` ``[B, in, T]`` in the basis ``q_a`` (``in`` or ``in + 1`` rows: the bias's 1 implied),
    ``[B, T, r_a]`` as one matrix product."""
    width = a.shape[1]
    projected = a.transpose(1, 2) @ q_a[:width].to(a)
    return projected + q_a[width].to(a) if q_a.shape[0] == width + 1 else projected


def sandwich_squares(q_s: torch.Tensor, a: torch.Tensor, s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """``Σ_i sandwich(q_s, a, s, q_a)_i²`` ``[r_s, r_a]`` in float64 without holding every row's ``[r_s, r_a]`` at once:
    with one position, each rotated gradient is the outer product of the projected output gradient and patch, so the
    sum is one product of their squares; otherwise rows are taken ``SQUARES_CHUNK_BYTES`` at a time."""
    positions, batch = a.shape[2], len(a)
    if positions == 1:
        a_sq = _projected_patches(a, q_a)[:, 0].double() ** 2
        s_sq = (s[:, :, 0] @ q_s.to(s)).double() ** 2
        return sum(s_sq[b : b + batch].T @ a_sq for b in range(0, len(s), batch))
    per_row = q_s.shape[1] * q_a.shape[1] * a.element_size()
    rows = max(1, SQUARES_CHUNK_BYTES // per_row)
    total = 0
    for b in range(0, len(s), batch):  # the expected Fisher's C − 1 blocks of rows share the patches
        for i in range(0, batch, rows):
            part = sandwich(q_s, a[i : i + rows], s[b + i : b + min(i + rows, batch)], q_a)
            total = total + (part.double() ** 2).sum(0)
    return total


def _rotated_layer_gradients(f: LayerFactors, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-example layer gradients in the Kronecker eigenbasis, ``Q_Sᵀ G Q_A``."""
    return sandwich(f.q_s, a, s, f.q_a)


def _sampler(task: AttributionTask, fisher: str, seed: int) -> tuple[LossFn, torch.Generator]:
    """The loss whose output gradients make the Fisher of kind ``fisher`` (``FISHERS``); for ``"expected"`` a
    marked callable giving ``(logits, labels)``, expanded over the classes by ``layer_activity`` (with ``curvature``:
    the task's own loss's Hessian in the outputs where it is not the cross-entropy), with ``sampled`` (the ``"true"``
    loss; the training loss itself where that is not the cross-entropy) for outputs it does not expand. The
    ``"empirical"`` loss is the task's training loss. ``"true"`` draws labels from the softmax, the cross-entropy's
    model of the labels; under another loss, which has none, it is the ``"expected"`` Fisher, the loss's curvature in
    the outputs (what the sampled labels' Fisher averages to under the cross-entropy)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if fisher == "true" and not task.cross_entropy_loss:
        fisher = "expected"

    @takes_batch
    def loss(out: Any, batch: Batch) -> torch.Tensor:
        if fisher == "empirical" or not task.cross_entropy_loss:  # the training loss at the given labels
            return task.train_loss(out, batch)
        logits, y = task.logits(out), batch.labels  # labels drawn from the model; ignored positions stay ignored
        check_logits(logits, y)
        probs = logits.detach().flatten(0, -2).softmax(-1).cpu().double()
        drawn = torch.multinomial(probs, 1, generator=gen).view_as(y).to(logits.device)
        return cross_entropy(logits, torch.where(y == IGNORE, y, drawn))

    if fisher == "expected":
        def expected(out: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            logits = task.logits(out)
            check_logits(logits, batch.labels)
            return logits, batch.labels

        expected.expected_fisher = True
        expected.sampled = loss
        expected.curvature = None if task.cross_entropy_loss else (
            lambda logits, batch: loss_curvature(task, logits, batch))
        return expected, gen
    return loss, gen


def _on_batch(task: AttributionTask, loss: Callable[..., torch.Tensor]) -> LossFn:
    """``loss`` (a ``(logits, targets)`` loss or one taking the batch) as a ``layer_activity`` loss of the batch."""
    return takes_batch(lambda out, batch: apply_loss(loss, out, batch, task.output))


def fit_factors(task: AttributionTask, train: AttributionDataset, fisher: str = "expected", corrected: bool = True,
                batch_size: int = 256, seed: int = 0, device: torch.device | str = "cpu") -> list[LayerFactors]:
    """Fit K-FAC (``corrected=False``) or EK-FAC factors of the tracked Linear / convolutional layers on ``train``."""
    return fit_factors_and_gradients(task, train, fisher, corrected, batch_size, seed, device)[0]


def fit_factors_and_gradients(task: AttributionTask, train: AttributionDataset, fisher: str = "expected",
                              corrected: bool = True, batch_size: int = 256, seed: int = 0,
                              device: torch.device | str = "cpu",
                              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                              dtype: torch.dtype = torch.float32) -> tuple[list[LayerFactors], torch.Tensor | None]:
    """Factors as ``fit_factors``, and with ``loss`` each training example's gradient of it in the eigenbasis
    (as ``rotated_gradients``), taken in the EK-FAC correction pass: one forward, two backwards per batch.

    Products run in the model's precision; covariances and eigenvalues accumulate in float64.
    """
    model = task.model
    restore = eval_mode(model)
    model.to(device)
    rotated = None
    try:
        rows: dict[str, list] = {}
        factors = eigenbases(layer_covariances(task, train, fisher, batch_size, seed, device, argument="train",
                                               rows=rows), rows)
        if corrected:
            factors, rotated = corrected_eigenvalues(task, train, factors, fisher, batch_size, seed, device, loss,
                                                     dtype, argument="train")
    finally:
        restore()
    if loss is not None and rotated is None:
        rotated = rotated_gradients(task, factors, train, loss, batch_size, device, dtype, argument="train")
    return factors, rotated


def layer_covariances(task: AttributionTask, train: AttributionDataset, fisher: str = "expected", batch_size: int = 256,
                      seed: int = 0, device: torch.device | str = "cpu", params: dict | None = None,
                      argument: str = "train", rows: dict[str, list] | None = None,
                      ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """Per tracked layer, the float64 means (A, S) of patch and output-gradient outer products (at ``params``);
    bad input is a ``TDAError`` naming ``argument`` (see ``layer_activity``). With ``rows`` (a dict), the patch
    rows [a; 1] of each layer whose patches number at most half its width are kept there instead of its A (None):
    less memory than the wide covariance, whose place their Gram matrix takes in ``eigenbases``."""
    check_choice(fisher, "fisher", FISHERS)
    layers = tracked_layers(task)
    sampled, _ = _sampler(task, fisher, seed)
    n = len(train)
    covs: dict[str, list] = {name: [0, 0] for name, _ in layers}
    start = 0
    for patches, (grads,) in layer_activity(task.model, layers, train, [sampled], batch_size, device, params,
                                            argument=argument, ids=train.ids, output=task.output):
        batch_ids, start = _batch_ids(train.ids, start, patches)
        for name, module in layers:
            a, s = patches[name], grads[name]
            cov_s = _gram(s).double()
            if rows is not None and 2 * n * a.shape[2] <= a.shape[1] + (module.bias is not None):
                patch = a.transpose(1, 2).reshape(-1, a.shape[1]).double()
                ones = torch.ones(len(patch), 1, dtype=torch.float64, device=patch.device)
                patch = torch.cat([patch, ones], 1) if module.bias is not None else patch
                if not (float(a.abs().max()) ** 2 <= torch.finfo(a.dtype).max and torch.isfinite(cov_s).all()):
                    raise _overflow(argument, batch_ids, [a, s])
                rows.setdefault(name, []).append(patch)
                covs[name][0] = None  # the rows stand in for the wide covariance (``eigenbases``)
            else:
                cov_a = _patch_covariance(a, module.bias is not None)
                if not (torch.isfinite(cov_a).all() and torch.isfinite(cov_s).all()):
                    raise _overflow(argument, batch_ids, [a, s])
                covs[name][0] = covs[name][0] + cov_a / (n * a.shape[2])
            covs[name][1] = covs[name][1] + cov_s / n
    return {name: (cov_a, cov_s) for name, (cov_a, cov_s) in covs.items()}


def eigenbases(covariances: dict[str, tuple[torch.Tensor | None, torch.Tensor]],
               rows: dict[str, list] | None = None) -> list[LayerFactors]:
    """K-FAC factors: each layer's eigenbases of (A, S) with the Kronecker products of their eigenvalues. A layer
    with its patch ``rows`` (``layer_covariances``) gets the thin basis of their span from their Gram matrix: with
    A = XᵀX / c and XXᵀ / c = V Λ Vᵀ, the eigenvectors are Xᵀ V Λ^(-1/2) / √c (an N×N eigenproblem for N patches
    instead of the width's)."""
    factors = []
    for name, (cov_a, cov_s) in covariances.items():
        ev_s, q_s = torch.linalg.eigh(cov_s)
        if rows and name in rows:
            x = torch.cat(rows[name])
            count = len(x)
            ev_a, v = torch.linalg.eigh(x @ x.T / count)
            keep = ev_a > ev_a.max().clamp_min(1e-300) * 1e-10
            ev_a, q_a = ev_a[keep], x.T @ v[:, keep] / (count * ev_a[keep]).sqrt()
            width = x.shape[1]
        else:
            ev_a, q_a = torch.linalg.eigh(cov_a)
            width = None
        factors.append(LayerFactors(name, q_a, q_s, torch.outer(ev_s.clamp_min(0), ev_a.clamp_min(0)), width))
    return factors


def corrected_eigenvalues(task: AttributionTask, train: AttributionDataset, factors: list[LayerFactors],
                          fisher: str = "expected", batch_size: int = 256, seed: int = 0,
                          device: torch.device | str = "cpu",
                          loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                          dtype: torch.dtype = torch.float32, params: dict | None = None, argument: str = "train",
                          ) -> tuple[list[LayerFactors], torch.Tensor | None]:
    """EK-FAC: the eigenvalues refitted in the factors' bases (mean over examples, at ``params``), and with ``loss``
    each example's gradient of it in those bases, from the same forward pass; bad input is a ``TDAError`` naming
    ``argument`` (see ``layer_activity``)."""
    layers = tracked_layers(task)
    sampled, gen = _sampler(task, fisher, seed)  # the same sampled labels as for the covariances
    n = len(train)
    lam: dict[str, torch.Tensor | int] = {f.name: 0 for f in factors}
    losses = [sampled]
    if loss is not None:
        losses.append(_on_batch(task, loss))
    rotated, start = _RotatedRows(factors, n, dtype) if loss is not None else None, 0
    for patches, grads in layer_activity(task.model, layers, train, losses, batch_size, device, params,
                                         argument=argument, ids=train.ids, output=task.output):
        batch_ids, start = _batch_ids(train.ids, start, patches)
        for f in factors:
            a, s = patches[f.name], grads[0][f.name]  # the expected Fisher: s has C − 1 blocks of rows
            squares = sandwich_squares(f.q_s, a, s, f.q_a)
            if not torch.isfinite(squares).all() or float(squares.max()) > torch.finfo(a.dtype).max:
                raise _overflow(argument, batch_ids, [_rotated_layer_gradients(f, a, s)])
            lam[f.name] = lam[f.name] + squares / n
        if loss is not None:
            rotated.add(patches, grads[1], argument, batch_ids)
    return ([LayerFactors(f.name, f.q_a, f.q_s, lam[f.name], f.width) for f in factors],
            rotated.rows if rotated is not None else None)


def fisher_rows_per_example(data: AttributionDataset, fisher: str, most: int | None = None,
                            cross_entropy_loss: bool = True) -> int:
    """How many Fisher rows ``fisher_and_gradient_rows`` makes per example: C − 1 for the expected Fisher of C class
    labels under the cross-entropy, C under another loss (``output_curvature_roots``; up to ``EXPECTED_MAX_CLASSES``:
    above it, or for sequences, one sampled label; at most ``most``, the rest sketched), else one."""
    labels = data.labels
    if fisher != "expected" or labels is None or labels.dim() != 1:
        return 1
    classes = max(data.n_classes, int(labels.max()) + 1 if len(labels) else 1)
    roots = classes - 1 if cross_entropy_loss else classes
    rows = max(roots, 1) if classes <= EXPECTED_MAX_CLASSES else 1
    return rows if most is None else min(rows, most)


class FisherRows:
    """The rows ``R`` of a sample's un-factored Fisher in the Kronecker eigenbases (``F = RᵀR``, rows side by side over
    the layers as in ``rotated_gradients``), kept layer by layer: where a layer's per-row gradient is one outer product
    (one position: an nn.Linear on vectors) as its two projected factors, ``S`` ``[r, r_s]`` and ``A`` ``[r, r_a]``
    (the row is vec(s ⊗ a)), which is far smaller than the rows; elsewhere as the dense rows. Products with ``R`` and
    its Gram matrix work on either form."""

    def __init__(self, widths: list[int]):
        self.widths = widths
        self.parts: list[tuple[torch.Tensor, ...]] = [() for _ in widths]  # per layer: (S, A) or (dense,)

    def add(self, layer: int, *part: torch.Tensor) -> None:
        """Append a batch's rows of ``layer``: ``(S, A)`` factors or ``(dense,)`` rows."""
        held = self.parts[layer]
        if not held:
            self.parts[layer] = part
            return
        if len(held) != len(part):  # a layer seen with one position, then several: hold it densely
            held, part = (self._dense(held),), (self._dense(part),)
        self.parts[layer] = tuple(torch.cat([h, q]) for h, q in zip(held, part))

    @staticmethod
    def _dense(part: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return part[0] if len(part) == 1 else (part[0][:, :, None] * part[1][:, None, :]).flatten(1)

    def __len__(self) -> int:
        return len(self.parts[0][0])

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def device(self) -> torch.device:
        return self.parts[0][0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][0].dtype

    def release(self) -> None:
        """Drop the rows, freeing their memory while the caller still holds this object (it is empty after)."""
        self.parts, self.widths = [], []

    def scale_(self, factor: float) -> FisherRows:
        """Multiply the rows by ``factor`` in place."""
        for part in self.parts:
            part[0].mul_(factor)
        return self

    def _slices(self):
        start = 0
        for width, part in zip(self.widths, self.parts):
            yield slice(start, start + width), part
            start += width

    def dense(self, rows: slice = slice(None)) -> torch.Tensor:
        """``R`` itself ``[r, width]``, or its rows ``rows``."""
        return torch.cat([self.layer_dense(layer, rows) for layer in range(len(self.parts))], dim=1)

    def layer_dense(self, layer: int, rows: slice = slice(None)) -> torch.Tensor:
        """Layer ``layer``'s columns of ``R`` (rows ``rows``): a view of rows held densely, formed from factors."""
        return self._dense(tuple(t[rows] for t in self.parts[layer]))

    def gram(self, block: int = 256, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``R Rᵀ`` ``[r, r]`` in ``dtype`` (default the rows'): per factored layer (S Sᵀ) ∘ (A Aᵀ), per dense layer
        D Dᵀ, ``block`` rows at a time in the rows' precision (no ``r × r`` temporary beside the result)."""
        r = len(self)
        gram = torch.empty(r, r, dtype=dtype or self.dtype, device=self.device)
        for i in range(0, r, block):
            rows = slice(i, min(i + block, r))
            strip = 0
            for part in self.parts:
                if len(part) == 2:
                    strip = strip + (part[0][rows] @ part[0].T) * (part[1][rows] @ part[1].T)
                else:
                    strip = strip + part[0][rows] @ part[0].T
            gram[rows] = strip
        return gram

    def times(self, vectors: torch.Tensor) -> torch.Tensor:
        """``R vᵀ`` ``[r, k]`` for ``vectors`` ``[k, width]``."""
        out = 0
        for cols, part in self._slices():
            v = vectors[:, cols].to(part[0])
            if len(part) == 2:
                s, a = part
                v = v.reshape(len(v), s.shape[1], a.shape[1])
                out = out + torch.stack([((s @ vi) * a).sum(1) for vi in v], dim=1)
            else:
                out = out + part[0] @ v.T
        return out

    def transpose_times(self, weights: torch.Tensor) -> torch.Tensor:
        """``wᵀ R`` ``[k, width]`` for ``weights`` ``[r, k]``."""
        pieces = []
        for _, part in self._slices():
            w = weights.to(part[0])
            if len(part) == 2:
                s, a = part
                pieces.append(torch.stack([(s * wi[:, None]).T @ a for wi in w.T]).flatten(1))
            else:
                pieces.append(w.T @ part[0])
        return torch.cat(pieces, dim=1)


def fisher_and_gradient_rows(task: AttributionTask, factors: list[LayerFactors], data: AttributionDataset,
                             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fisher: str = "expected",
                             batch_size: int = 256, seed: int = 0, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32, most_rows: int | None = None,
                             gradients: int | None = None) -> tuple[FisherRows, FisherRows]:
    """In the Kronecker eigenbases, from one forward pass over ``data``: the rows of its Fisher of kind ``fisher``,
    un-factored (the expected Fisher's C − 1 rows per example, at most ``most_rows`` with the rest sketched:
    ``output_curvature_roots``; else one), so that ``F = RᵀR / len(data)`` (in expectation where sketched), and the
    gradient of ``loss`` of each of the first ``gradients`` examples (default all; one row each), both as
    ``FisherRows`` (a one-position layer's rows as their two projected factors)."""
    layers = tracked_layers(task)
    sampled, generator = _sampler(task, fisher, seed)
    if most_rows is not None and getattr(sampled, "expected_fisher", False):
        sampled.most_rows, sampled.generator = most_rows, generator
    wanted = len(data) if gradients is None else min(gradients, len(data))
    seen = 0
    widths = [f.q_s.shape[1] * f.q_a.shape[1] for f in factors]
    rows, held_gradients = FisherRows(widths), FisherRows(widths)
    model = task.model
    restore = eval_mode(model)
    model.to(device)
    try:
        for patches, (fisher_grads, loss_grads) in layer_activity(
                model, layers, data, [sampled, _on_batch(task, loss)], batch_size, device, argument="train",
                ids=data.ids, output=task.output):
            batch = len(next(iter(patches.values())))
            keep = max(0, min(batch, wanted - seen))  # this batch's examples among the first ``wanted``
            seen += batch
            for index, f in enumerate(factors):
                a = patches[f.name]
                # one position: each row is the outer product of its projected factors (the patches' shared by both)
                projected = _projected_patches(a, f.q_a)[:, 0] if a.shape[2] == 1 else None
                pairs = [(rows, fisher_grads[f.name], a, projected)]
                if keep:
                    pairs.append((held_gradients, loss_grads[f.name][:keep], a[:keep],
                                  None if projected is None else projected[:keep]))
                for held, g, a_held, p_held in pairs:
                    if p_held is not None:
                        held.add(index, (g[:, :, 0] @ f.q_s.to(g)).to(dtype),
                                 p_held.repeat(len(g) // len(a_held), 1).to(dtype))
                    else:
                        held.add(index, _rotated_layer_gradients(f, a_held, g).flatten(1).to(dtype))
    finally:
        restore()
    return rows, held_gradients


def row_numbers(task: AttributionTask, factors: list[LayerFactors], data: AttributionDataset,
                device: torch.device | str = "cpu") -> int:
    """How many numbers one row of ``fisher_and_gradient_rows`` takes as held: per layer, r_s + r_a where the layer
    sees one position (its two projected factors), else r_s · r_a; read from one forward pass over ``data``'s first
    example."""
    model = task.model
    restore = eval_mode(model)
    model.to(device)
    try:
        patches, _ = next(layer_activity(model, tracked_layers(task), data.subset([0]), [], 1, device))
    finally:
        restore()
    return sum(f.q_s.shape[1] + f.q_a.shape[1] if patches[f.name].shape[2] == 1 else f.q_s.shape[1] * f.q_a.shape[1]
               for f in factors)


class _RotatedRows:
    """Each example's gradient in the Kronecker eigenbases (``Q_Sᵀ G Q_A``, layers side by side) written batch by batch
    and layer by layer into one ``[n, Σ widths]`` tensor: no batch of concatenated layers and no concatenation of the
    batches, either of which would hold a second copy of the rows."""

    def __init__(self, factors: list[LayerFactors], n: int, dtype: torch.dtype):
        self.factors, self.filled = factors, 0
        self.rows = torch.empty(n, sum(f.q_s.shape[1] * f.q_a.shape[1] for f in factors), dtype=dtype,
                                device=factors[0].q_s.device)

    def add(self, patches: dict, grads: dict, argument: str, ids: Sequence) -> None:
        block, offset = None, 0
        for f in self.factors:
            part = _rotated_layer_gradients(f, patches[f.name], grads[f.name]).flatten(1)
            if block is None:
                block = self.rows[self.filled : self.filled + len(part)]
            block[:, offset : offset + part.shape[1]] = part
            offset += part.shape[1]
        check_finite_rows(block, argument, ids, "per-sample gradients")
        self.filled += len(block)


def _loss_activity(task: AttributionTask, data: AttributionDataset,
                   loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int,
                   device: torch.device | str, params: dict | None, argument: str,
                   ) -> Iterator[tuple[dict, dict, Sequence]]:
    """Each batch's layer inputs (patches), output gradients of ``loss`` and ids, the model in eval mode (and moved to
    ``device`` when ``params`` is None) until the last batch."""
    layers = dict(tracked_layers(task))
    model = task.model
    restore = eval_mode(model)
    if params is None:
        model.to(device)
    start = 0
    try:
        for patches, (grads,) in layer_activity(model, list(layers.items()), data, [_on_batch(task, loss)],
                                                batch_size, device, params, argument=argument, ids=data.ids,
                                                output=task.output):
            batch_ids, start = _batch_ids(data.ids, start, patches)
            yield patches, grads, batch_ids
    finally:
        restore()


def rotated_gradients(task: AttributionTask, factors: list[LayerFactors], data: AttributionDataset,
                      loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 256,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      params: dict | None = None, argument: str = "data") -> torch.Tensor:
    """Each example's gradient of ``loss`` in the Kronecker eigenbasis, ``[n, Σ out·in]`` (layers concatenated),
    computed from hooks without materialising flat per-sample gradients (at ``params``: the model is not moved);
    bad input is a ``TDAError`` naming ``argument`` (the caller's name for ``data``, e.g. ``"test"``)."""
    rotated = _RotatedRows(factors, len(data), dtype)
    for patches, grads, batch_ids in _loss_activity(task, data, loss, batch_size, device, params, argument):
        rotated.add(patches, grads, argument, batch_ids)
    return rotated.rows


def rotated_gradient_batches(task: AttributionTask, factors: list[LayerFactors], data: AttributionDataset,
                             loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int = 256,
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                             argument: str = "data") -> Iterator[torch.Tensor]:
    """``rotated_gradients`` one batch of rows at a time, in order: the memory of one batch, not of ``data``."""
    for patches, grads, batch_ids in _loss_activity(task, data, loss, batch_size, device, None, argument):
        rows = _RotatedRows(factors, len(batch_ids), dtype)
        rows.add(patches, grads, argument, batch_ids)
        yield rows.rows
