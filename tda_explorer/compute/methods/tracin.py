"""TracIn-CP: gradient inner products summed over checkpoints, weighted by their learning rates.

On an Adam/AdamW run the training side is the Adam update direction instead of the raw gradient: at each checkpoint
an example's gradient g becomes Γ(g) = m̂′ / (√v̂′ + ε), the step Adam would take (per unit learning rate) were g the
next gradient, from the moments the checkpoint carries (as LESS forms it; ``compute.training.optimizer_state``).
Γ is elementwise in parameter space, so it is formed before any dense projection. An Adam checkpoint without its
moments is refused: TracIn never takes an Adam run for SGD.

A run of your own loop recorded with ``RunRecorder`` gives its checkpoints itself (``recording=``): they are
materialised by replaying it, one per epoch by default (at most 10, evenly spaced; ``checkpoint_every``), each with
the mean learning rate of the steps it stands for and, for Adam/AdamW, the moments — the same numbers
``capture_checkpoint`` takes in the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, option, register
from tda_explorer.compute.engine.featurize import iter_features
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.logra import LoGraProjector
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.training.optimizer_state import ADAM_KINDS, adam_direction, check_adam_state
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.data.dataset import AttributionDataset

ADAM_DIRECTION = "adam-preconditioned: Γ(g) = m̂′/(√v̂′ + ε) with the checkpoint's moments updated by g (as LESS)"
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
RECORD_HINT = ("record the moments with the run: tda_explorer.integrations.huggingface.RecordingCallback for a "
               "transformers.Trainer, or Checkpoint(..., optimizer='adam', optimizer_state=capture_optimizer_state("
               "model, optimizer)) / capture_checkpoint(model, optimizer, lr, step) from "
               "tda_explorer.compute.training.optimizer_state in your own loop")


@dataclass
class TracInArguments(AttributorArguments):
    checkpoints: Sequence[dict] | None = option(None, "state dicts to sum over instead of the task's checkpoints "
                                                      "(None: the task's, each with its learning rate)", config=False)
    learning_rates: Sequence[float] | None = option(None, "the learning rate at each of checkpoints=, one per "
                                                          "checkpoint (required with checkpoints=, refused without)",
                                                    cli=False)
    recording: RunRecorder | None = option(None, "or your own loop recorded with RunRecorder: its checkpoints "
                                                 "(with the optimizer's kind and Adam moments) by replaying it",
                                           config=False)
    checkpoint_every: int | None = option(None, "with recording=: a checkpoint every this many steps and at the end "
                                                "(None: one per epoch, at most 10 evenly spaced)", POSITIVE_INT,
                                          cli=False)


@register("tracin", Family.PAIRWISE, TracInArguments, needs=("checkpoints",))
class TracIn(Attributor):
    """τ(z, z′) = Σ_k η_k ∇f(z′; θ_k)ᵀ ∇ℓ(z; θ_k) over the task's checkpoints (Pruthi et al. 2020).

    The checkpoints are the task's (each with its learning rate and optimizer), or ``checkpoints=`` with
    ``learning_rates=``, read as SGD steps (plain state dicts say nothing of an optimizer). At an Adam/AdamW
    checkpoint ∇ℓ(z; θ_k) is replaced by its Adam direction Γ_k (see the module docstring); an Adam checkpoint
    without ``optimizer_state``, or an optimizer other than SGD and Adam/AdamW, is refused.
    """

    def _setup(self) -> None:
        a, task = self.args, self.task
        checkpoints, learning_rates = a.checkpoints, a.learning_rates
        optimizers: list[str] = ["sgd"] * (0 if checkpoints is None else len(checkpoints))
        states: list[dict | None] = [None] * len(optimizers)
        if a.checkpoint_every is not None and a.recording is None:
            raise TDAError("checkpoint_every is for recording=; the task's checkpoints are taken as they are")
        if a.recording is not None:
            if checkpoints is not None or learning_rates is not None:
                raise TDAError("recording= gives the checkpoints itself: pass it without checkpoints= and "
                               "learning_rates=")
            recorded = recording_checkpoints(a.recording, a.checkpoint_every, "tracin")
            checkpoints = [c.state_dict for c in recorded]
            learning_rates = [c.learning_rate for c in recorded]
            optimizers = [c.optimizer for c in recorded]
            states = [c.optimizer_state for c in recorded]
        elif checkpoints is None:
            if learning_rates is not None:
                raise TDAError("learning_rates given without checkpoints; pass both or neither")
            if not task.checkpoints:
                raise TDAError(
                    "TracIn needs checkpoints: record them while training (train_model(..., "
                    "n_checkpoints=K)) or pass checkpoints= and learning_rates="
                )
            checkpoints = [c.state_dict for c in task.checkpoints]
            learning_rates = [c.learning_rate for c in task.checkpoints]
            optimizers = [c.optimizer for c in task.checkpoints]
            states = [c.optimizer_state for c in task.checkpoints]
        elif learning_rates is None or len(learning_rates) != len(checkpoints):
            got = None if learning_rates is None else len(learning_rates)
            raise TDAError(
                f"checkpoints and learning_rates must have the same length, got {len(checkpoints)} "
                f"checkpoints and {got} learning rates"
            )
        self.checkpoints = list(checkpoints)
        self.learning_rates = [float(x) for x in learning_rates]
        self.optimizers = list(optimizers)
        self.optimizer_states = self._check_optimizers(states)

    def _check_optimizers(self, states: list[dict | None]) -> list[dict | None]:
        """The Adam state to precondition each checkpoint with (None: an SGD step); refuses what TracIn cannot
        read as a step direction."""
        names = self.task.tracked_names()
        shapes = {n: p.shape for n, p in self.task.model.named_parameters() if n in names}
        out: list[dict | None] = []
        for i, (kind, state) in enumerate(zip(self.optimizers, states)):
            where = f"checkpoints[{i}]"
            if kind == "sgd":
                out.append(None)
                continue
            if kind not in ADAM_KINDS:
                raise TDAError(f"{where} comes from optimizer {kind!r}: TracIn knows the steps of 'sgd', 'adam' and "
                               "'adamw' only, and will not read another optimizer's run as SGD")
            if state is None:
                raise TDAError(f"{where} comes from an {kind!r} run but carries no optimizer_state: TracIn needs "
                               "Adam's moments (exp_avg, exp_avg_sq) to form the Adam update direction and will not "
                               f"treat the run as SGD; {RECORD_HINT}")
            check_adam_state(state, names, shapes, where)
            if isinstance(self.projector, LoGraProjector):
                raise TDAError(f"projection_kind='logra' cannot be used on {where} (an {kind!r} run): LoGra projects "
                               "inside the layers and never forms the full gradient that Adam's elementwise direction "
                               "needs; use projection_kind='rademacher' or 'gaussian', or no projection")
            out.append(state)
        return out

    def config(self) -> dict[str, Any]:
        config = super().config()
        if any(s is not None for s in self.optimizer_states):
            config["optimizers"] = list(self.optimizers)
            config["training_direction"] = ADAM_DIRECTION
        return config

    def _params(self, state: dict) -> dict:
        """The model at a checkpoint: every parameter and buffer the checkpoint holds (untracked layers and BatchNorm
        statistics included), the model's own where it holds none."""
        model = self.task.model
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        return {k: v for k, v in state.items() if k in known}

    def _fit(self, train: AttributionDataset) -> None:
        self.train_grads_ = [
            self._features(train, test=False, params=self._params(c), tag=f"ckpt{i}") if adam is None
            else self._adam_features(train, self._params(c), adam, tag=f"ckpt{i}")
            for i, (c, adam) in enumerate(zip(self.checkpoints, self.optimizer_states))
        ]

    def _adam_features(self, data: AttributionDataset, params: dict, state: dict, tag: str) -> torch.Tensor:
        """Γ of every training example's gradient at one checkpoint, then projected (cached in the store)."""
        key = None
        if self.store is not None:
            moments = {f"{k}/{n}": t for k in MOMENTS for n, t in state.get(k, {}).items() if n in params}
            hyper = {k: state[k] for k in ("step", "betas", "eps")}
            key = config_fingerprint(model_fingerprint({**self.task.model.state_dict(), **params}),
                                     self.task.config(), tag, "adam", model_fingerprint(moments), hyper,
                                     self.projector.config() if self.projector else None, data.fingerprint())
            cached = self.store.get(key)
            if cached is not None:
                return cached.to(self.device)
        names = self.task.tracked_names()
        shapes = {n: p.shape for n, p in params.items()}
        state = {**state, **{k: {n: t.to(self.device) for n, t in state[k].items() if n in params}
                             for k in MOMENTS if k in state}}  # the moments moved to the device once
        chunks = []
        for _, g in iter_features(self.task, data, self.task.train_loss, None, params=params,
                                  max_memory=self.max_memory, device=self.device, argument="train"):
            g = adam_direction(g, names, shapes, state)
            chunks.append(self.projector.project(g) if self.projector is not None else g)
        features = torch.cat(chunks)
        if key is not None:
            features = self.store.put(key, features, {"dataset": data.name, "tag": f"{tag}-adam"}).to(self.device)
        return features

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        scores = torch.zeros(len(test), len(self.train_), device=self.device)
        for lr, state, g_train in zip(self.learning_rates, self.checkpoints, self.train_grads_):
            g_test = self._features(test, test=True, params=self._params(state))
            scores += lr * (g_test @ g_train.T)
        return scores

    def _self_influence(self) -> torch.Tensor:
        total = 0
        for i, (lr, state, adam, g) in enumerate(zip(self.learning_rates, self.checkpoints, self.optimizer_states,
                                                     self.train_grads_)):
            # z's own gradient against its training-side feature: g·g for SGD, g·Γ(g) for Adam
            plain = g if adam is None else self._features(self.train_, test=False, params=self._params(state),
                                                          tag=f"ckpt{i}")
            total = total + lr * (plain * g).sum(dim=1)
        return total


def recording_checkpoints(recording: Any, every: int | None, method: str) -> list:
    """The ``Checkpoint``s of a finished ``RunRecorder`` (``RunRecorder.checkpoint_steps``: one per epoch, at most
    ``DEFAULT_CHECKPOINTS`` evenly spaced, or every ``every`` steps, and at the end),
    or those a record of checkpoints took (the Hugging Face ``RecordingCallback``); anything else refused by name."""
    if not isinstance(recording, RunRecorder) and hasattr(recording, "checkpoints") and \
            not hasattr(recording, "replay"):
        if every is not None:
            raise TDAError(f"{method}: checkpoint_every needs a RunRecorder to replay; a "
                           f"{type(recording).__name__} gives the checkpoints it took")
        return list(recording.checkpoints)
    return finished_recording(recording, method).checkpoints(every=every)
