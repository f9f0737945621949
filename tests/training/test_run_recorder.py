"""Recording any torch.optim loop and replaying it: bit for bit with nothing removed, and exactly the same-seed
retraining without chosen examples."""

from __future__ import annotations

import copy

import pytest
import torch

from tda_explorer import AttributionDataset
from tda_explorer.compute.training.run_recorder import RunRecorder
from tda_explorer.errors import TDAError


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    return AttributionDataset(x, (x[:, 0] - x[:, 2] > 0).long() + (x[:, 1] > 0.8).long())


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def _run(model, optimizer, scheduler, train, epochs=4, batch=8, recorder=None, weights=None):
    """A user's loop: its own shuffling (which consumes the global RNG), Dropout on, a schedule per epoch."""
    for _ in range(epochs):
        order = torch.randperm(len(train))
        for start in range(0, len(train), batch):
            rows = order[start : start + batch]
            optimizer.zero_grad()
            out = model(train.inputs[rows])
            if recorder is not None:
                recorder.loss(out, rows).backward()
                recorder.step(rows)
            else:
                w = torch.ones(len(rows)) if weights is None else weights[rows]
                (w * torch.nn.functional.cross_entropy(out, train.labels[rows], reduction="none")).sum().div(
                    batch).backward()
                optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.Adam([{"params": list(p)[:2], "lr": 1e-2}, {"params": list(p)[2:], "lr": 3e-3}]),
])
def test_replay_with_nothing_removed_is_bit_for_bit(make):
    train, model = _data(), _model()
    optimizer = make(list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    recorder = RunRecorder(model, optimizer, train, batch_size=8)
    torch.manual_seed(11)
    _run(model, optimizer, scheduler, train, recorder=recorder)
    recorder.finish()
    replayed = recorder.replay()
    for name, value in recorder.final_state.items():
        assert torch.equal(replayed[name], value), name
    assert len(set(recorder.learning_rates[i][0] for i in (0, 7, 14, 21))) == 4  # the schedule was recorded


def test_replay_without_examples_is_the_same_seed_retraining():
    train = _data()
    model, twin = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    recorder = RunRecorder(model, optimizer, train, batch_size=8)
    torch.manual_seed(5)
    _run(model, optimizer, scheduler, train, recorder=recorder)
    recorder.finish()
    removed = recorder.replay(removed=[[3, 17], [40]])
    # by hand: the same loop, the same seed, the three examples' terms zeroed in the steps they were in
    weights = torch.ones(len(train))
    weights[[3, 17, 40]] = 0
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(5)
    _run(twin, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), train, weights=weights)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(removed[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(removed["0.weight"], recorder.final_state["0.weight"])
    reweighted = torch.ones(len(train), dtype=torch.float64)
    reweighted[[3, 17, 40]] = 0
    assert all(torch.equal(recorder.replay(weights=reweighted)[k], removed[k]) for k in removed)


def test_recorder_refusals_say_what_to_do():
    train, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = RunRecorder(model, optimizer, train, batch_size=8)
    with pytest.raises(TDAError, match="no forward pass of the model before this step"):
        recorder.step(torch.arange(8))
    model(train.inputs[:8])
    with pytest.raises(TDAError, match="positions: each step's batch as integer positions 0..49"):
        recorder.step(torch.tensor([0.5, 1.5]))
    with pytest.raises(TDAError, match="finish\\(\\) the recording before replaying it"):
        recorder.replay()
    recorder.loss(model(train.inputs[:8]), torch.arange(8)).backward()
    recorder.step(torch.arange(8))
    recorder.finish()
    with pytest.raises(TDAError, match="not the data the run was recorded on"):
        recorder.replay(train=train.with_labels(torch.zeros(50, dtype=torch.long)))
    with pytest.raises(TDAError, match="weights must have one entry per training example \\(50\\)"):
        recorder.replay(weights=torch.ones(3))
    other = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1)
    with pytest.raises(TDAError, match="optimizer: it holds parameters that are not the model's"):
        RunRecorder(model, other, train, batch_size=8)


class _DictOutputs(torch.nn.Module):
    """A model returning a dict with its logits beside other outputs, as a Hugging Face ``ModelOutput`` does."""

    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x):
        hidden = self.net[:3](x)
        return {"hidden_states": hidden, "logits": self.net[3](hidden)}


def test_a_model_returning_its_logits_among_other_outputs_is_recorded_and_replayed():
    """The recorder reads the logits from the outputs as ``AttributionTask`` does: the loop passes the outputs as
    the model returns them, the replay is bit for bit, and the same-seed removal effects equal those of the bare
    network (its logits) replayed the same way."""
    train = _data()
    effects = []
    for make in (_DictOutputs, _model):
        model = make()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        recorder = RunRecorder(model, optimizer, train, batch_size=8)
        torch.manual_seed(7)
        _run(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9), train,
             epochs=2, recorder=recorder)
        recorder.finish()
        replayed = recorder.replay()
        assert all(torch.equal(replayed[k], v) for k, v in recorder.final_state.items())
        effects.append(recorder.removal_effects([[1, 2], [30]], train.subset(range(5))))
    torch.testing.assert_close(effects[0], effects[1])
    assert effects[0].abs().sum() > 0


def test_a_long_run_gives_at_most_the_default_number_of_checkpoints_evenly_spaced():
    """One checkpoint per epoch by default, but of a 25-epoch run 10 evenly spaced epoch ends (each is a replay and a
    pass of gradients for TracIn / SOURCE), ending with the last step; every= and at= as asked."""
    from tda_explorer.compute.training.run_recorder import DEFAULT_CHECKPOINTS

    train, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder = RunRecorder(model, optimizer, train, batch_size=25)
    for _ in range(25):  # 2 steps an epoch
        for rows in (torch.arange(0, 25), torch.arange(25, 50)):
            optimizer.zero_grad()
            recorder.loss(model(train.inputs[rows]), rows).backward()
            recorder.step(rows)
    recorder.finish()
    steps = recorder.checkpoint_steps()
    assert DEFAULT_CHECKPOINTS == 10 and len(steps) == 10 and steps[-1] == 50
    assert steps == [2 * round(25 * (i + 1) / 10) for i in range(10)]  # epoch ends 2, 5, 8, 10, …, 25
    assert recorder.checkpoint_steps(every=10) == [10, 20, 30, 40, 50]
    assert recorder.checkpoint_steps(at=[3]) == [3]
