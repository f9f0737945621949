"""Small reference models for the built-in tasks (any torch model works with the engine)."""

from __future__ import annotations

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice

MODEL_KINDS = ("lr", "mlp", "mlp-gelu", "mlp-dropout", "cnn")


def make_model(kind: str, n_features: int, n_classes: int, hidden: int = 128, seed: int = 0) -> nn.Module:
    """A freshly initialised model: ``lr`` (linear), ``mlp`` (ReLU), ``mlp-gelu``, ``mlp-dropout`` (the ReLU MLP with
    ``Dropout(0.1)`` before its last layer, trained with it: the dropout-ensemble recipe's model) or ``cnn``; seeded.

    ``cnn`` takes square single-channel images flattened to ``n_features`` pixels (side divisible by 4):
    two 3×3 convolutions (8 and 16 channels) with ReLU and 2×2 max-pooling, then a linear layer.
    """
    check_choice(kind, "model", MODEL_KINDS)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "lr":
            model: nn.Module = nn.Sequential(nn.Linear(n_features, n_classes))
        elif kind == "cnn":
            side = int(round(n_features**0.5))
            if side * side != n_features or side % 4:
                raise TDAError(f"cnn needs square images with a side divisible by 4, got {n_features} features")
            model = nn.Sequential(
                nn.Unflatten(1, (1, side, side)),
                nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(16 * (side // 4) ** 2, n_classes),
            )
        elif kind == "mlp-dropout":
            model = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(hidden, n_classes))
        else:
            act = nn.ReLU() if kind == "mlp" else nn.GELU()
            model = nn.Sequential(nn.Linear(n_features, hidden), act, nn.Linear(hidden, n_classes))
    finally:
        torch.random.set_rng_state(gen_state)
    return model
