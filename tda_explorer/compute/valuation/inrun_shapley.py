"""In-Run Data Shapley (Wang, Mittal, Song, Jia, 2025), first and second order, accumulated during one training run.

At step t (batch B_t, step size η, mean loss over a batch divisor B) the local game is the validation-loss
*reduction* of taking the step with a subset S of the batch, so positive values are helpful. Its Taylor expansion
gives each example in the batch
    first order   φ_t(z) = (η/B) ⟨g_val, g_z⟩
    second order  φ_t(z) = (η/B) ⟨g_val, g_z⟩ − (η²/2B²) g_zᵀ H_val Σ_{j∈B_t} g_j
with g_val = Σ_v ∇ℓ(v; θ_t) over a validation set fixed before training, and the value of z is Σ_t φ_t(z) over the
steps it was in (the values add up to the run's Taylor-model validation-loss reduction: efficiency).

Ghost dot-products: a Linear/Conv2d layer's per-example gradient is G_z = Σ_p s_zp [a_zp; 1]ᵀ (output gradients and
input patches from hooks), so ⟨G_z, M⟩ = Σ_p s_zpᵀ M [a_zp; 1] for any layer matrix M — the validation gradient, or
the layer's block of H_val Σ_j g_j — and no per-example gradient is formed. The Hessian-vector product takes one
double backward of the validation loss per step. Weight decay's own term (−ηλθ) belongs to no example and is left
out. Two ways to run it:
- as the step callback of ``train_weighted`` (or of any loop, before each optimizer step, with the batch's positions,
  the current parameters and the step size): separate validation and batch passes, first or second order;
- single pass, in your own SGD loop: ``shapley.backward(positions, lr)`` replaces ``loss.backward()``. One forward
  and one backward run on the batch and the validation rows together (the recipe's concatenation). The validation
  rows' loss is scaled by c = 2^-17 × the loss dtype's epsilon (2^-40 in float32): their share of ``.grad`` is
  then 2^-40 of their gradient, below float32 rounding wherever the batch's own gradient is not nearly zero, and
  their output gradients are read back divided by c (exact: a power of two). So ``.grad`` is the batch loss's
  gradient — untracked trainable layers (LayerNorm, embeddings) included — and vector-Linear layers' weight
  gradients come from autograd as in a plain step. Convolutional and sequence layers stop autograd at their
  outputs and form their weight gradients from the batch rows by the same products that give the ghost terms (for
  small layers the per-example gradients themselves, whose sum is the weight gradient). A Linear layer on vectors
  copies its inputs and output gradients into buffers for a few steps and forms their ghost products for all of
  them at once (a batched product per layer instead of several small ones per step: on a small model the cost is
  per operation, not arithmetic); reading ``values`` forms what is held. The step's input rows are gathered into
  buffers made once per batch size and validation slice (one ``index_select`` for the inputs, one for the
  labels). The tracked layers' inputs and outputs are captured by wrapping their ``forward`` for the duration of
  the step only (a forward hook costs ~20 µs a call on CPU). First order only; refused: BatchNorm in training
  mode (its batch statistics would mix the validation rows into the batch's forward) and float16 activations (too
  little range for the scaled gradients).
- from a recording of your own SGD loop (``InRunShapley.from_recording(task, recorder, validation)``): the run
  recorded with ``RunRecorder`` is replayed once and every step is valued as the step callback would have; with
  heavy-ball momentum a step's value is its own gradient's first-order effect (momentum carries it into later steps,
  which the per-step game leaves out). Adam's preconditioned step, Nesterov, dampening and per-group learning rates
  are not the game's step and are refused by name.
Both forms take ``validation_batch``: a cycling, seeded slice of the fixed validation set per step, scaled to
estimate the whole set's gradient without bias — the knob that trades the values' noise for throughput (the
validation rows' forward and backward are most of the cost on a convolutional model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, jvp

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, Options, build_arguments, option, register
from tda_explorer.compute.engine.curvature import forward_mode_attention
from tda_explorer.compute.engine.kfac import (
    CONVOLUTIONS,
    _output_grads,
    _patches,
    conv_padding,
    layer_activity,
    tracked_layers,
)
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.training.run_recorder import finished_recording
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory

PER_EXAMPLE_LIMIT = 2**22  # per-example gradients materialised by the single pass up to this many numbers
HELD_LIMIT = 2**21  # Linear inputs and output gradients the single pass holds before forming their products
INPUT_BUFFER_LIMIT = 2**24  # numbers the single pass keeps in buffers for its steps' inputs
VALIDATION_SCALE_BITS = 17  # the single pass scales the validation rows' loss by 2^-17 × the loss dtype's epsilon
ALTERNATIVES = "tracin over the run's checkpoints, which takes any module"


def ghost_products(patches: torch.Tensor, grads: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """⟨G_z, M⟩ per example for patches ``[B, in, T]``, output gradients ``[B, out, T]`` and ``M`` ``[out, in(+1)]``
    (a last column for the bias), without forming G_z."""
    width = patches.shape[1]
    matrix = matrix.to(patches)
    mapped = matrix[:, :width] @ patches  # [B, out, T]
    if matrix.shape[1] == width + 1:
        mapped = mapped + matrix[:, width, None]
    return (mapped * grads).sum((1, 2))


def _layer_gradient(patches: torch.Tensor, grads: torch.Tensor, bias: bool) -> torch.Tensor:
    """Σ over examples and positions of s_t [a_t; 1]ᵀ, ``[out, in(+1)]``."""
    out, width = grads.shape[1], patches.shape[1]
    g = grads.transpose(1, 2).reshape(-1, out).T @ patches.transpose(1, 2).reshape(-1, width)
    return torch.cat([g, grads.sum((0, 2))[:, None]], 1) if bias else g


def linear_ghost_products(x: torch.Tensor, g: torch.Tensor, n_batch: int, bias: bool) -> torch.Tensor:
    """⟨G_z, G_val⟩ of a Linear layer on vectors for K steps at once: inputs ``x`` ``[K, N, in]`` and output
    gradients ``g`` ``[K, N, out]`` whose first ``n_batch`` rows are the batch and the rest validation rows;
    ``[K, n_batch]``. The pairwise ghost form Σ_v (a_z·a_v + 1)(s_z·s_v) when it takes fewer multiply-adds (few
    validation rows), else G_val = Σ_v s_v a_vᵀ applied to each a_z."""
    a_b, a_v, s_b, s_v = x[:, :n_batch], x[:, n_batch:], g[:, :n_batch], g[:, n_batch:]
    n_val, n_in, n_out = a_v.shape[1], x.shape[2], g.shape[2]
    if n_val * (n_in + n_out) <= n_in * n_out:  # [K, V, B] products: twice as fast on CPU as [K, B, V]
        inputs = torch.baddbmm(a_b.new_ones(()), a_v, a_b.mT) if bias else a_v @ a_b.mT
        return inputs.mul_(s_v @ s_b.mT).sum(1)
    contribution = torch.linalg.vecdot(s_b @ (s_v.mT @ a_v), a_b)
    if bias:
        contribution = contribution + (s_b @ s_v.sum(1, keepdim=True).mT).squeeze(2)
    return contribution


def _single_pass_layer(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, n_batch: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One convolutional or sequence layer of the single pass, from its input ``x`` and output gradient ``g`` over
    the batch rows (first ``n_batch``) and the validation rows: the batch rows' weight and bias gradients and each
    batch row's ⟨G_z, G_val⟩, by one of two exact forms:
    - per-example gradients materialised (one batched product, whose sum is the weight gradient) when they fit
      in ``PER_EXAMPLE_LIMIT`` numbers;
    - otherwise G_val applied to the batch: one convolution by G_val for a convolution, ghost products for Linear."""
    bias = module.bias is not None
    patches, out_grads = _patches(module, x), _output_grads(module, g)
    small = len(x) * out_grads.shape[1] * patches.shape[1] <= PER_EXAMPLE_LIMIT
    if not small and isinstance(module, CONVOLUTIONS):
        padding = conv_padding(module)
        x_b, s_b, s_v = x[:n_batch], g[:n_batch], g[n_batch:]
        planar = isinstance(module, torch.nn.Conv2d)
        weight_of = torch.nn.grad.conv2d_weight if planar else torch.nn.grad.conv1d_weight
        convolve = torch.nn.functional.conv2d if planar else torch.nn.functional.conv1d
        spatial = tuple(range(2, g.dim()))
        conv_weight = lambda inputs, grads: weight_of(
            inputs, module.weight.shape, grads, module.stride, padding, module.dilation, module.groups)
        w_grad, val_weight = conv_weight(x_b, s_b), conv_weight(x[n_batch:], s_v)
        b_grad, val_bias = (s_b.sum((0, *spatial)), s_v.sum((0, *spatial))) if bias else (None, None)
        mapped = convolve(x_b, val_weight, val_bias, module.stride, padding, module.dilation, module.groups)
        return w_grad, b_grad, (mapped * s_b).sum((1, *spatial))
    if not small:  # Linear over sequences
        batch = (patches[:n_batch], out_grads[:n_batch])
        w_grad = _layer_gradient(*batch, bias)
        width = module.weight[0].numel()
        return (w_grad[:, :width].reshape(module.weight.shape), w_grad[:, width] if bias else None,
                ghost_products(*batch, _layer_gradient(patches[n_batch:], out_grads[n_batch:], bias)))
    per_example = torch.einsum("nop,nip->noi", out_grads, patches)  # [N, out, in·k]; faster than bmm here
    per_bias = out_grads.sum(2) if bias else None
    val_weight = per_example[n_batch:].sum(0)
    contribution = per_example[:n_batch].flatten(1) @ val_weight.flatten()
    if bias:
        contribution = contribution + per_bias[:n_batch] @ per_bias[n_batch:].sum(0)
    w_grad = per_example[:n_batch].sum(0).reshape(module.weight.shape)
    return w_grad, per_bias[:n_batch].sum(0) if bias else None, contribution


