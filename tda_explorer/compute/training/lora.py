"""Low-rank adapters for ``nn.Linear`` layers (no ``peft`` needed), and dropout inserted into a trained MLP: the
two cheap ways to an attribution ensemble (Deng, Li, Zhang, Ma, 2024).

``add_lora(model, rank)`` returns a copy whose every ``nn.Linear`` computes W x + b + (α/r)·B A x with the base
weights frozen, A seeded Gaussian and B zero (the adapted model starts equal to the base); only A and B train and
only their per-example gradients are attributed. ``add_dropout(model, p)`` returns a copy of a Sequential with a
Dropout after every activation: identical in eval mode, and a source of ensemble members when masks are drawn.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_positive_int

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · x Aᵀ Bᵀ`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0, seed: int = 0, name: str = "layer"):
        super().__init__()
        width = min(base.in_features, base.out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= width:
            raise TDAError(f"rank must be an integer in 1..{width} for {name!r} ({base.in_features} → "
                           f"{base.out_features}), got {rank!r}")
        self.base = base.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        dtype = base.weight.dtype
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen, dtype=dtype)
                                   / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


#: The adapters' rank when none is chosen (capped at each layer's narrower side).
DEFAULT_RANK = 4


def _rank(rank: int | None, layer: nn.Linear) -> int:
    """The chosen rank as it is (checked by the layer), or the default capped at the layer's narrower side."""
    return min(DEFAULT_RANK, layer.in_features, layer.out_features) if rank is None else rank


def add_lora(model: nn.Module, rank: int | None, seed: int = 0, alpha: float = 1.0) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` adapted (base weights frozen, adapters seeded per layer); with
    ``rank=None`` each layer gets ``DEFAULT_RANK`` or its narrower side when smaller."""
    adapted = copy.deepcopy(model)
    for p in adapted.parameters():
        p.requires_grad_(False)
    if isinstance(adapted, nn.Linear):  # the model is one layer: it becomes the adapted layer
        return LoRALinear(adapted, _rank(rank, adapted), alpha, seed * 1_000_003, "model")
    linears = [(name, m) for name, m in adapted.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TDAError("add_lora adapts nn.Linear layers; the model has none")
    for index, (name, module) in enumerate(linears):
        parent_name, _, child = name.rpartition(".")
        parent = adapted.get_submodule(parent_name) if parent_name else adapted
        setattr(parent, child, LoRALinear(module, _rank(rank, module), alpha, seed * 1_000_003 + index, name))
    return adapted


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the trainable adapter parameters (for ``AttributionTask(parameters=...)``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and ("lora_a" in n or "lora_b" in n)]


def add_dropout(model: nn.Module, p: float = 0.1) -> nn.Module:
    """A copy of a Sequential with ``Dropout(p)`` after every activation (identical output in eval mode)."""
    if not isinstance(model, nn.Sequential):
        raise TDAError(f"add_dropout inserts layers into an nn.Sequential; got {type(model).__name__}")
    if not 0 < p < 1:
        raise TDAError(f"p must be in (0, 1), got {p}")
    layers = []
    for module in copy.deepcopy(model):
        layers.append(module)
        if isinstance(module, ACTIVATIONS):
            layers.append(nn.Dropout(p))
    if len(layers) == len(model):
        raise TDAError("add_dropout found no activation to follow with Dropout")
    return nn.Sequential(*layers)


def train_adapters(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
                   batch_size: int, seed: int, loss_fn) -> nn.Module:
    """Fine-tune ``model``'s trainable (adapter) parameters with Adam on the mean loss, in a seeded order."""
    check_positive_int(epochs, "epochs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TDAError("the model has no trainable parameters to fine-tune")
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(labels), generator=gen).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(inputs[rows]), labels[rows]).mean().backward()
            optimizer.step()
    return model.eval()
