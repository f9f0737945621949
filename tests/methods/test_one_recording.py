"""One recording of the user's own loop (``RunRecorder``) serves every trajectory method: each derives what it needs
by replaying it and equals the same method fed by hand (checkpoints captured in the loop, a step callback in the
loop, the equivalent built-in trajectory), and each refuses by name only what the run's optimizer rules out."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import TensorDataset

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.catalogue import method_spec
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.methods.synset import Trajectory
from tda_explorer.compute.selection.less import LESS, AdamCheckpoint
from tda_explorer.compute.selection.less import select as less_select
from tda_explorer.compute.training.optimizer_state import capture_checkpoint
from tda_explorer.compute.training.run_recorder import RunRecorder
from tda_explorer.compute.training.step_recorder import StepRecorder
from tda_explorer.compute.training.train import TrainConfig
from tda_explorer.compute.valuation.inrun_shapley import InRunShapley
from tda_explorer.errors import TDAError

pytestmark = pytest.mark.slow  # trains (small) models
N, BATCH, EPOCHS = 90, 15, 5


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + 30, 6, generator=gen)
    y = (x[:, 0] - x[:, 2] > 0).long() + (x[:, 1] > 0.5).long()
    return AttributionDataset(x[:N], y[:N], name="train"), AttributionDataset(x[N:], y[N:], name="test")


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2, weight_decay=1e-3),  # plain: every method reads it
    "momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


def _record(kind: str, train: AttributionDataset, schedule: bool = True, hand=None):
    """The user's loop wrapped by RunRecorder; ``hand(step, rows, model, optimizer, epoch_end)`` sees each step
    before it is taken (and each epoch's end) — what a user would have instrumented by hand."""
    model = _model()
    optimizer = OPTIMIZERS[kind](model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.6 if schedule else 1.0)
    recorder = RunRecorder(model, optimizer, train, batch_size=BATCH)
    torch.manual_seed(7)
    step = 0
    for _ in range(EPOCHS):
        order = torch.randperm(len(train))
        for start in range(0, len(train), BATCH):
            rows = order[start : start + BATCH]
            optimizer.zero_grad()
            recorder.loss(model(recorder.inputs(rows)), rows).backward()  # in memory or lazy alike
            if hand is not None:
                hand(step, rows, model, optimizer, False)
            recorder.step(rows)
            step += 1
        if hand is not None:
            hand(step, None, model, optimizer, True)
        scheduler.step()
    recorder.finish()
    model.eval()
    return recorder


def _captured(kind: str, train: AttributionDataset):
    """The recording and the checkpoints captured by hand in the loop at each epoch's end."""
    captured = []

    def hand(step, rows, model, optimizer, epoch_end):
        if epoch_end:
            captured.append(capture_checkpoint(model, optimizer, optimizer.param_groups[0]["lr"], step,
                                               trainable_only=False))

    return _record(kind, train, hand=hand), captured


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_tracin_from_the_recording_is_tracin_over_checkpoints_captured_in_the_loop(kind):
    train, test = _data()
    recording, captured = _captured(kind, train)
    derived = recording.checkpoints()
    assert [c.step for c in derived] == [c.step for c in captured] == [6 * (e + 1) for e in range(EPOCHS)]
    for mine, theirs in zip(derived, captured):
        assert mine.optimizer == theirs.optimizer == ("adam" if kind == "adam" else "sgd")
        assert mine.learning_rate == pytest.approx(theirs.learning_rate)
        assert all(torch.equal(mine.state_dict[k], theirs.state_dict[k]) for k in theirs.state_dict)
        if kind == "adam":
            assert all(torch.equal(mine.optimizer_state["exp_avg_sq"][k], theirs.optimizer_state["exp_avg_sq"][k])
                       for k in theirs.optimizer_state["exp_avg_sq"])
    task = AttributionTask(recording.model)
    from_recording = get_method("tracin", task, recording=recording).fit(train).attribute(test).scores
    by_hand = get_method("tracin", AttributionTask(recording.model, checkpoints=captured)).fit(train).attribute(test)
    torch.testing.assert_close(from_recording, by_hand.scores)
    every_two = get_method("tracin", task, recording=recording, checkpoint_every=2)
    assert len(every_two.checkpoints) == 15


def test_synset_loo_from_the_recording_is_synset_loo_from_the_equivalent_trajectory():
    """A plain-SGD loop at a constant rate is what the built-in recipe does: the recording's synset replays must
    match the recipe's, and both follow the recording's same-seed truth for cluster removals."""
    train, test = _data()
    recording = _record("sgd", train, schedule=False)
    options = {"within_cluster": None, "distill_steps": 60, "per_class": 4}
    task = AttributionTask(recording.model)
    mine = get_method("synset-loo", task, recording=recording, **options).fit(train)
    trajectory = Trajectory({k: v.clone() for k, v in recording.initial_state.items()},
                            TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=0.2, weight_decay=1e-3, optimizer="sgd"),
                            [c.state_dict for c in recording.checkpoints()])
    theirs = get_method("synset-loo", task, trajectory=trajectory, **options).fit(train)
    torch.testing.assert_close(mine.synset_.inputs, theirs.synset_.inputs)
    clusters = mine.synset_.cluster_of
    groups = [torch.nonzero(clusters == c).flatten().tolist() for c in range(int(clusters.max()) + 1)]
    groups = [g for g in groups if len(g) < N // 3]
    estimated = mine.estimate_removals(groups, test)
    torch.testing.assert_close(estimated, theirs.estimate_removals(groups, test), rtol=1e-3, atol=1e-5)
    truth = recording.removal_effects(groups, test)  # the same-seed truth: the recording replayed without each
    rho = spearmanr(estimated.mean(1).numpy(), truth.mean(1).numpy()).statistic
    assert rho > 0.6, rho


def test_synset_loo_follows_the_recorded_optimizer_and_reads_lazy_data():
    """Momentum, a schedule, and the training set as a torch Dataset read lazily: the recording replays exactly,
    and synset-loo's replays follow its optimizer (the same cluster removals rank like the same-seed truth)."""
    memory, test = _data()
    lazy = AttributionDataset.from_torch(TensorDataset(memory.inputs, memory.labels), name="train")
    model = _model()
    optimizer = OPTIMIZERS["momentum"](model.parameters())
    recording = RunRecorder(model, optimizer, lazy, batch_size=BATCH)
    loader = torch.utils.data.DataLoader(range(N), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    for _ in range(EPOCHS):
        for rows in loader:
            optimizer.zero_grad()
            recording.loss(model(recording.inputs(rows)), rows).backward()
            recording.step(rows)
    recording.finish()
    replayed = recording.replay()
    assert all(torch.equal(replayed[k], v) for k, v in recording.final_state.items())
    method = get_method("synset-loo", AttributionTask(model.eval()), recording=recording, within_cluster=None,
                        distill_steps=60, per_class=4).fit(lazy)
    clusters = method.synset_.cluster_of
    groups = [torch.nonzero(clusters == c).flatten().tolist() for c in range(int(clusters.max()) + 1)]
    groups = [g for g in groups if len(g) < N // 3]
    estimated, truth = method.estimate_removals(groups, test), recording.removal_effects(groups, test)
    assert spearmanr(estimated.mean(1).numpy(), truth.mean(1).numpy()).statistic > 0.5
    assert method.attribute(test).scores.shape == (len(test), N)
    # MAGIC differentiates the same lazy recording (its rows read once into memory)
    magic = get_method("magic", AttributionTask(model), recording=recording).fit(lazy).attribute(test).scores
    single = [[int(i)] for i in magic.abs().sum(0).argsort(descending=True)[:6]]
    truth = recording.removal_effects(single, test).mean(1)
    predicted = magic[:, [g[0] for g in single]].mean(0)
    assert (torch.sign(predicted) == torch.sign(truth.float())).float().mean() >= 5 / 6


def test_dvemb_and_inrun_shapley_from_the_recording_equal_their_step_callbacks_in_the_loop():
    train, test = _data()
    task = AttributionTask(_model().eval())
    steps = StepRecorder(task, train, BATCH, projection_dim=32)
    shapley = InRunShapley(task, train, test, batch_size=BATCH)

    def hand(step, rows, model, optimizer, epoch_end):
        if not epoch_end:
            params = dict(model.named_parameters())
            steps(step, rows, params, optimizer.param_groups[0]["lr"])
            shapley(step, rows, params, optimizer.param_groups[0]["lr"])

    recording = _record("sgd", train, hand=hand)
    steps.finish(recording.final_state)
    task = AttributionTask(recording.model)
    from_recording = get_method("dvemb", task, recording=recording, projection_dim=32).fit(train).attribute(test)
    by_hand = get_method("dvemb", task, recording=steps, weight_decay=1e-3).fit(train).attribute(test)
    torch.testing.assert_close(from_recording.scores, by_hand.scores)
    values = InRunShapley.from_recording(task, recording, test).values
    torch.testing.assert_close(values, shapley.values)


def test_a_lazy_training_set_records_and_serves_like_the_tensors():
    memory, test = _data()
    lazy = AttributionDataset.from_torch(TensorDataset(memory.inputs, memory.labels), name="train")
    in_memory, from_torch = _record("sgd", memory), _record("sgd", lazy)
    assert all(torch.equal(in_memory.final_state[k], v) for k, v in from_torch.final_state.items())
    task = AttributionTask(from_torch.model)
    torch.testing.assert_close(InRunShapley.from_recording(task, from_torch, test).values,
                               InRunShapley.from_recording(task, in_memory, test).values)
    torch.testing.assert_close(
        get_method("dvemb", task, recording=from_torch, projection_dim=16).fit(lazy).attribute(test).scores,
        get_method("dvemb", task, recording=in_memory, projection_dim=16).fit(memory).attribute(test).scores)
    lazy_test = AttributionDataset.from_torch(TensorDataset(test.inputs, test.labels), name="test")
    torch.testing.assert_close(  # magic's queries streamed too (it had read the lazy data's inputs and refused)
        get_method("magic", task, recording=from_torch).fit(lazy).attribute(lazy_test).scores,
        get_method("magic", task, recording=in_memory).fit(memory).attribute(test).scores)


def test_a_lazy_recording_with_dropout_replays_bit_for_bit():
    """Reading a lazy batch draws a DataLoader seed from the global RNG: neither the loop's randomness nor the
    replayed Dropout masks may move because of it."""
    memory, _ = _data()
    lazy = AttributionDataset.from_torch(TensorDataset(memory.inputs, memory.labels), name="train")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    recording = RunRecorder(model, optimizer, lazy, batch_size=BATCH)
    for rows in torch.randperm(N).split(BATCH) + torch.randperm(N).split(BATCH):
        optimizer.zero_grad()
        recording.loss(model(recording.inputs(rows)), rows).backward()
        recording.step(rows)
    recording.finish()
    replayed = recording.replay()
    assert all(torch.equal(replayed[k], v) for k, v in recording.final_state.items())


def test_source_from_the_recording_reads_its_momentum_and_checkpoints():
    train, test = _data()
    recording, captured = _captured("momentum", train)
    mine = get_method("source", AttributionTask(recording.model), recording=recording, segments=2)
    assert mine.momentum == pytest.approx(0.9) and mine.weight_decay == pytest.approx(1e-3)
    theirs = get_method("source", AttributionTask(recording.model, checkpoints=captured, weight_decay=1e-3),
                        momentum=0.9, segments=2)
    torch.testing.assert_close(mine.fit(train).attribute(test).scores, theirs.fit(train).attribute(test).scores)


def test_less_from_an_adam_recording_is_less_over_its_captured_checkpoints():
    train, test = _data()
    captured = []

    def hand(step, rows, model, optimizer, epoch_end):
        if epoch_end:
            captured.append(AdamCheckpoint.capture(model, optimizer, optimizer.param_groups[0]["lr"]))

    recording = _record("adam", train, hand=hand)
    target = test.subset(range(6))
    mine = less_select(recording.model, train, target, 0.2, recording=recording, projection_dim=None)
    by_hand = LESS(recording.model, captured, projection_dim=None).fit(train).select(target, 0.2)
    assert mine.train_id.tolist() == by_hand.train_id.tolist()
    torch.testing.assert_close(torch.tensor(mine.score.values), torch.tensor(by_hand.score.values))


def test_each_method_refuses_by_name_only_what_the_run_rules_out():
    train, test = _data()
    adam, momentum = _record("adam", train), _record("momentum", train)
    task = AttributionTask(adam.model)
    with pytest.raises(TDAError, match="magic differentiates SGD steps; this run used Adam"):
        get_method("magic", task, recording=adam)
    with pytest.raises(TDAError, match="dvemb follows plain SGD steps; this run used Adam"):
        get_method("dvemb", task, recording=adam)
    with pytest.raises(TDAError, match="dvemb follows plain SGD steps; this run used SGD with momentum.*magic"):
        get_method("dvemb", task, recording=momentum)
    with pytest.raises(TDAError, match="source unrolls SGD steps.*this run used Adam.*tracin"):
        get_method("source", task, recording=adam)
    with pytest.raises(TDAError, match="In-Run Data Shapley values SGD steps.*this run used Adam"):
        InRunShapley.from_recording(task, adam, test)
    with pytest.raises(TDAError, match="LESS forms Adam's update directions.*this run used SGD"):
        less_select(momentum.model, train, test, 0.2, recording=momentum)
    with pytest.raises(TDAError, match="recording must be a RunRecorder.*StepRecorder"):
        get_method("synset-loo", task, recording=StepRecorder(task, train, BATCH))
    # what each does take from the Adam run: TracIn its Adam directions, synset-loo its replays
    assert get_method("tracin", task, recording=adam).optimizers == ["adam"] * EPOCHS
    get_method("synset-loo", task, recording=adam, within_cluster=None)


def test_one_recording_resource_fills_every_trajectory_need():
    train, _ = _data()
    recording = _record("sgd", train, schedule=False)
    resources = {"recording": lambda: {"recording": recording}}
    for name in ("synset-loo", "magic", "tracin", "source", "dvemb"):
        spec = method_spec(name)
        assert spec.missing(resources) == [], name
        assert spec.fill({}, resources)["recording"] is recording, name
    assert "trajectory" not in method_spec("synset-loo").fill({}, resources)


def test_synset_loo_replays_batchnorm_on_batch_statistics_as_the_recorded_run_trained():
    """A BatchNorm network recorded in training mode: the synset replays normalise with batch statistics (the
    recorded running statistics belong to the recorded parameters, not to a replay from θ_0) and stay finite."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 6, 6, generator=gen)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long()
    train, test = AttributionDataset(x[:48], y[:48]), AttributionDataset(x[48:], y[48:])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recording = RunRecorder(model, optimizer, train, batch_size=12)
    for _ in range(4):
        for rows in torch.randperm(48).split(12):
            optimizer.zero_grad()
            recording.loss(model(train.inputs[rows]), rows).backward()
            recording.step(rows)
    recording.finish()
    assert recording.checkpoints()[-1].state_dict["1.running_mean"].abs().sum() > 0  # the statistics travel
    method = get_method("synset-loo", AttributionTask(model.eval()), recording=recording, within_cluster=None,
                        distill_steps=20, per_class=2).fit(train)
    effects = method.estimate_removals([[0, 1, 2], [10]], test)
    assert effects.shape == (2, len(test)) and torch.isfinite(effects).all()
    assert torch.isfinite(method.attribute(test).scores).all()


def test_a_session_given_the_recording_computes_with_it(tmp_path):
    from tda_explorer import Session

    train, test = _data()
    recording = _record("adam", train)
    session = Session(train, test, AttributionTask(recording.model), folder=tmp_path / "session",
                      resources={"recording": lambda: {"recording": recording}})
    session.compute("tracin")
    assert session.options["tracin"]["recording"] is recording
    direct = get_method("tracin", AttributionTask(recording.model), recording=recording).fit(train).attribute(test)
    torch.testing.assert_close(session.attribution("tracin").scores, direct.scores)
    with pytest.raises(TDAError, match="magic differentiates SGD steps; this run used Adam"):
        session.compute("magic")


def test_a_trainer_callback_s_checkpoints_serve_tracin_and_the_replaying_methods_say_what_instead():
    """The Hugging Face callback records checkpoints (with AdamW's moments), not a replayable run: given as
    ``recording=`` it feeds TracIn like the same checkpoints on the task; the methods that replay refuse it by name
    with the way out."""
    pytest.importorskip("transformers")
    from tda_explorer.integrations.huggingface import RecordingCallback

    train, test = _data()
    recording, captured = _captured("adam", train)
    callback = RecordingCallback()
    callback.checkpoints.extend(captured)  # what the callback takes at each epoch's end
    model = recording.model
    via_callback = get_method("tracin", AttributionTask(model), recording=callback).fit(train).attribute(test)
    via_task = get_method("tracin", AttributionTask(model, checkpoints=captured)).fit(train).attribute(test)
    torch.testing.assert_close(via_callback.scores, via_task.scores)
    for method in ("synset-loo", "magic", "source"):
        with pytest.raises(TDAError, match=r"replays the run step by step, and a RecordingCallback holds its "
                                           r"checkpoints.*RunRecorder.*tracin, source and less"):
            get_method(method, AttributionTask(model), recording=callback).fit(train)