class _HeldLinearSteps:
    """Vector-Linear layers' inputs and output gradients from recent single-pass steps, copied into buffers made
    once per shape (one ``_foreach_copy_`` per step; holding each step's own tensors instead makes every step
    allocate fresh memory, which costs a small model more than the copy), whose ghost products are then formed
    for all held steps at once: a few batched products per layer every K steps instead of several small ones per
    step (on a small model the cost per operation, not the arithmetic, dominates). Each step fills rows
    ``[padding | batch | validation]`` of its slot, the padding empty unless the batch is shorter than the slot's;
    padding rows get zero output gradients, so their products are zero. Formed into ``values`` when they are
    read, when a step's rows or layers do not fit the buffers and when the buffers are full (``limit`` numbers).
    A vector-Linear layer's feature widths are its weight's, so a step's rows, layers, dtype and device decide
    whether it fits."""

    def __init__(self, values: torch.Tensor, bias: dict[str, bool], limit: int):
        self.values, self.bias, self.limit = values, bias, limit
        self.capacity = self.n_val = 0  # batch and validation rows per slot
        self.names: tuple[str, ...] = ()
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots: list[list[torch.Tensor]] = []  # per slot, views of its rows for a full batch
        self.short_slots: dict[int, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}  # per short size
        self.held: list[tuple[torch.Tensor, float]] = []  # per held step, its batch positions and scale

    def add(self, rows: torch.Tensor, scale: float, names: tuple[str, ...], sources: list[torch.Tensor]) -> None:
        """Hold one step: ``sources`` lists each layer's (of ``names``) input and output gradient, over the batch
        rows (as many as ``rows``) then the validation rows; ``scale`` multiplies the step's products."""
        n_batch, first = rows.shape[0], sources[0]
        if n_batch > self.capacity or names != self.names or first.shape[0] - n_batch != self.n_val \
                or first.dtype != self.dtype or first.device != self.device:
            self.flush()
            self._allocate(n_batch, names, sources)
        step = len(self.held)
        if n_batch == self.capacity:
            torch._foreach_copy_(self.slots[step], sources)
        else:
            tails, padding = self._short_slot(n_batch, step)
            torch._foreach_copy_(tails, sources)
            torch._foreach_zero_(padding)
        self.held.append((rows, scale))
        if step + 1 == len(self.slots):
            self.flush()

    def _allocate(self, n_batch: int, names: tuple[str, ...], sources: list[torch.Tensor]) -> None:
        self.capacity, self.n_val = n_batch, sources[0].shape[0] - n_batch
        self.names, self.dtype, self.device = names, sources[0].dtype, sources[0].device
        rows = n_batch + self.n_val
        width = max(1, self.limit // sum(rows * t[0].numel() for t in sources))
        self.buffers = {name: (a.new_zeros((width, *a.shape)), g.new_zeros((width, *g.shape)))
                        for name, a, g in zip(names, sources[::2], sources[1::2])}
        self.slots = [[buf[step] for pair in self.buffers.values() for buf in pair] for step in range(width)]
        self.short_slots = {}

    def _short_slot(self, n_batch: int, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of slot ``step`` for a batch of ``n_batch`` rows: where its rows go (the batch region's last
        ``n_batch`` rows and the validation rows, contiguous) and the output gradients' padding rows (made once
        per size)."""
        views = self.short_slots.get(n_batch)
        if views is None:
            start = self.capacity - n_batch
            views = [([buf[start:] for buf in slot], [g[:start] for g in slot[1::2]])  # [a, g] per layer
                     for slot in self.slots]
            self.short_slots[n_batch] = views
        return views[step]

    def flush(self) -> None:
        """Form the held steps' products into ``values``."""
        k = len(self.held)
        if not k:
            return
        positions, scales = zip(*self.held)
        phi = sum(linear_ghost_products(a[:k], g[:k], self.capacity, self.bias[name])
                  for name, (a, g) in self.buffers.items())
        phi = phi.cpu().double().mul_(torch.tensor(scales, dtype=torch.float64)[:, None])
        if any(rows.shape[0] < self.capacity for rows in positions):  # short batches: padding rows are no examples
            phi = torch.cat([row[self.capacity - rows.shape[0]:] for row, rows in zip(phi, positions)])
        self.values.index_add_(0, torch.cat(positions), phi.flatten())
        self.held.clear()


class _LayerCapture:
    """Records each tracked layer's (input, output) during one forward pass, and keeps the output's gradient. The
    layers' ``forward`` is wrapped only for the duration of ``run`` (an instance attribute, removed after, so copies,
    pickles and later calls of the model never see it): a forward hook costs about 20 µs a call on CPU, the
    wrapper one Python call."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.captured: dict = {}
        self.targets = [(name, module.__dict__, self._wrap(name, type(module).forward.__get__(module)))
                        for name, module in layers]  # where each wrapper goes, and the wrapper

    def _wrap(self, name: str, forward):
        def capturing_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if name in self.captured:
                raise TDAError(f"backward(): layer {name!r} ran twice in one forward pass (shared weights); "
                               "use the step-callback form")
            if out.dtype == torch.float16:
                raise TDAError(f"backward(): layer {name!r} computes in float16, whose range cannot hold the scaled "
                               "validation gradients; run the single pass in bfloat16 or float32, or use the "
                               "step-callback form")
            inputs = args[0] if args else next(iter(kwargs.values()))
            self.captured[name] = (inputs.detach() if inputs.requires_grad else inputs, out)
            if out.requires_grad:
                out.retain_grad()
            return out
        return capturing_forward

    def run(self, model: torch.nn.Module, x: torch.Tensor) -> dict:
        """``{layer name: (input, output)}`` of one forward pass, the model's output under the key None."""
        own = [attributes.get("forward") for _, attributes, _ in self.targets]  # a forward already set on the instance
        self.captured = {}
        try:
            for (name, attributes, wrapper), forward in zip(self.targets, own):
                attributes["forward"] = wrapper if forward is None else self._wrap(name, forward)
            self.captured[None] = model(x)
            return self.captured
        finally:
            for (_, attributes, _), forward in zip(self.targets, own):
                if forward is None:
                    attributes.pop("forward", None)
                else:
                    attributes["forward"] = forward
            self.captured = {}


@dataclass
class InRunShapleyArguments:
    """In-Run Data Shapley's options (``InRunShapley(task, train, validation, batch_size, second_order=False,
    device=None, validation_batch=None, seed=0)``; ``task``, ``train`` and ``validation`` are its inputs)."""

    batch_size: int | None = option(None, "required: the divisor of each step's summed loss (the training loop's "
                                          "nominal batch size)", POSITIVE_INT)
    second_order: bool = option(False, "add the curvature interaction term (one Hessian-vector product of the "
                                       "validation loss per step; not in the single pass)", Options((False, True)))
    device: str | torch.device | None = option(None, "where the products run: 'cpu', 'cuda', … (default CPU)",
                                               config=False)
    validation_batch: int | None = option(None, "validation rows carried per step, at most the validation set's "
                                                "size: the next rows of a seeded permutation, cycling, their loss "
                                                "scaled by |V| / validation_batch (unbiased); None: all rows every "
                                                "step", POSITIVE_INT)
    seed: int = option(0, "seed of the validation rows' permutation", Interval(0, None, integer=True))


@register("inrun-shapley", Family.VALUES, InRunShapleyArguments, needs=("training_loop", "validation"))
class InRunShapley:
    """Accumulates In-Run Data Shapley values of ``train`` over the steps it is called for.

    Parameters
    ----------
    task : AttributionTask
        The model (architecture), its training loss and the tracked Linear/Conv2d layers.
    train : AttributionDataset
        The data the batch positions refer to.
    validation : AttributionDataset
        Fixed before training; its summed loss is what the values reduce.
    batch_size, second_order, device, validation_batch, seed
        Options: see ``InRunShapleyArguments`` (checked there).
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, validation: AttributionDataset,
                 batch_size: int, second_order: bool = False, device: str | torch.device | None = None,
                 validation_batch: int | None = None, seed: int = 0):
        if batch_size is None:
            raise TDAError("batch_size is required: the divisor of each step's summed loss")
        self.args = build_arguments(InRunShapleyArguments, "inrun-shapley", {
            "batch_size": batch_size, "second_order": second_order, "device": device,
            "validation_batch": validation_batch, "seed": seed})
        self.task, self.train, self.validation = task, train, validation
        self.batch_size = int(batch_size)
        if validation_batch is not None and validation_batch > len(validation):
            raise TDAError(f"validation_batch must be at most the validation set's {len(validation)} rows, "
                           f"got {validation_batch}")
        self.validation_batch = validation_batch
        self._n_validation = len(validation)
        self._validation_order = torch.randperm(len(validation), generator=torch.Generator().manual_seed(seed))
        self.second_order, self.device = second_order, as_device(device)
        self.layers = tracked_layers(task, "In-Run Data Shapley (ghost dot-products)", ALTERNATIVES)
        self._values = torch.zeros(len(train), dtype=torch.float64)
        self._held = _HeldLinearSteps(self._values, {n: m.bias is not None for n, m in self.layers}, HELD_LIMIT)
        self._loss_weights: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.steps = 0
        self._validation_fingerprint = validation.fingerprint()
        self._validation_state: tuple | None = None
        self._permuted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._validation_slices: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
        self._input_buffers: dict[tuple[int, int | None], tuple[torch.Tensor, ...]] = {}  # x, y and their batch rows
        self._batchnorms: list[torch.nn.Module] | None = None
        self._capture = _LayerCapture(self.layers)
        self._by_hand_layers: dict[torch.Size, tuple[set[str], list[torch.nn.Parameter]]] = {}

    @classmethod
    def from_recording(cls, task: AttributionTask, recording, validation: AttributionDataset, **options
                       ) -> InRunShapley:
        """The values of a run of your own loop recorded with ``RunRecorder`` (finished), computed by replaying it
        once with this as the step callback; ``options`` as ``InRunShapleyArguments`` (``batch_size`` defaults to
        the recording's)."""
        finished_recording(recording, "valuing its steps (In-Run Shapley)")
        name = recording.optimizer_class.__name__
        if not issubclass(recording.optimizer_class, torch.optim.SGD):
            raise TDAError(f"In-Run Data Shapley values SGD steps θ − (η/B)Σg; this run used {name}, whose "
                           "preconditioned step is not that game: use tracin (Adam-aware) with the same recording")
        if any(g.get("nesterov") or g.get("dampening", 0.0) for g in recording.groups):
            raise TDAError("In-Run Data Shapley values a step's own gradient; this SGD run used Nesterov or "
                           "dampening, which rescale it")
        if any(len(set(rates)) > 1 for rates in recording.learning_rates):
            raise TDAError("In-Run Data Shapley takes one learning rate per step; this run's parameter groups had "
                           "different rates")
        # the recorded data in memory (a lazy dataset read once): each step's rows are gathered from it
        shapley = cls(task, in_memory(recording.train, "inrun-shapley"), validation,
                      options.pop("batch_size", recording.batch_size), **options)
        recording.replay_steps(shapley)
        return shapley

    @property
    def values(self) -> torch.Tensor:
        """Each training example's value so far, ``[len(train)]`` float64 (positive: helpful)."""
        self._held.flush()
        return self._values

    def _validation_positions(self) -> torch.Tensor | None:
        """This step's rows of the validation set (None: all of them)."""
        return self._validation_rows()[1]

    def _validation_rows(self) -> tuple[int | None, torch.Tensor | None, torch.Tensor, torch.Tensor, float]:
        """This step's validation rows — where the slice starts in the cycle and their positions (None, None: all),
        inputs and labels — and the factor that makes their summed loss estimate the whole set's; after checking
        the set is unchanged. Rows are slices of a permuted copy of the set laid twice end to end, made once, so no
        step pays for an index or a wrap; each slice is made once too (the slices repeat with the cycle)."""
        self._check_validation_unchanged()
        data, size, n_val = self.validation, self.validation_batch, self._n_validation
        if size is None or size == n_val:
            return None, None, data.inputs, data.labels, 1.0
        start = self.steps * size % n_val
        rows = self._validation_slices.get(start)
        if rows is None:
            if self._permuted is None:
                order = self._validation_order.repeat(2)
                self._permuted = (order, data.inputs[order], data.labels[order])
            rows = (start, *(t[start: start + size] for t in self._permuted), n_val / size)
            self._validation_slices[start] = rows
        return rows

    def _step_inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A single-pass step's inputs and labels — the batch rows, then this step's validation rows — and the
        validation estimate's factor. They are gathered into buffers made once per batch size and validation
        slice, the validation rows written once, so a step pays one ``index_select`` for each (the buffers are
        reused: they are the model's input only until the step's backward)."""
        start, _, val_inputs, val_labels, estimate = self._validation_rows()
        n_batch = rows.shape[0]
        buffers = self._input_buffers.get((n_batch, start))
        if buffers is None:
            if sum(b[0].numel() for b in self._input_buffers.values()) > INPUT_BUFFER_LIMIT:
                self._input_buffers.clear()
            data = self.train
            x = data.inputs.new_empty((n_batch + len(val_inputs), *data.inputs.shape[1:]))
            y = data.labels.new_empty((n_batch + len(val_labels), *data.labels.shape[1:]))
            x[n_batch:], y[n_batch:] = val_inputs, val_labels
            buffers = self._input_buffers[n_batch, start] = (x, y, x[:n_batch], y[:n_batch])
        x, y, x_batch, y_batch = buffers
        torch.index_select(self.train.inputs, 0, rows, out=x_batch)
        torch.index_select(self.train.labels, 0, rows, out=y_batch)
        if x.device != self.device:
            x, y = x.to(self.device), y.to(self.device)
        return x, y, estimate

    def _check_validation_unchanged(self) -> None:
        """Refuse a validation set edited since recording started: tensor versions are checked every step (free);
        the data are hashed again only when a tensor was replaced or written in place."""
        data = self.validation
        state = (id(data.inputs), data.inputs._version, id(data.labels), data.labels._version, id(data.ids))
        if state == self._validation_state:
            return
        if data.fingerprint() != self._validation_fingerprint:
            raise TDAError("validation: the validation set changed after recording started; values are only "
                           "defined against one fixed set — start a new InRunShapley")
        self._validation_state = state

    def _layer_gradients(self, inputs: torch.Tensor, labels: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
        """Σ over the examples of each layer's loss gradient, as ``[out, in(+1)]`` matrices."""
        total: dict[str, torch.Tensor] = {}
        loss = lambda out, start: self.task.train_loss(out, labels[start : start + len(out)].to(out.device))
        for patches, (grads,) in layer_activity(self.task.model, self.layers, inputs, [loss], 512,
                                                self.device, params):
            for name, module in self.layers:
                g = _layer_gradient(patches[name].double(), grads[name].double(), module.bias is not None)
                total[name] = total.get(name, 0) + g
        return total

    def _as_parameters(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.layers:
            prefix = f"{name}." if name else ""
            m = matrices[name]
            out[prefix + "weight"] = m[:, : module.weight[0].numel()].reshape(module.weight.shape)
            if module.bias is not None:
                out[prefix + "bias"] = m[:, -1]
        return out

    def _hvp(self, params: dict, vector: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor,
             scale: float) -> dict[str, torch.Tensor]:
        """H_val · vector (tracked parameters), by forward-over-reverse on the (scaled) validation loss."""
        names = list(vector)
        fixed = {**{k: v.to(self.device) for k, v in self.task.model.named_buffers()},
                 **{k: v for k, v in params.items() if k not in vector}}
        x, y = inputs.to(self.device), labels.to(self.device)

        def loss(p: dict) -> torch.Tensor:
            out = functional_call(self.task.model, {**fixed, **p}, (x,))
            return self.task.train_loss(out, y).sum() * scale

        primal = {k: params[k].detach() for k in names}
        tangent = {k: vector[k].to(primal[k]) for k in names}
        with forward_mode_attention():
            return jvp(grad(loss), (primal,), (tangent,))[1]

    def __call__(self, step: int, positions: torch.Tensor, params: dict[str, torch.Tensor], lr: float) -> None:
        """Add this step's values for the examples at ``positions`` (call before the optimizer step)."""
        _, _, val_inputs, val_labels, estimate = self._validation_rows()
        params = {k: v.detach().to(self.device) for k, v in params.items()}
        rows = positions.cpu()
        batch = self.train.subset(rows.tolist())
        g_val = {name: g * estimate for name, g in self._layer_gradients(val_inputs, val_labels, params).items()}
        loss = lambda out, start: self.task.train_loss(out, batch.labels[start : start + len(out)].to(out.device))
        (patches, (grads,)), = layer_activity(self.task.model, self.layers, batch.inputs, [loss], len(batch),
                                              self.device, params)
        scale = lr / self.batch_size
        phi = sum(ghost_products(patches[n].double(), grads[n].double(), g_val[n]) for n, _ in self.layers) * scale
        if self.second_order:
            batch_sum = {name: _layer_gradient(patches[name].double(), grads[name].double(), module.bias is not None)
                         for name, module in self.layers}
            hv = self._hvp(params, self._as_parameters(batch_sum), val_inputs, val_labels, estimate)
            matrices = {}
            for name, module in self.layers:
                prefix = f"{name}." if name else ""
                w = hv[prefix + "weight"].reshape(module.weight.shape[0], -1)
                matrices[name] = torch.cat([w, hv[prefix + "bias"][:, None]], 1) if module.bias is not None else w
            curvature = sum(ghost_products(patches[n].double(), grads[n].double(), matrices[n])
                            for n, _ in self.layers)
            phi = phi - 0.5 * scale**2 * curvature
        self._values.index_add_(0, rows, phi.cpu())
        self.steps += 1

    def backward(self, positions: torch.Tensor, lr: float) -> torch.Tensor:
        """Single-pass step for your own SGD loop (in place of ``loss.backward()``): adds the batch loss
        Σ ℓ / B's gradient to ``.grad`` (see the module docstring for the validation rows' share), adds this step's
        first-order values, returns the batch loss."""
        model = self.task.model
        self._check_single_pass(model)
        is_cpu_tensor = type(positions) is torch.Tensor and not positions.is_cuda
        rows = positions if is_cpu_tensor else torch.as_tensor(positions).cpu()
        n_batch = rows.shape[0]
        x, y, estimate = self._step_inputs(rows)
        captured = self._capture.run(model, x)
        out = captured.pop(None)
        losses = self.task.train_loss(out, y)
        weights, select_total, validation_scale = self._weights(n_batch, y.shape[0] - n_batch, estimate, losses)
        totals = weights @ losses  # [the step's objective, the batch loss]
        by_hand, others = self._by_hand(captured, x.shape)
        if by_hand:  # their weight gradients come from the batch rows below, not from autograd
            inputs = [captured[name][1] for name, _ in self.layers
                      if name in by_hand and captured[name][1].requires_grad]
            inputs += [p for p in others if p.requires_grad]
            if inputs:
                totals.backward(select_total, inputs=inputs)
        else:
            totals.backward(select_total)
        phi, held, sources = 0, [], []  # the layer inputs are detached and the gradients need none: no graph below
        for name, module in self.layers:
            a, layer_out = captured[name]
            g = layer_out.grad
            if g is None:  # the layer's output does not reach the loss
                continue
            if name not in by_hand:  # products formed later (_HeldLinearSteps)
                held.append(name)
                sources += (a, g)
                continue
            w_grad, b_grad, contribution = _single_pass_layer(module, a, g, n_batch)
            phi = phi + contribution
            for param, value in ((module.weight, w_grad), (module.bias, b_grad)):
                if param is not None and param.requires_grad:
                    param.grad = value if param.grad is None else param.grad.add_(value)
        if torch.is_tensor(phi):
            self._values.index_add_(0, rows, phi.cpu().double().mul_(lr / validation_scale))
        if held:
            self._held.add(rows, lr / validation_scale, tuple(held), sources)
        self.steps += 1
        return totals[1].detach()

    def _by_hand(self, captured: dict, input_shape: torch.Size) -> tuple[set[str], list[torch.nn.Parameter]]:
        """The tracked layers whose weight gradients a single-pass step forms by hand — all but Linear layers on
        vectors, whose products are held — and the model's parameters outside them, which the step's backward
        (stopped at those layers' outputs) runs to. Read from one step's layer inputs per model input shape."""
        made = self._by_hand_layers.get(input_shape)
        if made is None:
            by_hand = {name for name, module in self.layers
                       if not (isinstance(module, torch.nn.Linear) and captured[name][0].dim() == 2)}
            skipped = {id(p) for name, module in self.layers if name in by_hand
                       for p in module.parameters(recurse=False)}
            others = [p for p in self.task.model.parameters() if id(p) not in skipped]
            made = self._by_hand_layers[input_shape] = (by_hand, others)
        return made

    def _weights(self, n_batch: int, n_val: int, estimate: float, losses: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-row loss weights of a single-pass step, ``[2, rows]``: the objective (1/B on the batch rows, the
        estimate's factor times the validation scale on the validation rows) and the batch loss alone; the
        gradient output that selects the objective; and the validation scale. Made once per shape (a short last
        batch and the full ones alternate every epoch)."""
        key = (n_batch, n_val, estimate, losses.dtype, losses.device)
        made = self._loss_weights.get(key)
        if made is None:
            scale = torch.finfo(losses.dtype).eps * 2.0**-VALIDATION_SCALE_BITS
            weights = torch.zeros(2, n_batch + n_val, dtype=losses.dtype, device=losses.device)
            weights[:, :n_batch] = 1 / self.batch_size
            weights[0, n_batch:] = estimate * scale
            select = torch.tensor([1.0, 0.0], dtype=losses.dtype, device=losses.device)
            made = self._loss_weights[key] = (weights, select, scale)
        return made

    def _check_single_pass(self, model: torch.nn.Module) -> None:
        if self.second_order:
            raise TDAError("second_order: the single-pass backward() is first order; use the step-callback form "
                           "(train_weighted(..., callback=shapley)) for second-order values")
        if self._batchnorms is None:  # the model's structure is read once; modes are re-checked every step
            self._batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if any(m.training for m in self._batchnorms):
            raise TDAError("backward(): BatchNorm in training mode mixes the validation rows into the batch "
                           "statistics; use the step-callback form or put BatchNorm in eval mode")
