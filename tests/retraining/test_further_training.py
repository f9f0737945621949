"""Final-model-only truth by further training: one tiny full-batch step is Grad-Dot; refusals."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.errors import TDAError
from tda_explorer.retraining.further_training import further_training_cosine, further_training_truth


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return AttributionDataset(x, y), AttributionDataset(x[:6] + 0.1, y[:6]), AttributionTask(model)


@pytest.mark.parametrize("centre", [False, True])
def test_one_tiny_full_batch_step_is_grad_dot(tiny, centre):
    train, test, task = tiny
    ids = list(range(0, 40, 3))
    truth = further_training_truth(task, train, test, ids, epochs=1, lr=1e-4, batch_size=40, centre=centre)
    scores = get_method("grad-dot", task).fit(train).attribute(test).scores
    assert further_training_cosine(scores, train, truth) > 0.99
    assert truth.effects.shape == (6, len(ids))
    shuffled = scores[:, torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    assert further_training_cosine(shuffled, train, truth) < 0.8  # not a cosine that holds for anything


def test_further_training_refusals(tiny):
    train, test, task = tiny
    with pytest.raises(TDAError, match="ids: \\[99\\] not in dataset"):
        further_training_truth(task, train, test, [1, 99], epochs=1, lr=0.1)
    with pytest.raises(TDAError, match="epochs must be >= 1, got 0"):
        further_training_truth(task, train, test, [1], epochs=0, lr=0.1)


def test_the_session_curve_reaches_the_compare_panel(digits_experiment, tmp_path):
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("grad-dot")
    session.compute("tracin")
    curve = session.further_training_curve(epochs=(1, 3), n_examples=20, seeds=1)
    assert list(curve.columns) == ["method", "epochs", "cosine"] and len(curve) == 4
    assert curve.set_index(["method", "epochs"]).loc[("grad-dot", 1), "cosine"] > 0.9  # one short epoch ≈ Grad-Dot
    explorer = Explorer(session, k=3)
    traces = explorer.compare.curve.figure.data
    assert sorted(t.name for t in traces) == ["grad-dot", "tracin"] and list(traces[0].x) == [1, 3]
