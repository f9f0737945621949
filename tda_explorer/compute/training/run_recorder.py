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
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled


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
    loss_fn : callable (outputs, targets) -> per-example loss
        Default cross-entropy (sequence targets supported).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: AttributionDataset,
                 batch_size: int, loss_fn=cross_entropy):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TDAError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if any(p.is_cuda for p in model.parameters()) and not torch.are_deterministic_algorithms_enabled():
            raise TDAError("a CUDA run is replayable only with deterministic kernels: call "
                           "torch.use_deterministic_algorithms(True) (and set CUBLAS_WORKSPACE_CONFIG=:4096:8) "
                           "before building the recorder")
        self.model, self.optimizer, self.train, self.loss_fn = model, optimizer, train, loss_fn
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
        self._rng_before_forward: torch.Tensor | None = None
        self._hook = model.register_forward_pre_hook(self._remember_rng)

    def _remember_rng(self, module: nn.Module, args: tuple) -> None:
        self._rng_before_forward = torch.random.get_rng_state()

    # -- recording ----------------------------------------------------------------------------
    def loss(self, outputs: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The step's loss Σ wᵢ ℓᵢ / B for the examples at ``positions`` (weights 1 unless given)."""
        rows = torch.as_tensor(positions).cpu()
        targets = self.train.labels[rows].to(outputs.device)
        per_example = self.loss_fn(outputs, targets)
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

    def replay(self, removed: Sequence[Sequence[Any]] | None = None, weights: torch.Tensor | None = None,
               train: AttributionDataset | None = None, callback: Callable | None = None) -> dict[str, torch.Tensor]:
        """Final parameters of the recorded run retrained with the ids in ``removed`` (groups, all removed
        together) dropped, or with per-example ``weights``; nothing given: the run itself.
        ``callback(step, positions, model, optimizer)`` sees the state before each step."""
        if self.final_state is None:
            raise TDAError("finish() the recording before replaying it")
        if train is not None and train.fingerprint() != self.data_fingerprint:
            raise TDAError("train: this is not the data the run was recorded on; replay needs the same examples")
        w = self._weights(removed, weights)
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
                torch.random.set_rng_state(rng)
                outputs = model(self.train.inputs[rows].to(device))
                self.loss(outputs, rows, w[rows].to(device)).backward()
                optimizer.step()
        finally:
            torch.random.set_rng_state(state)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
