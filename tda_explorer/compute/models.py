"""Small reference models for the built-in tasks (any torch model works with the engine)."""

from __future__ import annotations

import torch
from torch import nn

from tda_explorer._validation import check_choice

MODEL_KINDS = ("lr", "mlp", "mlp-gelu")


def make_model(kind: str, n_features: int, n_classes: int, hidden: int = 128, seed: int = 0) -> nn.Module:
    """A freshly initialised model: ``lr`` (linear), ``mlp`` (ReLU) or ``mlp-gelu``; seeded."""
    check_choice(kind, "model", MODEL_KINDS)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "lr":
            model: nn.Module = nn.Sequential(nn.Linear(n_features, n_classes))
        else:
            act = nn.ReLU() if kind == "mlp" else nn.GELU()
            model = nn.Sequential(nn.Linear(n_features, hidden), act, nn.Linear(hidden, n_classes))
    finally:
        torch.random.set_rng_state(gen_state)
    return model
