"""Latency of the explorer at scale: precomputed scores for many training examples, timed selections."""

from __future__ import annotations

import statistics
import tempfile
import time

import torch


def live_widgets() -> int:
    """How many ipywidgets exist right now (models the front end has to hold)."""
    from ipywidgets.widgets import widget

    return len(widget._instances)


def bench_explorer(n_train: int = 50_000, n_test: int = 200, n_selections: int = 30, seed: int = 0) -> dict:
    """Build an explorer over ``n_train`` training examples with two precomputed methods, then time how
    long selecting a test point takes to update every panel's state (median over ``n_selections``)."""
    from sklearn.datasets import load_digits

    from tda_explorer.compute import Attribution, AttributionTask, make_model
    from tda_explorer.data import AttributionDataset, ImageRenderer
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    gen = torch.Generator().manual_seed(seed)
    digits = load_digits()
    base = torch.tensor(digits.data, dtype=torch.float32) / 16
    labels = torch.tensor(digits.target)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(base), (n,), generator=gen)
        return (base[idx] + 0.05 * torch.randn(n, 64, generator=gen)).clamp(0, 1), labels[idx]

    names, renderer = [str(c) for c in range(10)], ImageRenderer((8, 8))
    train = AttributionDataset(*sample(n_train), class_names=names, renderer=renderer, name="bench-train")
    test = AttributionDataset(*sample(n_test), class_names=names, renderer=renderer, name="bench-test")
    before = live_widgets()
    t0 = time.perf_counter()
    session = Session(train, test, AttributionTask(make_model("mlp", 64, 10)), folder=tempfile.mkdtemp())
    for method in ("method-a", "method-b"):
        scores = torch.randn(n_test, n_train, generator=gen)
        session.add(Attribution(scores, test.ids, train.ids, method), scores.abs().mean(0))
    explorer = Explorer(session, k=10)
    build_seconds = time.perf_counter() - t0
    timings = []
    for i in range(n_selections):
        test_id = test.ids[(7 * i + 1) % n_test]
        t1 = time.perf_counter()
        explorer.state.test_id = test_id
        timings.append((time.perf_counter() - t1) * 1000)
    assert explorer.browser.shown_ids() == session.attribution(explorer.state.method).topk(test_id, 10)[0]
    return {
        "n_train": n_train, "n_test": n_test, "selections": n_selections,
        "selection_ms": statistics.median(timings), "selection_ms_max": max(timings),
        "widgets_alive": live_widgets() - before, "build_seconds": build_seconds,
    }
