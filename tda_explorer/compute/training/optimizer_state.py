"""What an optimizer carries at a checkpoint: its kind, and for Adam/AdamW its moments by parameter name, with the
update direction those moments give one example's gradient (as LESS forms it).

From your own ``torch.optim`` loop, ``capture_checkpoint(model, optimizer, learning_rate, step)`` takes a
``Checkpoint`` that says which optimizer made it and (Adam/AdamW) what it had accumulated; a ``transformers.Trainer``
run is recorded by ``tda_explorer.integrations.huggingface.RecordingCallback``.

The Adam state (``optimizer_state``) is a dict:

- ``exp_avg``, ``exp_avg_sq``: parameter name -> first and second moments (``max_exp_avg_sq`` too with amsgrad);
- ``step``: the steps taken, an int (or name -> int where they differ);
- ``betas``, ``eps``: the optimizer's, a pair and a float (or name -> value where its groups differ).

A parameter that has not been stepped yet holds zero moments at step 0: Adam's state before its first update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.training.train import Checkpoint

ADAM_KINDS = ("adam", "adamw")
MOMENTS = ("exp_avg", "exp_avg_sq")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside wrappers that keep it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, …); a ``TDAError`` for anything that is not an optimizer."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TDAError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and \
            optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_kind(optimizer: Any) -> str:
    """The optimizer's kind, its class name in lower case: "sgd", "adam", "adamw", "adagrad", …"""
    return type(unwrap_optimizer(optimizer)).__name__.lower()


def _uniform(values: dict[str, Any]) -> Any:
    """One value when every parameter has the same, else the per-name dict."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else dict(values)


def capture_optimizer_state(model: nn.Module, optimizer: Any, names: Sequence[str] | None = None) -> dict | None:
    """Adam/AdamW's state for ``model``'s parameters (``names``, default: the trainable ones the optimizer steps),
    copied to the CPU and keyed by parameter name (see the module docstring); None for other kinds.

    The optimizer's parameters are matched to ``model``'s by identity, so the names are the model's whatever order
    the optimizer's groups hold them in."""
    opt = unwrap_optimizer(optimizer)
    if optimizer_kind(opt) not in ADAM_KINDS:
        return None
    named = dict(model.named_parameters())
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad and id(p) in group_of]
    state: dict[str, Any] = {"exp_avg": {}, "exp_avg_sq": {}}
    steps, betas, eps = {}, {}, {}
    for name in names:
        if name not in named:
            raise TDAError(f"names: {name!r} is not a parameter of the model")
        p = named[name]
        if id(p) not in group_of:
            raise TDAError(f"names: parameter {name!r} is not in the optimizer's parameter groups")
        group, held = group_of[id(p)], opt.state.get(p, {})
        if group.get("amsgrad", False):
            state.setdefault("max_exp_avg_sq", {})
        for key in (*MOMENTS, "max_exp_avg_sq"):
            if key in state:
                moment = held.get(key)
                state[key][name] = (torch.zeros_like(p, device="cpu") if moment is None
                                    else moment.detach().to("cpu", copy=True))
        steps[name] = int(held["step"]) if "step" in held else 0
        betas[name] = tuple(float(b) for b in group["betas"])
        eps[name] = float(group["eps"])
    state.update(step=_uniform(steps), betas=_uniform(betas), eps=_uniform(eps))
    return state


def capture_checkpoint(model: nn.Module, optimizer: Any, learning_rate: float, step: int, *,
                       trainable_only: bool = True) -> Checkpoint:
    """A ``Checkpoint`` of ``model`` now: its parameters (the trainable ones, or its whole state dict with
    ``trainable_only=False``) on the CPU, ``learning_rate``, ``step``, the optimizer's kind and (Adam/AdamW) state."""
    if trainable_only:
        state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    else:
        state = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}
    return Checkpoint(state, float(learning_rate), int(step), optimizer=optimizer_kind(optimizer),
                      optimizer_state=capture_optimizer_state(model, optimizer))


