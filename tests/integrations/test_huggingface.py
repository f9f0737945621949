"""RecordingCallback on real transformers.Trainer runs (models built from configs, nothing downloaded), checked
against hand replays of the same steps, and TracIn over what it records."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from tda_explorer import AttributionTask, TDAError  # noqa: E402
from tda_explorer.compute import TracIn  # noqa: E402
from tda_explorer.data import AttributionDataset  # noqa: E402
from tda_explorer.integrations.huggingface import RecordingCallback  # noqa: E402

SEQ, VOCAB = 8, 100


class TokenDataset(torch.utils.data.Dataset):
    """Generated token sequences: dicts of input_ids, attention_mask and labels."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(3, SEQ + 1, (n,), generator=gen)
        self.attention_mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        self.labels = (self.input_ids[:, 0] % 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def batch(self, rows: list[int]) -> dict:
        return {k: torch.stack([self[i][k] for i in rows]) for k in ("input_ids", "attention_mask", "labels")}


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def arguments(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2,
                   learning_rate=0.05, lr_scheduler_type="linear", max_grad_norm=0.0, report_to=[],
                   save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    options.update(overrides)
    return TrainingArguments(**options)


def linear_schedule(lr: float, total: int) -> list[float]:
    """The linear decay without warmup, by hand: step s (0-based) is taken with lr · (total − s) / total."""
    return [lr * (total - s) / total for s in range(total)]


def covers_once_per_epoch(recorder: RecordingCallback, n: int) -> None:
    for epoch in sorted(set(recorder.epochs)):
        seen = [i for e, rows in zip(recorder.epochs, recorder.batch_order) if e == epoch for i in rows]
        assert sorted(seen) == list(range(n)), f"epoch {epoch} did not see every example once"


def test_sgd_run_is_recorded_and_replays_by_hand(tmp_path):
    data, model = TokenDataset(24), tiny_bert()
    start = copy.deepcopy(model)
    recorder = RecordingCallback(every_n_steps=2)
    Trainer(model=model, args=arguments(tmp_path, optim="sgd"), train_dataset=data, callbacks=[recorder]).train()

    # 24 examples in batches of 8: 3 steps an epoch, 6 in all; every 2 steps and at each epoch's end
    assert recorder.steps == [1, 2, 3, 4, 5, 6] and recorder.epochs == [0, 0, 0, 1, 1, 1]
    assert [c.step for c in recorder.checkpoints] == [2, 3, 4, 6]
    assert recorder.optimizer == "sgd"
    assert all(c.optimizer == "sgd" and c.optimizer_state is None for c in recorder.checkpoints)
    assert recorder.learning_rates == pytest.approx(linear_schedule(0.05, 6), rel=1e-6)
    lrs = recorder.learning_rates
    want_ckpt_lrs = [sum(lrs[0:2]) / 2, lrs[2], lrs[3], sum(lrs[4:6]) / 2]
    assert [c.learning_rate for c in recorder.checkpoints] == pytest.approx(want_ckpt_lrs, rel=1e-9)
    assert all(len(rows) == 8 for rows in recorder.batch_order)
    covers_once_per_epoch(recorder, len(data))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(recorder.checkpoints[0].state_dict) == trainable
    assert all(t.device.type == "cpu" for t in recorder.checkpoints[0].state_dict.values())

    # replay: plain SGD on the recorded batches with the recorded learning rates reaches every checkpoint
    replay = start.train()
    states = {}
    for step, (rows, lr) in enumerate(zip(recorder.batch_order, lrs), start=1):
        replay.zero_grad()
        replay(**data.batch(rows)).loss.backward()
        with torch.no_grad():
            for p in replay.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        states[step] = {n: p.detach().clone() for n, p in replay.named_parameters()}
    for checkpoint in recorder.checkpoints:
        for name, value in checkpoint.state_dict.items():
            torch.testing.assert_close(value, states[checkpoint.step][name], rtol=1e-4, atol=1e-6)


def test_adamw_run_records_the_optimizer_state(tmp_path):
    data, model = TokenDataset(24), tiny_bert()
    start = copy.deepcopy(model)
    recorder = RecordingCallback()  # the default: at each epoch's end
    trainer = Trainer(model=model, args=arguments(tmp_path, optim="adamw_torch", learning_rate=0.01),
                      train_dataset=data, callbacks=[recorder])
    trainer.train()

    assert [c.step for c in recorder.checkpoints] == [3, 6]
    assert recorder.optimizer == "adamw" and all(c.optimizer == "adamw" for c in recorder.checkpoints)
    assert recorder.learning_rates == pytest.approx(linear_schedule(0.01, 6), rel=1e-6)
    covers_once_per_epoch(recorder, len(data))

    # the last checkpoint's moments are the optimizer's own, matched by parameter identity
    final = recorder.checkpoints[-1].optimizer_state
    named = dict(model.named_parameters())
    assert set(final["exp_avg"]) == set(named)
    for name, p in named.items():
        held = trainer.optimizer.state[p]
        torch.testing.assert_close(final["exp_avg"][name], held["exp_avg"])
        torch.testing.assert_close(final["exp_avg_sq"][name], held["exp_avg_sq"])
    assert final["step"] == 6 and final["betas"] == (0.9, 0.999) and final["eps"] == 1e-8

    # every checkpoint's moments, parameters and step equal a hand replay of AdamW on the recorded batches
    replay = start.train()
    optimizer = torch.optim.AdamW(replay.parameters(), lr=0.01, weight_decay=0.0)
    by_step = {c.step: c for c in recorder.checkpoints}
    for step, (rows, lr) in enumerate(zip(recorder.batch_order, recorder.learning_rates), start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        replay(**data.batch(rows)).loss.backward()
        optimizer.step()
        if step in by_step:
            checkpoint = by_step[step]
            assert checkpoint.optimizer_state["step"] == step
            for name, p in replay.named_parameters():
                torch.testing.assert_close(checkpoint.state_dict[name], p.detach(), rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(checkpoint.optimizer_state["exp_avg"][name],
                                           optimizer.state[p]["exp_avg"], rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(checkpoint.optimizer_state["exp_avg_sq"][name],
                                           optimizer.state[p]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert by_step.keys() == {3, 6}


def test_gradient_accumulation_and_evaluation_on_the_same_dataset(tmp_path):
    data, model = TokenDataset(20), tiny_bert()
    recorder = RecordingCallback(every_n_steps=1, at_start=True)
    args = arguments(tmp_path, optim="adamw_torch", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[recorder]).train()

    # 5 micro-batches of 4 an epoch, 2 per step: steps of 8, 8 and 4 examples
    assert [len(rows) for rows in recorder.batch_order] == [8, 8, 4] * 2
    covers_once_per_epoch(recorder, len(data))
    assert "__getitems__" not in vars(data)  # the hook is gone after training
    first = recorder.checkpoints[0]
    assert first.step == 0 and first.optimizer_state["step"] == 0
    assert all(float(m.abs().sum()) == 0 for m in first.optimizer_state["exp_avg"].values())
    assert [c.step for c in recorder.checkpoints] == list(range(7))


def test_worker_processes_give_no_batch_order_but_checkpoints(tmp_path):
    data, model = TokenDataset(16), tiny_bert()
    recorder = RecordingCallback()
    args = arguments(tmp_path, optim="sgd", num_train_epochs=1, dataloader_num_workers=1)
    with pytest.warns(UserWarning, match="worker processes"):
        Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder]).train()
    assert recorder.batch_order is None and [c.step for c in recorder.checkpoints] == [2]


class LogitsOrLoss(nn.Module):
    """A tensor-input classifier Trainer can train (a dict with the loss when given labels) and TracIn can read
    (the logits tensor when not)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.net(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def test_tracin_over_a_recorded_adamw_run_uses_the_adam_direction(tmp_path):
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(18, 4, generator=gen), torch.randint(0, 3, (18,), generator=gen)
    model = LogitsOrLoss()
    recorder = RecordingCallback(every_n_steps=2, at_epoch_end=False)
    args = arguments(tmp_path, optim="adamw_torch", learning_rate=0.02, per_device_train_batch_size=6,
                     num_train_epochs=1)
    Trainer(model=model, args=args, train_dataset=PairDataset(x[:12], y[:12]), callbacks=[recorder]).train()
    assert [c.step for c in recorder.checkpoints] == [2]
    train, test = AttributionDataset(x[:12], y[:12]), AttributionDataset(x[12:], y[12:])
    task = AttributionTask(model, checkpoints=recorder.checkpoints)
    method = TracIn(task).fit(train)
    got = method.attribute(test).scores.double()
    assert "adam-preconditioned" in method.config()["training_direction"]

    # by hand: torch's AdamW holding the recorded moments takes one step on z alone; Γ(z) is that step per unit lr
    checkpoint = recorder.checkpoints[0]
    probe = LogitsOrLoss()
    probe.load_state_dict(checkpoint.state_dict)

    def gradient(xi, yi):
        probe.zero_grad()
        nn.functional.cross_entropy(probe(xi[None]), yi[None]).backward()
        return [p.grad.clone() for p in probe.parameters()]

    directions = []
    for i in range(len(train)):
        params = [p.detach().clone().requires_grad_() for p in probe.parameters()]
        step = torch.optim.Adam(params, lr=1.0, betas=checkpoint.optimizer_state["betas"],
                                eps=checkpoint.optimizer_state["eps"])
        for (name, _), p, g in zip(probe.named_parameters(), params, gradient(x[i], y[i])):
            step.state[p] = {"step": torch.tensor(float(checkpoint.optimizer_state["step"])),
                             "exp_avg": checkpoint.optimizer_state["exp_avg"][name].clone(),
                             "exp_avg_sq": checkpoint.optimizer_state["exp_avg_sq"][name].clone()}
            p.grad = g
        before = torch.cat([p.detach().flatten() for p in params])
        step.step()
        directions.append(before - torch.cat([p.detach().flatten() for p in params]))
    tests = torch.stack([torch.cat([g.flatten() for g in gradient(x[12 + j], y[12 + j])]) for j in range(len(test))])
    want = checkpoint.learning_rate * tests.double() @ torch.stack(directions).double().T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    stripped = [copy.copy(c) for c in recorder.checkpoints]
    stripped[0].optimizer_state = None
    with pytest.raises(TDAError, match="RecordingCallback"):
        TracIn(AttributionTask(model, checkpoints=stripped))


def test_bad_arguments_are_refused():
    with pytest.raises(TDAError, match="every_n_steps"):
        RecordingCallback(every_n_steps=0)
    with pytest.raises(TDAError, match="records no checkpoint"):
        RecordingCallback(at_epoch_end=False)
    with pytest.raises(TDAError, match="full_state"):
        RecordingCallback(full_state="yes")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_tda_explorer_does_not_import_transformers():
    done = _run("import sys, tda_explorer, tda_explorer.compute, tda_explorer.integrations, tda_explorer.session\n"
                "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["transformers", "accelerate"])
def test_a_missing_package_is_named_with_what_to_install(missing):
    done = _run(f"import sys\nsys.modules[{missing!r}] = None\n"
                "from tda_explorer import TDAError\n"
                "try:\n    import tda_explorer.integrations.huggingface\nexcept TDAError as err:\n    print(err)\n")
    assert done.returncode == 0, done.stderr
    assert "pip install 'tda_explorer[hf]'" in done.stdout and missing in done.stdout


def test_the_curvature_solvers_run_on_the_default_sdpa_attention():
    """A config-built BERT takes fused ("sdpa") attention by default, which has no forward-mode derivative: the
    curvature products run it in its composite form, so if-cg's default (its damping's largest eigenvalue included)
    runs, and its scores equal those of the same weights under eager attention."""
    from tda_explorer import get_method

    data = TokenDataset(24)
    train = AttributionDataset.from_torch(data, name="train")
    test = AttributionDataset.from_torch(TokenDataset(4, seed=1), name="test")
    fused = tiny_bert().eval()
    assert fused.config._attn_implementation == "sdpa"
    config = copy.deepcopy(fused.config)
    config._attn_implementation = "eager"
    eager = BertForSequenceClassification(config).eval()
    eager.load_state_dict(fused.state_dict())
    scores = [get_method("if-cg", AttributionTask(model)).fit(train).attribute(test).scores for model in (fused, eager)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-3, atol=1e-6)
