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
  and one backward run on the batch and the validation set together (the recipe's concatenation); the
  validation rows' share of each layer's gradient, Σ_v s_v [a_v; 1]ᵀ, is the ghost products' M and is then
  subtracted, so ``.grad`` holds the batch loss's gradient as a plain backward would (to float rounding: the
  validation loss enters scaled by 2⁻¹⁰, an exact power of two, so its removal leaves ≈1e-7 relative error).
  First order only; every trainable parameter must sit in a Linear/Conv2d layer and no BatchNorm may be
  training, since either would mix the validation rows into the update.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, jvp

from tda_explorer._validation import TDAError, as_device, check_positive_int
from tda_explorer.compute.kfac import _output_grads, _patches, layer_activity, tracked_layers
from tda_explorer.compute.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset

VALIDATION_SCALE = 2.0**-10  # exact in floating point: the validation rows' gradient is removed without bias
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


def _conv_ghost(module: torch.nn.Conv2d, inputs: torch.Tensor, grads: torch.Tensor, n_batch: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For a convolution: the batch rows' ⟨G_z, G_val⟩ and the validation rows' weight and bias gradients, with
    ``conv2d_weight`` for G_val and one convolution of the batch inputs by G_val (Σ_t s_t (G_val a_t + b_val))."""
    padding = module.padding
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else tuple(
            d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    g_val, s_batch = grads[n_batch:], grads[:n_batch]
    g_weight = torch.nn.grad.conv2d_weight(inputs[n_batch:], module.weight.shape, g_val, module.stride, padding,
                                           module.dilation, module.groups)
    g_bias = g_val.sum((0, 2, 3)) if module.bias is not None else None
    mapped = torch.nn.functional.conv2d(inputs[:n_batch], g_weight, g_bias, module.stride, padding, module.dilation,
                                        module.groups)
    return (mapped * s_batch).sum((1, 2, 3)), g_weight, g_bias


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
    """

    def __init__(self, task: AttributionTask, train: AttributionDataset, validation: AttributionDataset,
                 batch_size: int, second_order: bool = False, device: str | torch.device | None = None):
        self.task, self.train, self.validation = task, train, validation
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.second_order, self.device = second_order, as_device(device)
        self.layers = tracked_layers(task, "In-Run Data Shapley (ghost dot-products)", ALTERNATIVES)
        self.values = torch.zeros(len(train), dtype=torch.float64)
        self.steps = 0
        self._validation_fingerprint = validation.fingerprint()

    def _layer_gradients(self, data: AttributionDataset, params: dict) -> dict[str, torch.Tensor]:
        """Σ over ``data`` of each layer's loss gradient, as ``[out, in(+1)]`` matrices."""
        total: dict[str, torch.Tensor] = {}
        loss = lambda out, start: self.task.train_loss(out, data.labels[start : start + len(out)].to(out.device))
        for patches, (grads,) in layer_activity(self.task.model, self.layers, data.inputs, [loss], 512,
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

    def _hvp(self, params: dict, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H_val · vector (tracked parameters), by forward-over-reverse on the validation loss."""
        names = list(vector)
        fixed = {**{k: v.to(self.device) for k, v in self.task.model.named_buffers()},
                 **{k: v for k, v in params.items() if k not in vector}}
        x, y = self.validation.inputs.to(self.device), self.validation.labels.to(self.device)

        def loss(p: dict) -> torch.Tensor:
            out = functional_call(self.task.model, {**fixed, **p}, (x,))
            return self.task.train_loss(out, y).sum()

        primal = {k: params[k].detach() for k in names}
        tangent = {k: vector[k].to(primal[k]) for k in names}
        return jvp(grad(loss), (primal,), (tangent,))[1]

    def __call__(self, step: int, positions: torch.Tensor, params: dict[str, torch.Tensor], lr: float) -> None:
        """Add this step's values for the examples at ``positions`` (call before the optimizer step)."""
        if self.validation.fingerprint() != self._validation_fingerprint:
            raise TDAError("validation: the validation set changed after recording started; values are only "
                           "defined against one fixed set — start a new InRunShapley")
        params = {k: v.detach().to(self.device) for k, v in params.items()}
        rows = positions.cpu()
        batch = self.train.subset(rows.tolist())
        g_val = self._layer_gradients(self.validation, params)
        loss = lambda out, start: self.task.train_loss(out, batch.labels[start : start + len(out)].to(out.device))
        (patches, (grads,)), = layer_activity(self.task.model, self.layers, batch.inputs, [loss], len(batch),
                                              self.device, params)
        scale = lr / self.batch_size
        phi = sum(ghost_products(patches[n].double(), grads[n].double(), g_val[n]) for n, _ in self.layers) * scale
        if self.second_order:
            batch_sum = {name: _layer_gradient(patches[name].double(), grads[name].double(), module.bias is not None)
                         for name, module in self.layers}
            hv = self._hvp(params, self._as_parameters(batch_sum))
            matrices = {}
            for name, module in self.layers:
                prefix = f"{name}." if name else ""
                w = hv[prefix + "weight"].reshape(module.weight.shape[0], -1)
                matrices[name] = torch.cat([w, hv[prefix + "bias"][:, None]], 1) if module.bias is not None else w
            curvature = sum(ghost_products(patches[n].double(), grads[n].double(), matrices[n])
                            for n, _ in self.layers)
            phi = phi - 0.5 * scale**2 * curvature
        self.values.index_add_(0, rows, phi.cpu())
        self.steps += 1

    def backward(self, positions: torch.Tensor, lr: float) -> torch.Tensor:
        """Single-pass step for your own SGD loop (in place of ``loss.backward()``): leaves the batch loss
        Σ ℓ / B's gradient in ``.grad``, adds this step's first-order values, returns the batch loss."""
        model = self.task.model
        self._check_single_pass(model)
        rows = torch.as_tensor(positions).cpu()
        n_batch = len(rows)
        x = torch.cat([self.train.inputs[rows], self.validation.inputs]).to(self.device)
        y_batch, y_val = self.train.labels[rows].to(self.device), self.validation.labels.to(self.device)
        captured: dict[str, list] = {}
        handles = []
        for name, module in self.layers:
            def hook(mod, args, out, name=name):
                captured[name] = [args[0].detach(), None]
                out.register_hook(lambda g, name=name: captured[name].__setitem__(1, g.detach()))
            handles.append(module.register_forward_hook(hook))
        try:
            out = model(x)
        finally:
            for h in handles:
                h.remove()
        batch_loss = self.task.train_loss(out[:n_batch], y_batch).sum() / self.batch_size
        val_loss = self.task.train_loss(out[n_batch:], y_val).sum() * VALIDATION_SCALE
        (batch_loss + val_loss).backward()
        phi = 0
        with torch.no_grad():
            for name, module in self.layers:
                x_all, g_all = captured[name]
                if isinstance(module, torch.nn.Conv2d):  # convolutions do the unfolding's work, far faster
                    contribution, g_weight, g_bias = _conv_ghost(module, x_all, g_all, n_batch)
                else:
                    a, s = _patches(module, x_all), _output_grads(module, g_all)
                    g_val = _layer_gradient(a[n_batch:], s[n_batch:], module.bias is not None)
                    contribution = ghost_products(a[:n_batch], s[:n_batch], g_val)
                    width = module.weight[0].numel()
                    g_weight = g_val[:, :width].reshape(module.weight.shape)
                    g_bias = g_val[:, width] if module.bias is not None else None
                module.weight.grad -= g_weight
                if module.bias is not None:
                    module.bias.grad -= g_bias
                phi = phi + contribution
        self.values.index_add_(0, rows, (lr / VALIDATION_SCALE) * phi.double().cpu())
        self.steps += 1
        return batch_loss.detach()

    def _check_single_pass(self, model: torch.nn.Module) -> None:
        if self.second_order:
            raise TDAError("second_order: the single-pass backward() is first order; use the step-callback form "
                           "(train_weighted(..., callback=shapley)) for second-order values")
        tracked = {id(p) for _, m in self.layers for p in m.parameters(recurse=False)}
        outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in tracked]
        if outside:
            raise TDAError(f"backward(): trainable parameters outside the tracked Linear/Conv2d layers ({outside[:4]}) "
                           "would also learn from the validation rows; track every trainable layer, freeze the "
                           "others, or use the step-callback form")
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
            raise TDAError("backward(): BatchNorm in training mode mixes the validation rows into the batch "
                           "statistics; use the step-callback form")