def _per_name(value: Any, name: str, key: str) -> Any:
    if isinstance(value, dict):
        if name not in value:
            raise TDAError(f"optimizer_state[{key!r}] has no entry for parameter {name!r}")
        return value[name]
    return value


def check_adam_state(state: Any, names: Sequence[str], shapes: dict[str, torch.Size], where: str) -> None:
    """A ``TDAError`` naming ``where`` unless ``state`` holds Adam moments of the right shapes for ``names``."""
    if not isinstance(state, dict) or any(k not in state for k in (*MOMENTS, "step", "betas", "eps")):
        raise TDAError(f"{where}: optimizer_state must hold exp_avg, exp_avg_sq, step, betas and eps (Adam's "
                       f"moments by parameter name), got {sorted(state) if isinstance(state, dict) else state!r}")
    for name in names:
        for key in (*MOMENTS, *(("max_exp_avg_sq",) if "max_exp_avg_sq" in state else ())):
            moment = state[key].get(name) if isinstance(state[key], dict) else None
            if moment is None:
                raise TDAError(f"{where}: optimizer_state[{key!r}] has no moment for parameter {name!r}: record "
                               "every tracked parameter, or track only the optimised ones (parameters=)")
            if tuple(moment.shape) != tuple(shapes[name]):
                raise TDAError(f"{where}: optimizer_state[{key!r}][{name!r}] has shape {tuple(moment.shape)}, the "
                               f"parameter {tuple(shapes[name])}")
        b1, b2 = _per_name(state["betas"], name, "betas")
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or not _per_name(state["eps"], name, "eps") >= 0:
            raise TDAError(f"{where}: optimizer_state betas must lie in [0, 1) and eps be >= 0 (parameter {name!r})")


def adam_step_scale(state: dict) -> float | None:
    """The mean over every recorded parameter of √v̂ + ε, Adam's per-parameter divisor of the step (v̂ = v / (1 − β₂ᵗ),
    the second moment bias-corrected at its step t): the run's steps are lr / that, parameter by parameter. None when
    no parameter has taken a step."""
    total, count = 0.0, 0
    for name, v in state["exp_avg_sq"].items():
        b2 = _per_name(state["betas"], name, "betas")[1]
        t = int(_per_name(state["step"], name, "step"))
        if t == 0:
            continue  # not stepped yet: no moment to read
        total += float(((v.double() / (1.0 - b2 ** t)).sqrt() + _per_name(state["eps"], name, "eps")).sum())
        count += v.numel()
    return total / count if count else None


def adam_direction(grads: torch.Tensor, names: Sequence[str], shapes: dict[str, torch.Size], state: dict
                   ) -> torch.Tensor:
    """Γ(g) = m̂′ / (√v̂′ + ε) for per-example gradients ``[n, p]`` flattened in ``names`` order: the update Adam
    would take (per unit learning rate) if ``g`` alone were the next step's gradient, with m′ = β₁m + (1−β₁)g,
    v′ = β₂v + (1−β₂)g² (amsgrad: v′ ← max(v_max, v′)) bias-corrected at step t+1."""
    out, start = torch.empty_like(grads), 0
    for name in names:
        size = shapes[name].numel()
        g = grads[:, start:start + size]
        b1, b2 = _per_name(state["betas"], name, "betas")
        eps = _per_name(state["eps"], name, "eps")
        t = int(_per_name(state["step"], name, "step")) + 1
        m = state["exp_avg"][name].reshape(-1).to(g)
        v = b2 * state["exp_avg_sq"][name].reshape(-1).to(g) + (1 - b2) * g.square()
        if "max_exp_avg_sq" in state:
            v = torch.maximum(state["max_exp_avg_sq"][name].reshape(-1).to(g), v)
        m_hat = (b1 * m + (1 - b1) * g) / (1 - b1**t)
        out[:, start:start + size] = m_hat / ((v / (1 - b2**t)).sqrt() + eps)
        start += size
    return out
