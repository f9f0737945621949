"""A session's cache is keyed by everything a result depends on: checkpoints of the same count but other contents,
or another resource, never load a stale result."""

import copy

import torch

from tda_explorer import AttributionTask, get_method
from tda_explorer.compute.training.run_recorder import RunRecorder
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.session import Session


def _checkpoint(model, shift, step):
    state = {k: v + shift for k, v in copy.deepcopy(model.state_dict()).items()}
    return Checkpoint(state, learning_rate=0.1, step=step)


def test_checkpoints_of_the_same_count_but_other_contents_are_recomputed(tiny_data, tiny_mlp, tmp_path):
    train, test = tiny_data
    first = AttributionTask(tiny_mlp, checkpoints=[_checkpoint(tiny_mlp, 0.0, 5)])
    second = AttributionTask(tiny_mlp, checkpoints=[_checkpoint(tiny_mlp, 0.3, 5)])
    a = Session(train, test, first, folder=tmp_path).compute("tracin")
    reopened = Session(train, test, second, folder=tmp_path)
    assert not reopened.is_cached("tracin")
    b = reopened.compute("tracin")
    torch.testing.assert_close(b.scores, get_method("tracin", second).fit(train).attribute(test).scores)
    assert not torch.allclose(a.scores, b.scores)
    assert Session(train, test, first, folder=tmp_path).is_cached("tracin")  # the first is still there


def _recording(train, lr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(train.inputs.shape[1], 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, train.n_classes)).to(train.inputs.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = RunRecorder(model, optimizer, train, batch_size=8)
    for start in range(0, len(train), 8):
        rows = torch.arange(start, min(start + 8, len(train)))
        optimizer.zero_grad()
        recorder.loss(model(recorder.inputs(rows)), rows).backward()
        recorder.step(rows)
    return recorder.finish(), model.eval()


def test_another_recording_under_the_same_resource_name_is_another_key(tiny_data, tmp_path):
    train, test = tiny_data
    results, (_, model) = [], _recording(train, 0.1)  # one attributed model: only the recording differs
    for lr in (0.1, 0.05):
        recording, _ = _recording(train, lr)
        session = Session(train, test, AttributionTask(model), folder=tmp_path,
                          resources={"recording": lambda r=recording: {"recording": r}})
        results.append(session.compute("tracin"))
        assert torch.equal(results[-1].scores, get_method("tracin", AttributionTask(model), recording=recording)
                           .fit(train).attribute(test).scores)
    same, _ = _recording(train, 0.1)  # an equal recording made again: the cache serves it
    again = Session(train, test, AttributionTask(model), folder=tmp_path,
                    resources={"recording": lambda: {"recording": same}})
    assert again.is_cached("tracin") and torch.equal(again.compute("tracin").scores, results[0].scores)
    assert not torch.allclose(results[0].scores, results[1].scores)
