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
  and one backward run on the batch and the validation rows together (the recipe's concatenation), the backward
  only to the tracked layers' outputs: each layer's weight gradient is then formed from the batch rows alone (so
  ``.grad`` gets exactly the batch loss's gradient) by the same products that give the ghost dot-products — for
  small layers the per-example gradients themselves, whose sum is the weight gradient. A Linear layer on vectors
  holds its inputs and output gradients for a few steps and forms their ghost products for all of them at once
  (a batched product per layer instead of several small ones per step: on a small model the cost is per
  operation, not arithmetic); reading ``values`` forms what is held. First order only; every
  trainable parameter must sit in a Linear/Conv2d layer and no BatchNorm may be training, since either would mix
  the validation rows into the update.
Both forms take ``validation_batch``: a cycling, seeded slice of the fixed validation set per step, scaled to
estimate the whole set's gradient without bias — the knob that trades the values' noise for throughput (the
validation rows' forward and backward are most of the cost on a convolutional model).
"""

from __future__ import annotations

import weakref

import torch
from torch.func import functional_call, grad, jvp

from tda_explorer._validation import TDAError, as_device, check_positive_int
from tda_explorer.compute.kfac import _output_grads, _patches, conv_padding, layer_activity, tracked_layers
from tda_explorer.compute.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset

PER_EXAMPLE_LIMIT = 2**22  # per-example gradients materialised by the single pass up to this many numbers
PENDING_LIMIT = 2**19  # Linear inputs and output gradients the single pass holds before forming their products
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
    if n_val * (n_in + n_out) <= n_in * n_out:
        inputs = torch.baddbmm(a_b.new_ones(()), a_b, a_v.mT) if bias else a_b @ a_v.mT
        return torch.linalg.vecdot(inputs, s_b @ s_v.mT)
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
    - otherwise G_val applied to the batch: one convolution by G_val for Conv2d, ghost products for Linear."""
    bias = module.bias is not None
    patches, out_grads = _patches(module, x), _output_grads(module, g)
    small = len(x) * out_grads.shape[1] * patches.shape[1] <= PER_EXAMPLE_LIMIT
    if not small and isinstance(module, torch.nn.Conv2d):
        padding = conv_padding(module)
        x_b, s_b, s_v = x[:n_batch], g[:n_batch], g[n_batch:]
        conv_weight = lambda inputs, grads: torch.nn.grad.conv2d_weight(
            inputs, module.weight.shape, grads, module.stride, padding, module.dilation, module.groups)
        w_grad, val_weight = conv_weight(x_b, s_b), conv_weight(x[n_batch:], s_v)
        b_grad, val_bias = (s_b.sum((0, 2, 3)), s_v.sum((0, 2, 3))) if bias else (None, None)
        mapped = torch.nn.functional.conv2d(x_b, val_weight, val_bias, module.stride, padding, module.dilation,
                                            module.groups)
        return w_grad, b_grad, (mapped * s_b).sum((1, 2, 3))
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


class _PendingLinearProducts:
    """Vector-Linear layers' inputs and output gradients from recent single-pass steps, whose ghost products are
    formed together: a few batched products per layer every K steps instead of several small ones per step (on a
    small model the cost per operation, not the arithmetic, dominates). Flushed into ``values`` when they are
    read, when a step's shapes differ from the held ones, and when ``limit`` numbers are held."""

    def __init__(self, values: torch.Tensor, bias: dict[str, bool], limit: int):
        self.values, self.bias, self.limit = values, bias, limit
        self.steps: list[tuple[torch.Tensor, float, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self.key: tuple | None = None
        self.numbers = 0

    def add(self, rows: torch.Tensor, lr: float, n_batch: int,
            tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = (n_batch, tuple((name, a.shape, g.shape) for name, (a, g) in tensors.items()))
        if key != self.key:
            self.flush()
            self.key = key
        self.steps.append((rows, lr, tensors))
        self.numbers += sum(a.numel() + g.numel() for a, g in tensors.values())
        if self.numbers >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.steps:
            return
        n_batch = self.key[0]
        phi = sum(linear_ghost_products(torch.stack([t[name][0] for _, _, t in self.steps]),
                                        torch.stack([t[name][1] for _, _, t in self.steps]), n_batch, bias)
                  for name, bias in self.bias.items() if name in self.steps[0][2])
        lrs = torch.tensor([lr for _, lr, _ in self.steps], dtype=torch.float64)
        self.values.index_add_(0, torch.cat([rows for rows, _, _ in self.steps]),
                                   phi.cpu().double().mul_(lrs[:, None]).flatten())
        self.steps.clear()
        self.numbers = 0


class _LayerCapture:
    """Forward hooks on the tracked layers, registered once and removed when the recorder is collected; they record
    each layer's (detached input, output) only during ``run``."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.captured: dict | None = None
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in layers]

    def _hook(self, name: str):
        def hook(module, args, out):
            if self.captured is None:
                return
            if name in self.captured:
                raise TDAError(f"backward(): layer {name!r} ran twice in one forward pass (shared weights); "
                               "use the step-callback form")
            self.captured[name] = (args[0].detach(), out)
        return hook

    def run(self, model: torch.nn.Module, x: torch.Tensor) -> dict:
        """``{layer name: (input, output)}`` of one forward pass, the model's output under the key None."""
        self.captured = {}
        try:
            self.captured[None] = model(x)
            return self.captured
        finally:
            self.captured = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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
    batch_size : int
        The divisor of each step's summed loss.
    second_order : bool
        Add the curvature interaction term (one Hessian-vector product per step).
    validation_batch : int, optional
        Validation rows carried per step (default: all). Step t takes the next ``validation_batch`` rows of a
        seeded permutation of the set, cycling, and scales their loss by |V| / ``validation_batch``: each step's
        g_val is an unbiased estimate of the whole set's, at a fraction of the cost.
    seed : int
        Seeds that permutation.
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, validation: AttributionDataset,
                 batch_size: int, second_order: bool = False, device: str | torch.device | None = None,
                 validation_batch: int | None = None, seed: int = 0):
        self.task, self.train, self.validation = task, train, validation
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if validation_batch is not None and check_positive_int(validation_batch, "validation_batch") > len(validation):
            raise TDAError(f"validation_batch must be at most the validation set's {len(validation)} rows, "
                           f"got {validation_batch}")
        self.validation_batch = validation_batch
        self._validation_order = torch.randperm(len(validation), generator=torch.Generator().manual_seed(seed))
        self.second_order, self.device = second_order, as_device(device)
        self.layers = tracked_layers(task, "In-Run Data Shapley (ghost dot-products)", ALTERNATIVES)
        self._values = torch.zeros(len(train), dtype=torch.float64)
        self._pending = _PendingLinearProducts(self._values, {n: m.bias is not None for n, m in self.layers},
                                               PENDING_LIMIT)
        self._loss_weights: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.steps = 0
        self._validation_fingerprint = validation.fingerprint()
        self._validation_state: tuple | None = None
        self._untracked: list[tuple[str, torch.nn.Parameter]] | None = None
        self._permuted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._batchnorms: list[torch.nn.Module] = []
        self._capture: _LayerCapture | None = None

    @property
    def values(self) -> torch.Tensor:
        """Each training example's value so far, ``[len(train)]`` float64 (positive: helpful)."""
        self._pending.flush()
        return self._values

    def _validation_positions(self) -> torch.Tensor | None:
        """This step's rows of the validation set (None: all of them)."""
        return self._validation_rows()[0]

    def _validation_rows(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, float]:
        """This step's validation rows — their positions (None: all), inputs and labels — and the factor that makes
        their summed loss estimate the whole set's; after checking the set is unchanged. Rows are slices of a
        permuted copy of the set laid twice end to end, made once, so no step pays for an index or a wrap."""
        self._check_validation_unchanged()
        data, size = self.validation, self.validation_batch
        if size is None or size == len(data):
            return None, data.inputs, data.labels, 1.0
        if self._permuted is None:
            order = self._validation_order.repeat(2)
            self._permuted = (order, data.inputs[order], data.labels[order])
        start = self.steps * size % len(data)
        order, inputs, labels = self._permuted
        return order[start: start + size], inputs[start: start + size], labels[start: start + size], len(data) / size

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
        return jvp(grad(loss), (primal,), (tangent,))[1]

    def __call__(self, step: int, positions: torch.Tensor, params: dict[str, torch.Tensor], lr: float) -> None:
        """Add this step's values for the examples at ``positions`` (call before the optimizer step)."""
        _, val_inputs, val_labels, estimate = self._validation_rows()
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
        Σ ℓ / B's gradient to ``.grad``, adds this step's first-order values, returns the batch loss."""
        model = self.task.model
        self._check_single_pass(model)
        rows = torch.as_tensor(positions).cpu()
        n_batch = len(rows)
        _, val_inputs, val_labels, estimate = self._validation_rows()
        x = torch.cat([self.train.inputs[rows], val_inputs]).to(self.device)
        y = torch.cat([self.train.labels[rows], val_labels]).to(self.device)
        if self._capture is None:
            self._capture = _LayerCapture(self.layers)
            weakref.finalize(self, self._capture.remove)
        captured = self._capture.run(model, x)
        out = captured.pop(None)
        losses = self.task.train_loss(out, y)
        weights, select_total = self._weights(n_batch, len(y) - n_batch, estimate, losses)
        totals = weights @ losses  # [the step's objective, the batch loss]
        # Gradients w.r.t. the layer outputs only: the weight gradients are formed below from the batch rows alone
        # (so the validation rows never reach .grad) and share their inputs with the ghost products.
        grads = torch.autograd.grad(totals, [captured[n][1] for n, _ in self.layers], select_total,
                                    allow_unused=True)
        phi, linear = 0, {}
        with torch.no_grad():
            for (name, module), g in zip(self.layers, grads):
                if g is None:  # the layer's output does not reach the loss
                    continue
                a = captured[name][0]
                if isinstance(module, torch.nn.Linear) and a.dim() == 2:  # products deferred (_PendingLinearProducts)
                    g_batch = g[:n_batch]
                    w_grad = g_batch.T @ a[:n_batch]
                    b_grad = g_batch.sum(0) if module.bias is not None else None
                    linear[name] = (a, g)
                else:
                    w_grad, b_grad, contribution = _single_pass_layer(module, a, g, n_batch)
                    phi = phi + contribution
                for param, value in ((module.weight, w_grad), (module.bias, b_grad)):
                    if param is not None and param.requires_grad:
                        param.grad = value if param.grad is None else param.grad.add_(value)
            if torch.is_tensor(phi):
                self._values.index_add_(0, rows, phi.cpu().double().mul_(lr))
            if linear:
                self._pending.add(rows, lr, n_batch, linear)
        self.steps += 1
        return totals[1].detach()

    def _weights(self, n_batch: int, n_val: int, estimate: float, losses: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss weights of a single-pass step, ``[2, rows]``: the objective (1/B on the batch rows, the
        estimate's factor on the validation rows) and the batch loss alone; and the gradient output that selects
        the objective. Made once per shape."""
        key = (n_batch, n_val, estimate, losses.dtype, losses.device)
        if self._loss_weights is None or self._loss_weights[0] != key:
            weights = torch.zeros(2, n_batch + n_val, dtype=losses.dtype, device=losses.device)
            weights[:, :n_batch] = 1 / self.batch_size
            weights[0, n_batch:] = estimate
            select = torch.tensor([1.0, 0.0], dtype=losses.dtype, device=losses.device)
            self._loss_weights = (key, (weights, select))
        return self._loss_weights[1]

    def _check_single_pass(self, model: torch.nn.Module) -> None:
        if self.second_order:
            raise TDAError("second_order: the single-pass backward() is first order; use the step-callback form "
                           "(train_weighted(..., callback=shapley)) for second-order values")
        if self._untracked is None:  # the model's structure is read once; flags are re-checked every step
            tracked = {id(p) for _, m in self.layers for p in m.parameters(recurse=False)}
            self._untracked = [(n, p) for n, p in model.named_parameters() if id(p) not in tracked]
            self._batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        outside = [n for n, p in self._untracked if p.requires_grad]
        if outside:
            raise TDAError(f"backward(): trainable parameters outside the tracked Linear/Conv2d layers ({outside[:4]}) "
                           "would also learn from the validation rows; track every trainable layer, freeze the "
                           "others, or use the step-callback form")
        if any(m.training for m in self._batchnorms):
            raise TDAError("backward(): BatchNorm in training mode mixes the validation rows into the batch "
                           "statistics; use the step-callback form")
