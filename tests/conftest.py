"""Shared fixtures: tiny models and datasets built here (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tda_explorer.data import AttributionDataset


@pytest.fixture
def tiny_data() -> tuple[AttributionDataset, AttributionDataset]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = (x @ w).argmax(1)
    train = AttributionDataset(x[:20], y[:20], name="tiny-train")
    test = AttributionDataset(x[20:], y[20:], ids=[f"t{i}" for i in range(10)], name="tiny-test")
    return train, test


@pytest.fixture
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.fixture(scope="session")
def digits_experiment():
    """A small noisy digits experiment shared by the slower tests."""
    from tda_explorer.experiments import build_experiment

    return build_experiment("mlp", noise=0.1, n_train=300, n_test=60, epochs=20)
