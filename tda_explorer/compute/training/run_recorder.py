"""Recording any ``torch.optim`` training loop so it can be replayed exactly, with chosen examples removed or
re-weighted: the same-seed ground truth of "what would *this* run have done without these examples".

A run is recorded, not reconstructed:
- the initial parameters and buffers,
- the optimizer's class and per-group hyperparameters,
- every step's batch (training positions) and every group's learning rate at that step,
- the CPU random state before every step's forward pass (so Dropout masks replay).

A data loader's order, a scheduler's arithmetic and augmentation seeds are therefore never re-derived, and any
learning-rate schedule replays because the rates themselves are recorded. Use the recorder's weighted loss in the
loop, Σ wᵢ ℓᵢ / B with a fixed divisor B (all wᵢ = 1 while recording). Replay then runs the very same operations, so
a replay that removes nothing reproduces the recorded parameters bit for bit on the CPU. Removing i sets wᵢ = 0 and
keeps its batch slot, so every other example sees the same steps.

    recorder = RunRecorder(model, optimizer, train, batch_size=64)
    for rows in my_batches:                       # positions into ``train``
        optimizer.zero_grad()
        recorder.loss(model(train.inputs[rows]), rows).backward()
        recorder.step(rows)                       # records the batch and the learning rates, then steps
        scheduler.step()
    replayed = recorder.replay(removed=[[3, 17]])  # final parameters without examples 3 and 17

One recording serves every trajectory method (each derives what it needs by replaying it, and refuses by name
only what it cannot do with the run's optimizer):

- ``checkpoints(every=...)``: ``Checkpoint``s at chosen steps, with the optimizer's kind and (Adam/AdamW) moments
  (TracIn, SOURCE, ``AttributionTask(checkpoints=...)``), and LESS's Adam checkpoints
  (``compute.selection.less.recording_adam_checkpoints``);
- ``replay_steps(callback)``: every step's (step, positions, parameters, learning rate), the step callback
  ``StepRecorder`` (data value embedding) and ``InRunShapley`` take;
- synset leave-one-out and MAGIC read the recording itself (``recording=``);
- ``removal_effects(groups, test)``: the same-seed truth, the recorded run replayed without each group.

The training data may be an in-memory ``AttributionDataset`` or a lazy one (``AttributionDataset.from_torch``):
replays read each step's rows through ``batches``. Dict inputs go to the model as keyword arguments.

Refused, with what to do instead: CUDA runs without ``torch.use_deterministic_algorithms(True)``, closures
(L-BFGS), steps recorded out of order or after ``finish``, and a replay on data other than the recording's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.engine.task import Output, call_model, pick_output
from tda_explorer.data.batching import to_device
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

#: Checkpoints a recording gives by default: one per epoch, of a longer run this many evenly spaced epochs (each is a
#: replay to it and a pass of per-example gradients for TracIn / SOURCE: a 1,500-epoch run had given 1,500).
DEFAULT_CHECKPOINTS = 10


class RunRecorder:
    """Records one training run of ``model`` with ``optimizer`` on ``train`` for exact replay.

    Parameters
    ----------
    model : nn.Module
        The model as it is before the first step.
    optimizer : torch.optim.Optimizer
        Any optimizer whose ``step()`` needs no closure (SGD with momentum/Nesterov/weight decay, Adam, AdamW, …).
    train : AttributionDataset
        The data the batch positions refer to.
    batch_size : int
        The divisor B of every step's loss (the nominal batch size).
    loss_fn : callable (logits, targets) -> per-example loss
        Default cross-entropy (sequence targets supported).
    output : None, str, int or callable
        Where the logits are in the model's outputs, as ``AttributionTask``'s ``output`` (default: a tensor as it is,
        else a ``logits`` key or attribute, as a Hugging Face ``ModelOutput`` has, else a tuple's first element).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: AttributionDataset,
                 batch_size: int, loss_fn=cross_entropy, output: Output = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TDAError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if any(p.is_cuda for p in model.parameters()) and not torch.are_deterministic_algorithms_enabled():
            raise TDAError("a CUDA run is replayable only with deterministic kernels: call "
                           "torch.use_deterministic_algorithms(True) (and set CUBLAS_WORKSPACE_CONFIG=:4096:8) "
                           "before building the recorder")
        self.model, self.optimizer, self.train, self.loss_fn = model, optimizer, train, loss_fn
        self.output = output
        self.batch_size = check_positive_int(batch_size, "batch_size")
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for g in optimizer.param_groups for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise TDAError("optimizer: it holds parameters that are not the model's; build it on model.parameters()")
        self.groups = [{"params": [names[id(p)] for p in g["params"]],
                        **{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}}
                       for g in optimizer.param_groups]
        self.optimizer_class = type(optimizer)
        self.initial_state = copy.deepcopy(model.state_dict())
        self.data_fingerprint = train.fingerprint()
        self.training = model.training
        self.positions: list[torch.Tensor] = []
        self.learning_rates: list[list[float]] = []
        self.rng_states: list[torch.Tensor] = []  # before each step's forward: dropout replays exactly
        self.final_state: dict[str, torch.Tensor] | None = None
        self._checkpoint_cache: dict[tuple, list] = {}
        self._rng_before_forward: torch.Tensor | None = None
        self._hook = model.register_forward_pre_hook(self._remember_rng)

    def _remember_rng(self, module: nn.Module, args: tuple) -> None:
        self._rng_before_forward = torch.random.get_rng_state()

    # -- recording ----------------------------------------------------------------------------
    def loss(self, outputs: Any, positions: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The step's loss Σ wᵢ ℓᵢ / B for the examples at ``positions`` (weights 1 unless given), from the model's
        ``outputs`` as it returned them (their logits: ``output``)."""
        logits = pick_output(outputs, self.output)
        rows = torch.as_tensor(positions).cpu()
        targets = self.train.labels[rows].to(logits.device)
        per_example = self.loss_fn(logits, targets)
        w = torch.ones_like(per_example) if weights is None else weights.to(per_example)
        return (w * per_example).sum() / self.batch_size

    def step(self, positions: torch.Tensor) -> None:
        """Record this step's batch and learning rates, then take ``optimizer.step()``."""
        if self.final_state is not None:
            raise TDAError("this run is finished: steps after finish() cannot be replayed")
        rows = torch.as_tensor(positions).detach().cpu().clone()
        if rows.is_floating_point() or rows.dim() != 1 or len(rows) == 0 or rows.min() < 0 or \
                rows.max() >= len(self.train):
            raise TDAError(f"positions: each step's batch as integer positions 0..{len(self.train) - 1} into the "
                           "recorded training set (a data loader's order cannot be recovered afterwards: pass the "
                           "positions it drew)")
        if self._rng_before_forward is None:
            raise TDAError("no forward pass of the model before this step: run model(inputs) and recorder.loss(...) "
                           "before recorder.step(positions)")
        self.positions.append(rows)
        self.learning_rates.append([float(g["lr"]) for g in self.optimizer.param_groups])
        self.rng_states.append(self._rng_before_forward)
        self._rng_before_forward = None
        self.optimizer.step()

    def finish(self) -> RunRecorder:
        """Close the recording with the final parameters."""
        if not self.positions:
            raise TDAError("no step was recorded: call recorder.step(positions) for every optimizer step")
        self.final_state = copy.deepcopy(self.model.state_dict())
        self._hook.remove()
        return self

    # -- replay ---------------------------------------------------------------------------------
    def _weights(self, removed: Sequence[Sequence[Any]] | None, weights: torch.Tensor | None) -> torch.Tensor:
        n = len(self.train)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (n,):
                raise TDAError(f"weights must have one entry per training example ({n}), got {tuple(weights.shape)}")
            return weights
        w = torch.ones(n, dtype=torch.float64)
        if removed:
            for rows in self.train.group_positions([list(g) for g in removed], "removed"):
                w[rows] = 0
        return w

    def inputs(self, rows: torch.Tensor, device: torch.device | str | None = None) -> Any:
        """The recorded training set's inputs at ``rows`` (a tensor, or a dict of tensors), read through ``batches``
        when the data are lazy (``AttributionDataset.from_torch``)."""
        if self.train.in_memory:
            return to_device(self.train.inputs[rows], device)
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its seed from the global RNG: leave it as it was
            (_, inputs, _), = self.train.batches(batch_size=len(torch.as_tensor(rows)),
                                                 rows=torch.as_tensor(rows).tolist(), device=device)
        return inputs

    @property
    def n_steps(self) -> int:
        """The optimizer steps recorded."""
        return len(self.positions)

    @property
    def steps_per_epoch(self) -> int:
        """⌈n / B⌉: the steps of one pass over the recorded training set."""
        return -(-len(self.train) // min(self.batch_size, len(self.train)))

    @property
    def optimizer_kind(self) -> str:
        """The optimizer's kind, its class name in lower case ("sgd", "adam", "adamw", …)."""
        return self.optimizer_class.__name__.lower()

    def _check_finished(self) -> None:
        if self.final_state is None:
            raise TDAError("finish() the recording before replaying it")

    def _run(self, w: torch.Tensor, callback: Callable | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The recorded run replayed with per-example weights ``w``: the model and optimizer after its last step;
        ``callback(step, positions, model, optimizer)`` sees the state before each step."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.initial_state)
        params = dict(model.named_parameters())
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["params"]]}
                  for g in self.groups]
        optimizer = self.optimizer_class(groups)
        state = torch.random.get_rng_state()
        model.train(self.training)
        try:
            device = next(model.parameters()).device
            for step, (rows, rates, rng) in enumerate(zip(self.positions, self.learning_rates, self.rng_states)):
                check_cancelled()
                if callback is not None:
                    callback(step, rows, model, optimizer)
                for group, lr in zip(optimizer.param_groups, rates):
                    group["lr"] = lr
                optimizer.zero_grad()
                inputs = self.inputs(rows, device)
                torch.random.set_rng_state(rng)  # after reading the rows: the forward draws what it drew recorded
                outputs = call_model(model, inputs)
                self.loss(outputs, rows, w[rows].to(device)).backward()
                optimizer.step()
        finally:
            torch.random.set_rng_state(state)
        return model, optimizer

    def replay(self, removed: Sequence[Sequence[Any]] | None = None, weights: torch.Tensor | None = None,
               train: AttributionDataset | None = None, callback: Callable | None = None) -> dict[str, torch.Tensor]:
        """Final parameters of the recorded run retrained with the ids in ``removed`` (groups, all removed
        together) dropped, or with per-example ``weights``; nothing given: the run itself.
        ``callback(step, positions, model, optimizer)`` sees the state before each step."""
        self._check_finished()
        if train is not None and train.fingerprint() != self.data_fingerprint:
            raise TDAError("train: this is not the data the run was recorded on; replay needs the same examples")
        model, _ = self._run(self._weights(removed, weights), callback)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # -- what the trajectory methods derive from the recording -------------------------------------
    def checkpoint_steps(self, every: int | None = None, at: Sequence[int] | None = None) -> list[int]:
        """The step counts checkpoints are taken at: ``at`` as given, or every ``every`` steps, always ending with the
        last step; by default the end of each epoch (``steps_per_epoch``), at most ``DEFAULT_CHECKPOINTS`` of them:
        of a longer run, that many evenly spaced epochs (as ``train_model`` takes ``n_checkpoints``)."""
        self._check_finished()
        if at is not None:
            steps = sorted({int(s) for s in at})
            if not steps or steps[0] < 0 or steps[-1] > self.n_steps:
                raise TDAError(f"at: step counts in 0..{self.n_steps} (the steps recorded), got {list(at)}")
            return steps
        if every is None:
            epochs = -(-self.n_steps // self.steps_per_epoch)
            shown = min(epochs, DEFAULT_CHECKPOINTS)
            ends = {round(epochs * (i + 1) / shown) * self.steps_per_epoch for i in range(shown)}
            return sorted({min(step, self.n_steps) for step in ends} | {self.n_steps})
        every = check_positive_int(every, "every")
        return sorted({*range(every, self.n_steps, every), self.n_steps})

    def checkpoints(self, every: int | None = None, at: Sequence[int] | None = None, full_state: bool = True
                    ) -> list:
        """``Checkpoint``s of the recorded run, materialised by replaying it: after every ``every`` steps (default
        each epoch's end, at most ``DEFAULT_CHECKPOINTS`` evenly spaced ones: ``checkpoint_steps``) and at the end, or
        after the step counts in ``at``. Each holds the model's
        state (``full_state``: its whole state dict, BatchNorm statistics included; else the trainable parameters),
        the mean learning rate of the steps since the previous checkpoint (the first parameter group's), its step
        count, the optimizer's kind and, for Adam/AdamW, its moments — what TracIn, SOURCE and
        ``AttributionTask(checkpoints=...)`` take. The same steps asked again are not replayed again."""
        from tda_explorer.compute.training.optimizer_state import capture_checkpoint

        steps = self.checkpoint_steps(every, at)
        key = (tuple(steps), full_state)
        cache = self._checkpoint_cache  # a finished recording never changes: each set of steps is replayed once
        if key in cache:
            return list(cache[key])
        wanted, taken = set(steps), []
        previous = [0]

        def take(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            rates = [r[0] for r in self.learning_rates[previous[0]:step]] or [self.learning_rates[min(
                step, self.n_steps - 1)][0]]
            taken.append(capture_checkpoint(model, optimizer, sum(rates) / len(rates), step,
                                            trainable_only=not full_state))
            previous[0] = step

        def before(step: int, rows: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            if step in wanted:
                take(step, model, optimizer)

        model, optimizer = self._run(self._weights(None, None), before)
        if self.n_steps in wanted:
            take(self.n_steps, model, optimizer)
        cache[key] = taken
        return list(taken)

    def replay_steps(self, callback: Callable[[int, torch.Tensor, dict[str, torch.Tensor], float], None]) -> None:
        """Replay the run calling ``callback(step, positions, parameters, lr)`` before each step (the parameters by
        name, the first group's learning rate): the step callback of ``StepRecorder`` and ``InRunShapley``."""
        self._check_finished()
        self._run(self._weights(None, None),
                  lambda step, rows, model, optimizer: callback(step, rows, dict(model.named_parameters()),
                                                                float(self.learning_rates[step][0])))

    def removal_effects(self, groups: Sequence[Sequence[Any]], test: AttributionDataset,
                        measurement: Callable | None = None) -> torch.Tensor:
        """The same-seed truth: ``[n_groups, n_test]`` change of each test measurement (default the recording's
        per-example loss) when the recorded run is replayed without each group of training ids (replayed minus
        recorded final model; positive: the group was a proponent)."""
        self._check_finished()
        measure = measurement or (lambda outputs, labels: self.loss_fn(pick_output(outputs, self.output), labels))
        model = copy.deepcopy(self.model)

        def values(state: dict[str, torch.Tensor]) -> torch.Tensor:
            model.load_state_dict(state)
            model.eval()
            device = next(model.parameters()).device
            out = []
            with torch.no_grad():
                for _, inputs, labels in test.batches(device=device):
                    out.append(measure(call_model(model, inputs), labels).detach().double().cpu())
            return torch.cat(out)

        base = values(self.final_state)
        rows = self.train.group_positions([list(g) for g in groups], "groups")
        out = []
        for positions in rows:
            w = torch.ones(len(self.train), dtype=torch.float64)
            w[positions] = 0
            out.append(values(self.replay(weights=w)) - base)
        return torch.stack(out)

    def fingerprint(self) -> str:
        """A hash of what was recorded: data, initial state, optimizer and hyperparameters, batches and rates."""
        import hashlib

        h = hashlib.sha256()
        h.update(self.data_fingerprint.encode())
        for name, value in sorted(self.initial_state.items()):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((self.optimizer_class.__name__, self.batch_size,
                       [{k: v for k, v in g.items() if k != "params"} for g in self.groups], self.learning_rates))
                 .encode())
        for rows in self.positions:
            h.update(rows.numpy().tobytes())
        return h.hexdigest()[:16]


def finished_recording(recording: Any, purpose: str) -> RunRecorder:
    """``recording`` when it is a finished ``RunRecorder``; else a ``TDAError`` saying what ``purpose`` needs and,
    for a record of checkpoints only (the Hugging Face ``RecordingCallback``), what that record does serve."""
    if not isinstance(recording, RunRecorder):
        got = type(recording).__name__
        if hasattr(recording, "checkpoints") and not hasattr(recording, "replay"):
            raise TDAError(f"recording: {purpose} replays the run step by step, and a {got} holds its checkpoints, "
                           "not a replayable run (a Trainer's clipping, accumulation and loss are not recorded): "
                           "record your own loop with RunRecorder, or give the checkpoints to the task "
                           "(AttributionTask(model, checkpoints=recorder.checkpoints)) for tracin, source and less")
        raise TDAError(f"recording must be a RunRecorder (your loop recorded for exact replay) for {purpose}, got "
                       f"{got}" + ("; a StepRecorder holds projected gradients, not the run's parameters"
                                   if got == "StepRecorder" else ""))
    if recording.final_state is None:
        raise TDAError(f"recording: finish() it before {purpose}")
    return recording

