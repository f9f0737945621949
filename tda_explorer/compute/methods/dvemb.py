"""Data value embedding (``dvemb``; Wang et al. 2024, seed 002): trajectory-specific leave-one-out in one pass.

SGD with a mean loss over batches of nominal size |B| and weight decay wd takes θ_{t+1} = θ_t − η_t(ĝ_t + wd θ_t).
Dropping example z from step t moves θ_{t+1} by +(η_t/|B|) g_t(z), and a deviation δ propagates through step s as
δ ← ((1 − η_s wd) I − K_s) δ with K_s = (η_s/|B|) Σ_{z′∈B_s} g_s(z′) g_s(z′)ᵀ (the batch curvature by gradient
outer products, as the paper's GGN). With Φ the product of those factors after step t, the backward recursion
over the recorded run (Φ ← I at the end; for t = T−1 … 0: e_t(z) = (η_t/|B|) Φ g_t(z) for z ∈ B_t, then
Φ ← (1 − η_t wd) Φ − Σ_{z∈B_t} e_t(z) g_t(z)ᵀ) gives each example's embedding Σ_t e_t(z), and
    τ(z, z′) = ∇f(z′; θ_T)ᵀ emb(z)
is the predicted change of the test measurement when z is dropped from every step that used it (positive =
proponent), in k projected dimensions (cost O(T·|B|·k²)). ``influence_curve`` gives the per-epoch parts e_t(z).
Steps must be recorded with ``StepRecorder`` during an SGD run, or come from a run of your own loop recorded with
``RunRecorder`` (``recording=``), replayed once to take each step's projected gradients (``projection_dim``).
The recursion is that of plain SGD: Adam's preconditioner, momentum, Nesterov and per-group learning rates are
not this recursion and are refused by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import NONNEGATIVE, POSITIVE_INT, Family, option, register
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.training.run_recorder import RunRecorder
from tda_explorer.compute.training.step_recorder import StepRecorder
from tda_explorer.compute.training.train import train_weighted
from tda_explorer.data.dataset import AttributionDataset

#: A step whose factor (1 − η·wd)I − K_s has an eigenvalue below −1 (η·λ_max(K_s + wd) above this) amplifies the
#: deviation it propagates: the recursion is then no longer the contraction the method relies on.
STABLE_CURVATURE = 2.0


class UnstableStepsWarning(UserWarning):
    """Some recorded SGD steps are past the linearised recursion's stability (η·λ_max > 2): dvemb's scores can be
    dominated by them."""


@dataclass
class DataValueEmbeddingArguments(AttributorArguments):
    projection_dim: int | None = option(None, "with a RunRecorder: the dimension each step's gradients are projected "
                                              "to (None: 1024); a StepRecorder sets its own (leave None)",
                                        POSITIVE_INT, cli=False)
    recording: StepRecorder | RunRecorder | None = option(
        None, "the finished StepRecorder of the SGD run (finish() called; its projection_dim sets the embeddings' "
              "dimension), or your own plain-SGD loop recorded with RunRecorder (replayed once)", config=False)
    weight_decay: float | None = option(None, "the run's weight decay wd in θ ← θ − η(ĝ + wd·θ) (absolute, per "
                                              "step); None: the task's weight_decay (a RunRecorder: its "
                                              "optimizer's)", NONNEGATIVE)
    steps_per_epoch: int | None = option(None, "steps grouped into one epoch of influence_curve; None: ⌈n / the "
                                               "recording's batch size⌉", POSITIVE_INT)


@register("dvemb", Family.PAIRWISE, DataValueEmbeddingArguments, needs=("recording",))
class DataValueEmbedding(Attributor):
    """Data value embedding over a recorded SGD run.

    The task gives the test measurement and the tracked parameters; the final parameters come from the recording.
    The embeddings live in the recording's projected space (set ``projection_dim`` on the ``StepRecorder``).
    """

    @classmethod
    def refuses_recipe(cls, config: Any) -> str | None:
        if config.optimizer != "sgd" or config.momentum:
            kind = config.optimizer if config.optimizer != "sgd" else f"sgd with momentum {config.momentum:g}"
            return f"dvemb follows plain SGD steps; this session's recipe trains with {kind}"
        return None

    def _setup(self) -> None:
        a = self.args
        recording = a.recording
        self.run_ = None
        if isinstance(recording, RunRecorder):
            self.run_ = _check_run(recording)
            self.projection_dim = 1024 if a.projection_dim is None else a.projection_dim
            self.projector = None  # the step recorder projects; test gradients go through its projection
            self.recording = None
            self.wd = float(recording.groups[0].get("weight_decay", 0.0) if a.weight_decay is None
                            else a.weight_decay)
            self.steps_per_epoch = a.steps_per_epoch
            return
        if not isinstance(recording, StepRecorder) or not recording.steps or recording.final is None:
            raise TDAError(
                "dvemb needs a finished recording of the training run: create StepRecorder(task, train, batch_size)"
                ", pass it as the step callback of the training loop (train_weighted(..., callback=recorder) or "
                "call recorder(step, batch_positions, params, lr) before each SGD step), then "
                "recorder.finish(final_params); the built-in experiments record one for you. Or pass "
                "recording=RunRecorder(model, optimizer, train, batch_size) wrapped around your own SGD loop"
            )
        if self.projector is not None:
            raise TDAError("dvemb projects with its recording's projection; set projection_dim on the StepRecorder")
        self.recording = recording
        self.wd = float(self.task.weight_decay if a.weight_decay is None else a.weight_decay)
        self.steps_per_epoch = a.steps_per_epoch

    def _fit(self, train: AttributionDataset) -> None:
        if self.run_ is not None:
            if train.fingerprint() != self.run_.data_fingerprint:
                raise TDAError("train: dvemb must be fitted on the data the run was recorded on")
            recorder = StepRecorder(self.task, self.run_.train, self.run_.batch_size, self.projection_dim,
                                    device=self.device)
            self.run_.replay_steps(recorder)
            recorder.finish(self.run_.final_state)
            self.recording = recorder
        if len(train) != len(self.recording.train):
            raise TDAError(f"train has {len(train)} examples but the recording was made on "
                           f"{len(self.recording.train)}; fit on the recorded training set")
        steps = self.recording.steps
        k = steps[0].gradients.shape[1]
        per_epoch = self.steps_per_epoch or -(-len(train) // self.recording.batch_size)
        n_epochs = -(-len(steps) // per_epoch)
        self.curves_ = torch.zeros(len(train), n_epochs, k, dtype=torch.float64)
        phi = torch.eye(k, dtype=torch.float64, device=self.device)  # the k×k recursion runs on the device
        curvatures = torch.zeros(len(steps), dtype=torch.float64)  # each step's largest eigenvalue of K_s + η·wd
        for t in range(len(steps) - 1, -1, -1):
            step = steps[t]
            g = step.gradients.to(phi)
            scale = step.lr / self.recording.batch_size
            finite = bool(torch.isfinite(g).all())  # a non-finite step's scores come out non-finite anyway
            curvatures[t] = scale * float(torch.linalg.eigvalsh(g @ g.T)[-1]) + step.lr * self.wd if finite \
                else float("nan")
            e = scale * g @ phi.T  # rows: e_t(z) = (η/|B|) Φ g_t(z)
            self.curves_[step.positions, t // per_epoch] += e.cpu()
            phi = (1 - step.lr * self.wd) * phi - e.T @ g
        self.embeddings_ = self.curves_.sum(1)
        self.step_curvatures_ = curvatures
        unstable = curvatures > STABLE_CURVATURE
        if bool(unstable.any()):
            warnings.warn(f"dvemb: in {int(unstable.sum())} of {len(steps)} recorded steps the step's curvature "
                          f"η·λ_max(K + wd) exceeds {STABLE_CURVATURE:g} (up to {float(curvatures.max()):.3g}), "
                          "where the linearised recursion amplifies a deviation instead of damping it, so those "
                          "steps can dominate the scores (the run steps past plain SGD's stability there: a smaller "
                          "learning rate or standardised inputs keep it within); step_curvatures_ has every step's",
                          UnstableStepsWarning, stacklevel=3)

    def _test_gradients(self, test: AttributionDataset) -> torch.Tensor:
        """Projected test-measurement gradients at the run's final parameters, on the CPU beside the embeddings."""
        return self.recording.project(self._features(test, test=True, params=self.recording.final)).cpu()

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return (self._test_gradients(test) @ self.embeddings_.T).float()

    def _self_influence(self) -> torch.Tensor:
        g = self._test_gradients(self.train_)
        return (g * self.embeddings_).sum(1).float()

    def influence_curve(self, test: AttributionDataset, train_ids: Sequence[Any]) -> pd.DataFrame:
        """Per-epoch contributions: tidy rows ``test_id, train_id, epoch, score`` (scores sum to ``attribute``'s)."""
        train = self._check_fitted()
        positions = train.positions(list(train_ids), "train_ids")
        g = self._test_gradients(test)  # [n_test, k]
        parts = torch.einsum("jk,iek->jie", g, self.curves_[positions])  # [n_test, n_ids, epochs]
        rows = [(test.ids[j], train.ids[p], e, float(parts[j, i, e]))
                for j in range(len(test)) for i, p in enumerate(positions) for e in range(parts.shape[2])]
        return pd.DataFrame(rows, columns=["test_id", "train_id", "epoch", "score"])


