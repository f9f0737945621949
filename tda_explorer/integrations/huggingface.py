"""Recording a ``transformers.Trainer`` run for attribution: ``RecordingCallback``.

    from tda_explorer.integrations.huggingface import RecordingCallback
    recorder = RecordingCallback()                       # a checkpoint at every epoch's end
    Trainer(model, args, train_dataset=train, callbacks=[recorder]).train()
    task = AttributionTask(model, checkpoints=recorder.checkpoints)   # TracIn knows it was AdamW

What it records, on the CPU:

- ``checkpoints``: ``Checkpoint``s of the model's trainable parameters (``full_state=True``: its whole state dict)
  every ``every_n_steps`` optimizer steps and/or at each epoch's end (and at the start with ``at_start=True``), each
  with the optimizer's kind ("sgd", "adam", "adamw", …, from its class) and, for Adam/AdamW, its moments by parameter
  name (``optimizer_state``); a checkpoint's learning rate is the mean of the steps' since the previous one (the
  interval it stands for; the current one for a checkpoint before any step).
- ``steps``, ``epochs``, ``learning_rates``: each optimizer step's global number, epoch, and the learning rate it was
  taken with (the first parameter group's, read before the step).
- ``batch_order``: for each step, the positions in the training dataset that it consumed (all its gradient
  accumulation micro-batches, in order).

How the batch order is read: for the run the callback gives the training ``DataLoader``'s dataset an instance-level
``__getitems__`` (removed when training ends), which torch's ``DataLoader`` calls with the positions of each
micro-batch it fetches; the positions queue up in fetch order and each optimizer step takes as many micro-batches as
it ran (``on_substep_end`` events + 1), so prefetching ahead does not shift them. Limits, each announced by a warning
and ``batch_order = None``: a loader with worker processes (``dataloader_num_workers > 0``: the fetches happen in the
workers; use 0 to record it), an ``IterableDataset`` (no positions), a dataset that takes no attributes, and a run
resumed from a Trainer checkpoint (earlier steps unseen). Evaluation on the very same dataset object is recognised
and left out. Under distributed training each process records its own share of the positions.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

from torch import nn
from torch.utils.data import IterableDataset

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.training.optimizer_state import capture_checkpoint, optimizer_kind
from tda_explorer.compute.training.train import Checkpoint

_INSTALL = "pip install 'tda_explorer[hf]' (transformers>=4.40 and accelerate>=1.0)"
try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
    import transformers
    from packaging.version import Version  # a dependency of transformers
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised by a test that hides the packages
    raise TDAError(f"tda_explorer.integrations.huggingface needs transformers and accelerate: {_INSTALL}; "
                   f"missing: {err.name}") from err

if Version(transformers.__version__).release < (4, 40):  # pragma: no cover - the extra pins a newer one
    raise TDAError(f"tda_explorer.integrations.huggingface needs transformers>=4.40, found {transformers.__version__}: "
                   f"{_INSTALL}")


class RecordingCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that records checkpoints, learning rates, the optimizer's kind and state
    and the batch order of ``Trainer.train()`` (see the module docstring).

    Parameters
    ----------
    every_n_steps : int, optional
        Take a checkpoint every this many optimizer steps (None: not by steps).
    at_epoch_end : bool
        Take a checkpoint at the end of each epoch (the default cadence).
    at_start : bool
        Also take one before the first step (Adam's moments are then zero, at step 0).
    full_state : bool
        Keep the whole ``state_dict`` (buffers and frozen parameters too) instead of the trainable parameters.
    """

    def __init__(self, every_n_steps: int | None = None, at_epoch_end: bool = True, at_start: bool = False,
                 full_state: bool = False):
        if every_n_steps is not None:
            check_positive_int(every_n_steps, "every_n_steps")
        for name, value in (("at_epoch_end", at_epoch_end), ("at_start", at_start), ("full_state", full_state)):
            if not isinstance(value, bool):
                raise TDAError(f"{name} must be True or False, got {value!r}")
        if every_n_steps is None and not at_epoch_end and not at_start:
            raise TDAError("every_n_steps=None with at_epoch_end=False and at_start=False records no checkpoint: "
                           "give every_n_steps or keep at_epoch_end=True")
        self.every_n_steps, self.at_epoch_end, self.at_start = every_n_steps, at_epoch_end, at_start
        self.full_state = full_state
        self._reset()

    # -- what it records ------------------------------------------------------------------------
    def _reset(self) -> None:
        self.checkpoints: list[Checkpoint] = []
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.learning_rates: list[float] = []
        self.batch_order: list[list[int]] | None = []
        self.optimizer: str | None = None
        self._fetched: deque[list[int]] = deque()
        self._mark = 0
        self._micro_batches = 0
        self._epoch = 0
        self._step_lr: float | None = None
        self._since_checkpoint = 0
        self._dataset: Any = None

    # -- the batch order: a hook on the training dataset's fetches -----------------------------
    def _install(self, loader: Any, state: Any) -> None:
        dataset = getattr(loader, "dataset", None)
        why = None
        if state.global_step > 0:
            why = f"the run resumes at step {state.global_step}, so the batches of the earlier steps were not seen"
        elif dataset is None or isinstance(dataset, IterableDataset):
            why = "the training data is an IterableDataset (or no map-style dataset), which has no positions"
        elif getattr(loader, "num_workers", 0) > 0:
            why = (f"the DataLoader fetches in {loader.num_workers} worker processes; set dataloader_num_workers=0 "
                   "to record it")
        if why is None:
            original = getattr(dataset, "__getitems__", None)

            def getitems(indices: list) -> list:
                self._fetched.append([int(i) for i in indices])
                return original(indices) if callable(original) else [dataset[i] for i in indices]

            getitems._tda_recorder = True  # type: ignore[attr-defined]
            try:
                dataset.__getitems__ = getitems
                self._dataset = dataset
            except (AttributeError, TypeError):
                why = f"the training dataset ({type(dataset).__name__}) takes no attributes"
        if why is not None:
            self._give_up(why)

    def _uninstall(self) -> None:
        if self._dataset is not None:
            hook = vars(self._dataset).get("__getitems__")
            if getattr(hook, "_tda_recorder", False):
                del self._dataset.__getitems__
            self._dataset = None

    def _give_up(self, why: str) -> None:
        if self.batch_order is not None:
            warnings.warn(f"RecordingCallback records no batch order: {why}", stacklevel=3)
        self.batch_order = None
        self._uninstall()

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, model: nn.Module, optimizer: Any, step: int) -> None:
        if self.checkpoints and self.checkpoints[-1].step == step:
            return
        interval = self.learning_rates[len(self.learning_rates) - self._since_checkpoint:]
        if interval:
            lr = math.fsum(interval) / len(interval)
        else:
            lr = float(optimizer.param_groups[0]["lr"])
        self.checkpoints.append(capture_checkpoint(model, optimizer, lr, step, trainable_only=not self.full_state))
        self._since_checkpoint = 0

    # -- the Trainer's events ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._uninstall()
        self._reset()
        if model is None or optimizer is None:
            raise TDAError("RecordingCallback needs the Trainer's model and optimizer (transformers>=4.40)")
        self.optimizer = optimizer_kind(optimizer)
        self._install(train_dataloader, state)
        self._mark = len(self._fetched)
        if self.at_start:
            self._checkpoint(model, optimizer, state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = int(math.floor((state.epoch or 0) + 1e-9))
        self._fetched.clear()
        self._micro_batches = 0

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._step_lr = float(optimizer.param_groups[0]["lr"])

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append(state.global_step)
        self.epochs.append(self._epoch)
        self.learning_rates.append(self._step_lr)
        self._since_checkpoint += 1
        taken, self._micro_batches = self._micro_batches + 1, 0
        if self.batch_order is not None:
            if len(self._fetched) < taken:
                self._give_up(f"step {state.global_step} ran {taken} micro-batches but only {len(self._fetched)} "
                              "fetches were seen (a DataLoader that bypasses the dataset's __getitems__?)")
            else:
                self.batch_order.append([i for _ in range(taken) for i in self._fetched.popleft()])
        self._mark = len(self._fetched)
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._checkpoint(model, optimizer, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.at_epoch_end:
            self._checkpoint(model, optimizer, state.global_step)
        self._mark = len(self._fetched)

    def on_evaluate(self, args, state, control, **kwargs):
        # fetches since the last step are the evaluation's own, from the training dataset object
        while len(self._fetched) > self._mark:
            self._fetched.pop()

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()
        self._fetched.clear()
