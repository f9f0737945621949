"""benchmarks/peer_less.py: dattri-llm's LESS (frozen checkpoints, exact gradients) equals ours on the same
warmup checkpoints and Adam states (optional peer; skipped without dattri-llm)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from tda_explorer.compute.selection.less import WarmupConfig, warmup
from tda_explorer.data import AttributionDataset

pytest.importorskip("dattri_llm")


def _peer_less():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_less.py"
    spec = importlib.util.spec_from_file_location("peer_less", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dattri_llm_less_matches_ours_exactly():
    peer_less = _peer_less()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=gen)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(1)
    pool, target = AttributionDataset(x[:40], y[:40], name="pool"), AttributionDataset(x[40:], y[40:], name="target")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    warmed, checkpoints, _ = warmup(model, pool, WarmupConfig(fraction=0.5, epochs=2, batch_size=8))
    ours = peer_less.our_less_scores(warmed, checkpoints, pool, target, projection_dim=None)
    peer, states, optimizers, lrs = peer_less.from_adam_checkpoints(warmed, checkpoints)
    # batch 16 over a pool of 40: the summed loss makes the features independent of the batching
    theirs = peer_less.dattri_llm_less_scores(peer, states, optimizers, lrs, pool, target, batch_size=16)
    assert ours.shape == theirs.shape == (len(target), len(pool))
    torch.testing.assert_close(theirs / sum(lrs), ours, atol=1e-5, rtol=1e-4)