def record_experiment_run(task: AttributionTask, train: AttributionDataset, model_factory, config, seed: int,
                          projection_dim: int | None = 1024, device: str = "cpu") -> StepRecorder:
    """Train once with ``train_weighted`` (the retraining engine's batch order for ``seed``) and record it."""
    if config.optimizer != "sgd":
        raise TDAError(f"dvemb follows SGD steps; this recipe uses {config.optimizer!r} (train with optimizer='sgd')")
    recorder = StepRecorder(task, train, min(config.batch_size, len(train)), projection_dim, device=device)
    params = train_weighted(model_factory, train.inputs, train.labels, torch.ones(1, len(train)), config, [seed],
                            device=device, callback=recorder)
    recorder.finish({k: v[0] for k, v in params.items()})
    return recorder


def _check_run(recording: RunRecorder) -> RunRecorder:
    """A finished RunRecorder of a plain SGD run (what the recursion follows), or a refusal naming what is not."""
    if recording.final_state is None:
        raise TDAError("recording: finish() it before attributing")
    name = recording.optimizer_class.__name__
    if not issubclass(recording.optimizer_class, torch.optim.SGD):
        raise TDAError(f"dvemb follows plain SGD steps; this run used {name}, whose preconditioned steps are not its "
                       "recursion: use tracin (Adam-aware) or synset-loo with the same recording")
    if any(g.get("momentum", 0.0) or g.get("nesterov") for g in recording.groups):
        raise TDAError("dvemb follows plain SGD steps; this run used SGD with momentum, which its recursion does not "
                       "carry: use magic (momentum-exact) or source with the same recording")
    if any(len(set(rates)) > 1 for rates in recording.learning_rates):
        raise TDAError("dvemb takes one learning rate per step; this run's parameter groups had different rates")
    return recording
