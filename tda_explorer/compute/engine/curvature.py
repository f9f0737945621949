"""Curvature of the mean training objective: Hessian- and GGN-vector products, and dense matrices.

Objective: J(θ) = mean_i ℓ(z_i; θ) + wd/2 ‖θ‖² over the task's tracked parameters (others frozen).
The GGN replaces the Hessian of the network by Jᵀ H_out J (H_out = ∂²ℓ/∂logits², positive semi-definite for
cross-entropy), so G + wd·I is positive definite — the default for influence functions on non-convex models.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch.func import grad, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from tda_explorer._validation import check_choice
from tda_explorer.compute.engine.gradients import vmap_refused
from tda_explorer.compute.engine.losses import (
    Batch,
    closed_form,
    curvature_roots,
    gauss_newton_times,
    loss_curvature,
)
from tda_explorer.compute.engine.task import AttributionTask, call_model
from tda_explorer.data.batching import n_rows, take_rows, to_device
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3 (forward_mode_attention takes the older switch)
    SDPBackend = sdpa_kernel = None

CURVATURES = ("ggn", "hessian")
#: Bytes one vectorised curvature product may keep alive by default.
PRODUCT_MEMORY = 1 << 30
#: What one (direction, row) pair of a product keeps alive, in multiples of the model's activations for one example:
#: measured on the zoo's transformer at ~1.3× (GGN: a forward tangent and the pullback) and ~7× (Hessian: double
#: backward), rounded up.
MEMORY_PER_ACTIVATION = {"ggn": 2, "hessian": 8}
#: The GGN's factor A (n·C × p) is kept for products when it takes at most this many bytes ...
FACTOR_MEMORY = 1 << 30
#: ... and multiplies this many directions at a time.
FACTOR_DIRECTIONS = 256
#: Products go through A where its multiply-adds per example and direction are below this many times the model's
#: forward flops: a vectorised product costs about 3 forward passes per (direction, row) pair, and dense matrix
#: products run closer to the hardware's peak (the break-even measured on the zoo's MLPs, float32 and float64:
#: benchmarks/README.md, "Curvature forms")
FACTOR_EFFICIENCY = 9.0


def forward_mode_attention() -> contextlib.AbstractContextManager:
    """Scaled dot-product attention in its composite ("math") form: the fused kernels (flash, memory-efficient; a
    Hugging Face model's default "sdpa" attention) have no forward-mode derivative, which every curvature product
    takes (J v, and the Hessian's forward-over-reverse); the composite form has, and gives the same values."""
    if sdpa_kernel is None:  # torch < 2.3: the same switch under its older name
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel([SDPBackend.MATH])


class Curvature:
    """Products with the curvature of the mean training objective at the model's parameters.

    Training data held in memory (tensors or dicts of tensors) enter every product at once; data read lazily
    (``AttributionDataset.from_torch``) is streamed in batches of ``batch_size`` and the products summed, so nothing
    needs the whole input tensor. Each vectorised call multiplies some directions over some rows: as many (direction,
    row) pairs as ``max_memory`` holds at an estimate of what one pair keeps alive (the model's activations of one
    example, ``MEMORY_PER_ACTIVATION`` times over: ``pairs_per_call``), so a large model over many right-hand sides
    runs in more calls instead of running out of memory.

    Parameters
    ----------
    task : AttributionTask
    train : AttributionDataset
    kind : {"ggn", "hessian"}
    device : torch.device
    dtype : torch.dtype
        Float64 by default: these products feed solvers that need the precision.
    batch_size : int, optional
        Rows per streamed batch of lazy data (default: the dataset's own).
    max_memory : int, optional
        Bytes one vectorised product may keep alive (default ``PRODUCT_MEMORY``).
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, kind: str = "ggn",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                 batch_size: int | None = None, max_memory: int | None = None):
        self.kind = check_choice(kind, "curvature", CURVATURES)
        self.task, self.device, self.dtype = task, torch.device(device), dtype
        self.names = task.tracked_names()
        model = task.model
        state = {k: v.detach().to(device, dtype) for k, v in model.named_parameters()}
        # floating buffers (BatchNorm's running statistics) in the products' precision too; counters stay integers
        self.buffers = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                        for k, v in model.named_buffers()}
        self.shapes = [(k, state[k].shape) for k in self.names]
        self.theta = torch.cat([state[k].flatten() for k in self.names])
        self.frozen = {k: v for k, v in state.items() if k not in self.names}
        self.train, self.batch_size, self.rows = train, batch_size, None
        self.held = [(self._cast(to_device(train.inputs, device)), train.labels.to(device))] if train.in_memory \
            else None
        self.n = len(train)
        self.wd = float(task.weight_decay)
        self.model = model
        self.max_memory = PRODUCT_MEMORY if max_memory is None else int(max_memory)
        self._shared: dict = {}  # the GGN's factor over the whole training set and the pairs per call, once decided
        # (shared with minibatch views, which are shallow copies)
        self._factor_rows: torch.Tensor | None = None  # a view's rows of it
        self._view_factor: torch.Tensor | None = None  # those rows, gathered and scaled once per view
        self._root = self  # the curvature over the whole training set, which views derive from

    def _cast(self, inputs: Any) -> Any:
        """Floating inputs in the products' precision (token ids and masks stay integers)."""
        if isinstance(inputs, Mapping):
            return {k: self._cast(v) for k, v in inputs.items()}
        return inputs.to(self.dtype) if inputs.is_floating_point() else inputs

    def _batches(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """``(inputs, labels)`` of the rows the products run over: held in memory, or read batch by batch."""
        if self.held is not None:
            yield from self.held
            return
        for _, x, y in self.train.batches(self.batch_size, rows=self.rows, device=self.device):
            yield self._cast(x), y

    def on_rows(self, rows: torch.Tensor) -> Curvature:
        """The same curvature over a subset of the training rows (a minibatch), sharing everything else."""
        view = copy.copy(self)
        rows = rows.cpu()
        if self.held is not None:
            x, y = self.held[0]
            on = rows.to(y.device)
            view.held = [(take_rows(x, on), y[on])]
        else:
            view.rows = rows if self.rows is None else self.rows[rows]
        view._factor_rows = rows if self._factor_rows is None else self._factor_rows[rows]
        view._view_factor = None
        view.n = len(rows)
        return view

    def in_precision(self, dtype: torch.dtype) -> Curvature:
        """The same curvature over the whole training set with products in ``dtype``; a GGN factor this one has
        already built is shared, cast, instead of built again."""
        other = Curvature(self.task, self._root.train, self.kind, self.device, dtype=dtype,
                          batch_size=self.batch_size, max_memory=self.max_memory)
        factor = self._root._shared.get("a")
        if factor is not None:
            other._shared.update(a=factor.to(dtype), n=self._root._shared["n"])
        return other

    @property
    def dim(self) -> int:
        return self.theta.numel()

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, shape in self.shapes:
            size = shape.numel()
            out[name] = flat[start : start + size].view(shape)
            start += size
        return out

    def _logits(self, flat: torch.Tensor, x: Any) -> torch.Tensor:
        params = {**self.frozen, **self._unflatten(flat), **self.buffers}
        return self.task.logits(call_model(self.model, x, params))

    def _loss_sum(self, flat: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        """Σ ℓ over one batch, divided by the n rows of the objective (the batches' terms add up to its mean)."""
        return self.task.train_loss(self._logits(flat, x), Batch(x, y)).sum() / self.n

    def _term(self, v: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        """One batch's term of ``(curvature) @ v`` (the weight decay's is added once, in ``matvec``); forward-mode
        products, so attention runs in its composite form (``forward_mode_attention``)."""
        with forward_mode_attention():
            if self.kind == "hessian":
                return jvp(grad(partial(self._loss_sum, x=x, y=y)), (self.theta,), (v,))[1]
            logits_of = partial(self._logits, x=x)
            logits, jv = jvp(logits_of, (self.theta,), (v,))
            if closed_form(self.task, logits):  # the cross-entropy's Hessian in the logits, diag(p) − ppᵀ, times Jv
                p = logits.softmax(-1)
                h_jv = p * jv - p * (p * jv).sum(-1, keepdim=True)
            else:  # the task's own loss: its curvature in the outputs, times Jv
                h_jv = gauss_newton_times(self.task, logits, Batch(x, y), jv)
            _, pullback = vjp(logits_of, self.theta)
            return pullback(h_jv / self.n)[0]

    def pairs_per_call(self) -> int:
        """(direction, row) pairs one vectorised product may hold: ``max_memory`` over the estimated bytes of one pair,
        ``MEMORY_PER_ACTIVATION[kind]`` × the activations the model keeps for one example (counted once, on the first
        training row, by forward hooks) in the products' precision; at least 1."""
        if "pairs" not in self._shared:
            x, _ = next(self._root._batches())
            count = [0]

            def hook(module, inputs, output):
                count[0] += sum(t.numel() for t in tree_leaves(output) if torch.is_tensor(t))

            handles = [m.register_forward_hook(hook) for m in self.model.modules()]
            try:
                with torch.no_grad():
                    self._logits(self.theta, take_rows(x, slice(0, 1)))
            finally:
                for handle in handles:
                    handle.remove()
            per_pair = MEMORY_PER_ACTIVATION[self.kind] * max(count[0], 1) * self.theta.element_size()
            self._shared["pairs"] = max(1, self.max_memory // per_pair)
        return self._shared["pairs"]

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(curvature) @ v`` for each row of ``vectors`` ``[r, p]``: through the GGN's factor where that was found
        cheaper (``factor``), else the batches' vectorised terms summed."""
        vectors = vectors.to(self.device, self.dtype)
        factor = self.factor()
        products = self._vectorised(vectors) if factor is None else _through_factor(vectors, factor)
        return products.add_(vectors, alpha=self.wd) if self.wd else products

    def _vectorised(self, vectors: torch.Tensor) -> torch.Tensor:
        """The batches' terms summed (each batch read once per product, outside ``vmap``), in calls of at most
        ``pairs_per_call`` (direction, row) pairs; the weight decay's term left out."""
        out = torch.zeros_like(vectors)
        pairs = self.pairs_per_call()
        for x, y in self._batches():
            rows = n_rows(x)
            step = max(1, min(rows, pairs))  # rows per call, and then directions per call
            directions = max(1, pairs // step)
            for start in range(0, rows, step):
                part = (x, y) if step >= rows else (take_rows(x, slice(start, start + step)), y[start : start + step])
                term = partial(self._term, x=part[0], y=part[1])
                chunks = []
                for d in range(0, len(vectors), directions):
                    check_cancelled()
                    chunks.append(self._over_directions(term, vectors[d : d + directions]))
                out.add_(torch.cat(chunks))
        return out

    def _over_directions(self, term, vectors: torch.Tensor) -> torch.Tensor:
        """``term`` of each row of ``vectors``: vectorised, or a direction at a time once ``vmap`` has refused the
        model (an in-place op in a recurrent layer, ...), which raises the model's own errors."""
        if not self._shared.get("unvectorised"):
            try:
                return vmap(term)(vectors)
            except RuntimeError as err:
                if not vmap_refused(err, "curvature products"):
                    raise
                self._shared["unvectorised"] = True
        return torch.stack([term(v) for v in vectors])

    def factor(self) -> torch.Tensor | None:
        """The GGN's factor A over this curvature's rows, AᵀA its curvature less the weight decay (``ggn_factor``: built
        once over the whole training set and shared with minibatch views, whose rows are gathered once per view), when
        products through it, (VAᵀ)A, are cheaper than the vectorised ones (``_decide_factor``). None: use the
        vectorised terms. Example i's rows are i·C … i·C + C − 1 (C classes)."""
        if self.kind != "ggn":
            return None
        if "a" not in self._shared:
            self._shared["a"] = self._root._decide_factor()
        full = self._shared["a"]
        if full is None or self._factor_rows is None:
            return full
        if self._view_factor is None:
            total = self._shared["n"]
            c = full.shape[0] // total
            rows = full.view(total, c, -1)[self._factor_rows.to(full.device)].reshape(-1, full.shape[1])
            self._view_factor = rows.mul_((total / len(self._factor_rows)) ** 0.5)  # the minibatch's mean
        return self._view_factor

    def _decide_factor(self) -> torch.Tensor | None:
        """A, when products through it are the cheaper: for the GGN of data with one prediction per example (held in
        memory, or streamed once from a torch Dataset), A within ``FACTOR_MEMORY``, and its 4·C·p multiply-adds per
        example and direction below ``FACTOR_EFFICIENCY`` × the model's forward flops for one example
        (``FlopCounterMode``)."""
        outputs = self.outputs()
        if outputs is None or self.n * outputs * self.dim * self.theta.element_size() > FACTOR_MEMORY:
            return None
        x, _ = next(self._batches())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self._logits(self.theta, take_rows(x, slice(0, 1)))
        if not 4 * outputs * self.dim < FACTOR_EFFICIENCY * counter.get_total_flops():
            return None
        self._shared["n"] = self.n
        return self.ggn_factor()

    def outputs(self) -> int | None:
        """Outputs per example of the model's logits (classes), or None when an example has more than one prediction
        (a sequence): what the GGN's factor has per example (``ggn_factor``)."""
        x, _ = next(self._batches())
        logits = self._logits(self.theta, take_rows(x, slice(0, 1)))
        return int(logits.shape[-1]) if logits.dim() == 2 else None

    def ggn_factor(self, chunk: int = 32, form: str | None = None) -> torch.Tensor:
        """``A`` ``[n·C, p]`` with ``AᵀA`` the GGN of the mean objective (the weight decay left out): the rows of
        example i are (1/√n) F_i J_i, with J_i ``[C, p]`` its logits' Jacobian and F_i = diag(√p_i)(I − 1p_iᵀ), so that
        F_iᵀF_i = diag(p_i) − p_i p_iᵀ, the cross-entropy's Hessian in the logits. For a model whose n·C is below p,
        (AᵀA + μI)⁻¹ comes from the n·C × n·C matrix AAᵀ (Woodbury) instead of the p × p one. The Jacobians come from
        a vectorised ``jacrev`` or from one vectorised gradient per class, whichever built the first chunk faster (the
        same numbers; which is faster depends on the model: benchmarks/README.md, "LiSSA in the factor's row space"), or
        from ``form`` ("jacobian" or "per class") when given."""
        if self.kind != "ggn":
            raise ValueError("the factor exists for the GGN only")

        def logits_one(flat: torch.Tensor, x: Any) -> torch.Tensor:
            return self._logits(flat, tree_map(lambda t: t.unsqueeze(0), x))[0]

        def logit_one(flat: torch.Tensor, x: Any, c: int) -> torch.Tensor:
            return logits_one(flat, x)[c]

        per_class = vmap(grad(logit_one), in_dims=(None, 0, None))  # one logit's gradient per example
        whole = vmap(jacrev(logits_one), in_dims=(None, 0))
        forms = {"jacobian": lambda rows, classes: whole(self.theta, rows),
                 "per class": lambda rows, classes: torch.stack([per_class(self.theta, rows, c)
                                                                 for c in range(classes)], dim=1)}
        one = jacrev(logits_one)
        if form is not None and form not in forms:
            raise ValueError(f"form must be one of {sorted(forms)} or None, got {form!r}")
        out, filled, use_vmap = None, 0, True  # A is written into place: no list of blocks beside it
        for x, labels in self._batches():
            for start in range(0, n_rows(x), chunk):
                check_cancelled()
                rows = take_rows(x, slice(start, start + chunk))
                logits = self._logits(self.theta, rows)
                probs = logits.softmax(-1)  # [b, C]
                jac = None
                if use_vmap:
                    try:
                        if form is None:  # the first chunk by both vectorised forms: the faster builds the rest
                            seconds = {}
                            for name, build in forms.items():
                                t0 = time.perf_counter()
                                jac = build(rows, probs.shape[1])  # [b, C, p]
                                if jac.is_cuda:
                                    torch.cuda.synchronize(jac.device)  # its kernels run asynchronously
                                seconds[name] = time.perf_counter() - t0
                            form = min(seconds, key=seconds.get)
                        else:
                            jac = forms[form](rows, probs.shape[1])
                    except RuntimeError as err:  # vmap refused the model: one example at a time, which raises
                        # the model's own errors
                        if not vmap_refused(err, "the GGN's factor"):
                            raise
                        use_vmap = False
                if jac is None:
                    jac = torch.stack([one(self.theta, take_rows(rows, i)) for i in range(len(probs))])
                c = probs.shape[1]
                if closed_form(self.task, logits):
                    factor = probs.sqrt().unsqueeze(2) * (torch.eye(c, dtype=probs.dtype, device=probs.device)
                                                          - probs.unsqueeze(1))  # diag(√p)(I − 1pᵀ)
                else:  # a root of the task's own loss's Hessian in the outputs
                    batch = Batch(rows, labels[start : start + chunk])
                    factor = curvature_roots(loss_curvature(self.task, logits, batch)).to(probs)
                block = (factor @ jac).reshape(-1, jac.shape[-1]) / self.n ** 0.5
                if out is None:
                    out = torch.empty(self.n * c, block.shape[1], dtype=block.dtype, device=block.device)
                out[filled : filled + len(block)] = block
                filled += len(block)
        return out[:filled]

    def dense(self, chunk: int = 256) -> torch.Tensor:
        """The ``[p, p]`` matrix (symmetrised), built from products with the identity's rows ``chunk`` at a time and
        symmetrised a block pair at a time: one ``p × p`` matrix and a chunk's rows beside it."""
        p = self.dim
        out = torch.empty(p, p, device=self.device, dtype=self.dtype)
        for i in range(0, p, chunk):
            eye = torch.zeros(min(chunk, p - i), p, device=self.device, dtype=self.dtype)
            eye[:, i : i + len(eye)].fill_diagonal_(1.0)
            out[i : i + len(eye)] = self.matvec(eye)
        for i in range(0, p, chunk):
            for j in range(i, p, chunk):
                upper, lower = out[i : i + chunk, j : j + chunk], out[j : j + chunk, i : i + chunk]
                mean = 0.5 * (upper + lower.T)
                upper.copy_(mean)
                lower.copy_(mean.T)
        return out


def largest_eigenvalue(matvec, dim: int, iterations: int = 30, seed: int = 1,
                       device: torch.device | str = "cpu") -> float:
    """λ_max of a positive semi-definite operator (or one similar to it) by power iteration, from below."""
    z = torch.randn(1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    estimate = 0.0
    for _ in range(iterations):
        y = matvec(z)
        estimate = float(y.norm() / z.norm())
        z = y / y.norm().clamp_min(1e-300)
    return estimate


def _through_factor(vectors: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(V Aᵀ) A`` for the rows V of ``vectors``, ``FACTOR_DIRECTIONS`` at a time."""
    out = torch.empty_like(vectors)
    for d in range(0, len(vectors), FACTOR_DIRECTIONS):
        check_cancelled()
        torch.mm(vectors[d : d + FACTOR_DIRECTIONS] @ factor.T, factor, out=out[d : d + FACTOR_DIRECTIONS])
    return out

