"""What-if for your own model: Session(..., retrain=fn) retrains with the user's function, paired over seeds, with
the seed noise beside the effect, progress and cancel in the panel, and clear errors for a bad function."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer._validation import TDAError
from tda_explorer.jobs import BackgroundJob
from tda_explorer.retraining.own import FunctionRetrainer
from tda_explorer.session import Session


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=gen)
    y = (x[:, 0] + 0.3 * torch.randn(60, generator=gen) > 0).long()
    return (AttributionDataset(x[:40], y[:40], ids=[f"tr{i}" for i in range(40)], name="own-train"),
            AttributionDataset(x[40:], y[40:], ids=[f"te{i}" for i in range(20)], name="own-test"))


def _trainer(train: AttributionDataset, calls: list | None = None):
    """The user's own loop: a seeded logistic regression trained with SGD on the ids it is given."""
    def retrain(train_ids: list, seed: int) -> nn.Module:
        if calls is not None:
            calls.append((len(train_ids), seed))
        torch.manual_seed(seed)
        model = nn.Linear(4, 2)
        rows = torch.tensor(train.positions(train_ids))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train.inputs[rows]), train.labels[rows]).backward()
            opt.step()
        return model
    return retrain


def test_what_if_removed_equals_retraining_by_hand_paired_over_seeds(tmp_path):
    train, test = _data()
    retrain = _trainer(train)
    session = Session(train, test, AttributionTask(retrain(list(train.ids), 0)), tmp_path, retrain=retrain,
                      retrain_seeds=(3, 4))
    removed = ["tr1", "tr5", "tr9"]
    effect = session.what_if_removed(removed)
    by_hand = []
    for seed in (3, 4):
        full, without = retrain(list(train.ids), seed), retrain([i for i in train.ids if i not in removed], seed)
        loss = lambda m: nn.functional.cross_entropy(m(test.inputs), test.labels, reduction="none").double()
        by_hand.append(loss(without).detach() - loss(full).detach())
    expected = torch.stack(by_hand).mean(0)
    assert torch.allclose(effect.delta[0], expected, atol=1e-6)
    per_seed = torch.stack(by_hand).mean(1)
    summary = effect.summary(0)
    assert summary["loss_delta"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert summary["loss_delta_seed_std"] == pytest.approx(float(per_seed.std()), abs=1e-6)
    assert effect.seeds == [3, 4]


def test_full_models_are_trained_once_per_seed_and_reused(tmp_path):
    train, test = _data()
    calls: list = []
    retrainer = FunctionRetrainer(_trainer(train, calls), train, test, AttributionTask(nn.Linear(4, 2)), seeds=(0, 1))
    retrainer.remove([["tr0"]])
    retrainer.remove([["tr2"], ["tr3", "tr4"]])
    assert sorted(calls).count((40, 0)) == 1 and sorted(calls).count((40, 1)) == 1
    assert len(calls) == 2 + 2 * 1 + 2 * 2


def test_a_bad_retrain_function_is_named(tmp_path):
    train, test = _data()
    task = AttributionTask(nn.Linear(4, 2))
    other = Session(train, test, task, tmp_path / "a", retrain=lambda ids, seed: nn.Linear(4, 3))
    with pytest.raises(TDAError, match=r"retrain returned another architecture .*\['bias', 'weight'\]"):
        other.what_if_removed(["tr0"])
    failing = Session(train, test, task, tmp_path / "b", retrain=lambda ids, seed: 1 / 0)
    with pytest.raises(TDAError, match="retrain failed for seed 0 on 40 training examples: ZeroDivisionError"):
        failing.what_if_removed(["tr0"])
    with pytest.raises(TDAError, match="retrain must return an nn.Module"):
        Session(train, test, task, tmp_path / "c", retrain=lambda ids, seed: "model").what_if_removed(["tr0"])
    with pytest.raises(TDAError, match="seeds must be at least two distinct seeds"):
        Session(train, test, task, tmp_path / "d", retrain=_trainer(train), retrain_seeds=(0,))
    with pytest.raises(TDAError, match="retrain must be a function"):
        Session(train, test, task, tmp_path / "e", retrain="train.py")
    with pytest.raises(TDAError, match=r"groups\[0\]"):
        Session(train, test, task, tmp_path / "f", retrain=_trainer(train)).what_if_removed(["nope"])


def test_progress_is_reported_and_cancel_stops_between_models(tmp_path):
    train, test = _data()
    gate, seen = threading.Event(), []
    slow = _trainer(train)

    def retrain(ids, seed):
        gate.wait(5)
        return slow(ids, seed)

    session = Session(train, test, AttributionTask(nn.Linear(4, 2)), tmp_path, retrain=retrain)
    job = BackgroundJob([("retraining", lambda _: session.what_if_removed(["tr0"]))],
                        on_update=lambda j: seen.append((j.progress, j.label))).start()
    gate.set()
    job.join(30)
    assert job.state == "done"
    fractions = [p for p, label in seen if label.startswith("retrained")]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and len(fractions) == 4
    gate.clear()
    retrainer = session.retrainer
    retrainer._full.clear()
    job = BackgroundJob([("retraining", lambda _: session.what_if_removed(["tr1"]))]).start()
    job.cancel()
    gate.set()
    job.join(30)
    assert job.state == "cancelled"


def test_the_mislabel_panel_shows_the_effect_with_its_seed_noise(tmp_path):
    from tda_explorer.widgets import Explorer

    train, test = _data()
    retrain = _trainer(train)
    session = Session(train, test, AttributionTask(retrain(list(train.ids), 0)), tmp_path, retrain=retrain)
    session.compute("grad-dot")
    explorer = Explorer(session)
    session.flags.flag("tr3")
    job = explorer.mislabels.run_what_if()
    job.join(60)
    text = explorer.mislabels.what_if.value
    assert "removing 1 flagged examples" in text and "across seeds" in text
    assert explorer.mislabels.what_if_cancel.disabled and not explorer.mislabels.what_if_button.disabled
