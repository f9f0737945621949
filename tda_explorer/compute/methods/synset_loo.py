"""Synset-based leave-one-out (``synset-loo``): removal effects estimated by replaying a distilled synset.

``fit`` distils the synset (``compute/methods/synset.py``) from the recorded trajectory, or reads it from the store;
``estimate_removal(ids)`` / ``estimate_removals(groups)`` replay the weighted synset with and without each
group and return the predicted change of every test measurement; ``attribute`` is the per-example matrix:
each training example's score is the predicted effect of removing it alone: its cluster's weight minus one.

Open choice (documented, measured): the synset's resolution is its cluster, so on its own it gives every member
of a cluster the same single-example score. ``within_cluster="if-ekfac"`` (default; any attributor's catalogue
name works, e.g. ``"if-astra"``) adds each example's deviation from its cluster's mean score under that
method: the replay sets the level of a cluster, a cheap per-example first-order term spreads its members.
Group estimates (``estimate_removals``) are pure synset replays.

The run is a built-in recipe's (``trajectory=``) or your own loop's (``recording=RunRecorder(...)``: its checkpoints,
one per epoch, are materialised by replaying it, and the synset replays follow its optimizer and learning rates;
see ``compute/methods/synset.py``). Training data read lazily (``AttributionDataset.from_torch``) are read into
memory once: the synthetic examples are input tensors fitted to them (dict inputs, such as a tokenizer's, are
refused: tokens cannot be fitted by gradient).

The defaults (5 clusters per class, 4 replay steps per recorded epoch) were chosen on digits
(``benchmarks/bench_removal.py``; figures in ``benchmarks/README.md``): 10 clusters per class tracked group removals
no better and single examples only a little better, at a smaller speed-up over retraining; fewer replay steps per
epoch (with the learning rate scaled up to cover the same distance) were unstable on the MLP. One synthetic example
per cluster cannot resolve its members: single-example estimates stay below exact influence functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, create, option, register
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.methods.base import Attributor, AttributorArguments, attributor_spec
from tda_explorer.compute.methods.synset import (
    Synset,
    Trajectory,
    distill,
    removal_weights,
    replay,
    replay_module,
)
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.compute.training.train import stacked_outputs
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory


@dataclass
class SynsetLOOArguments(AttributorArguments):
    trajectory: Trajectory | None = option(None, "the recorded run of a built-in recipe: initial parameters, "
                                                 "training recipe and checkpoints (Experiment.trajectory()); give "
                                                 "this or recording", config=False)
    recording: RunRecorder | None = option(None, "or your own loop recorded with RunRecorder (any torch.optim "
                                                 "optimizer and schedule): its replays give the checkpoints and "
                                                 "the synset replays follow its optimizer", config=False)
    checkpoint_every: int | None = option(None, "with recording=: a checkpoint to match every this many steps "
                                                "(None: one per epoch)", POSITIVE_INT, cli=False)
    per_class: int = option(5, "clusters (synthetic examples) per class", POSITIVE_INT)
    distill_steps: int = option(400, "Adam steps of reversed gradient matching that distil the synset", POSITIVE_INT)
    steps_per_epoch: int = option(4, "full-synset steps per recorded epoch in a replay", POSITIVE_INT)
    within_cluster: str | None = option("if-ekfac", "the attributor whose per-example deviation from its cluster's "
                                                    "mean spreads a cluster's members (any attributor's catalogue "
                                                    "name but synset-loo); None: the cluster's score alone")
    seed: int = option(0, "seed of the clustering and the distillation", Interval(0, None, integer=True))


@register("synset-loo", Family.PAIRWISE, SynsetLOOArguments, needs=("trajectory",))
class SynsetLOO(Attributor):
    """Leave-one-out and group removal estimated on a distilled synset."""

    tensor_inputs = True  # dict inputs (a tokenizer's) are refused

    def _setup(self) -> None:
        a = self.args
        if a.trajectory is not None and a.recording is not None:
            raise TDAError("synset-loo takes one run: trajectory= (a built-in recipe) or recording= (your own loop), "
                           "not both")
        if a.recording is not None:
            finished_recording(a.recording, "synset-loo")
        elif not isinstance(a.trajectory, Trajectory):
            raise TDAError(
                "synset-loo needs the recorded training trajectory: pass trajectory=Trajectory(init_state, config, "
                "checkpoints) with the parameters saved before the first step (model.state_dict() right after "
                "initialisation), the TrainConfig used, and checkpoint state_dicts saved during training "
                "(train_model records them; the built-in experiments supply all three), or recording="
                "RunRecorder(model, optimizer, train, batch_size) wrapped around your own loop"
            )
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by synset-loo; leave it None")
        self.trajectory, self.recording, self.checkpoint_every = a.trajectory, a.recording, a.checkpoint_every
        self.per_class, self.distill_steps, self.steps_per_epoch = a.per_class, a.distill_steps, a.steps_per_epoch
        self.seed = a.seed
        self.within_cluster = a.within_cluster or None
        if self.within_cluster:
            attributor_spec(self.within_cluster, "within_cluster", self.name)
            self.spread_ = create(self.within_cluster, self.task, device=self.device)  # refuses bad models up front

    def _fit(self, train: AttributionDataset) -> None:
        if self.recording is not None:
            if train.fingerprint() != self.recording.data_fingerprint:
                raise TDAError("train: synset-loo must be fitted on the data the run was recorded on")
            self.trajectory = Trajectory.from_recording(self.recording, self.checkpoint_every)
        if self.within_cluster:
            self.spread_.fit(train)
        key = None
        if self.store is not None:
            key = config_fingerprint(model_fingerprint(self.task.model), self.task.config(), "synset",
                                     self.trajectory.recipe_key(), len(self.trajectory.checkpoints),
                                     self.per_class, self.distill_steps, self.seed, train.fingerprint())
            cached = self.store.get_object(key)
            if cached is not None:
                self.synset_ = Synset(**cached)
                return
        self.synset_ = distill(self.task, in_memory(train, self.name), self.trajectory, self.per_class,
                               self.distill_steps, seed=self.seed, device=self.device)
        if key is not None:
            self.store.put_object(key, self.synset_.to_dict(), {"method": self.name, "dataset": train.name})

    def _measure(self, params: dict[str, torch.Tensor], test: AttributionDataset) -> torch.Tensor:
        """Test measurements ``[M, n_test]`` of stacked replayed models."""
        model, inputs = replay_module(self.task.model, self.trajectory), in_memory(test, self.name).inputs
        rows = []
        for start in range(0, len(test), 256):  # batches of 256 (also BatchNorm's batch statistics, if it uses them)
            out = stacked_outputs(model, params, inputs[start : start + 256], self.device)
            labels = test.labels[start : start + 256].to(out.device).repeat(out.shape[0])
            rows.append(self.task.test_measurement(out.flatten(0, 1), labels).view(out.shape[0], -1).double().cpu())
        return torch.cat(rows, 1)

    def _replay(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return replay(self.synset_, weights, self.trajectory, self.task.model, len(self.train_),
                      self.steps_per_epoch, self.device)

    def _effects(self, weights: torch.Tensor, test: AttributionDataset, chunk: int = 256) -> torch.Tensor:
        """Predicted Δ measurement ``[M, n_test]`` for each weight row, against the control replay (which rides
        along in the same lock-step batch)."""
        rows = []
        for i in range(0, len(weights), chunk):
            block = torch.cat([self.synset_.weights[None], weights[i : i + chunk]])
            measured = self._measure(self._replay(block), test)
            rows.append(measured[1:] - measured[0])
        return torch.cat(rows)

    def estimate_removals(self, groups: Sequence[Sequence[Any]], test: AttributionDataset,
                          fractions: Sequence[Sequence[float]] | None = None) -> torch.Tensor:
        """Predicted change ``[n_groups, n_test]`` of each test measurement when each group of training ids is
        removed (or down-weighted by ``fractions``); positive = the group was a proponent."""
        positions = self._check_fitted().group_positions(groups)
        weights = removal_weights(self.synset_, positions, None if fractions is None else [list(f) for f in fractions])
        return self._effects(weights, test)

    def estimate_removal(self, train_ids: Sequence[Any], test: AttributionDataset) -> torch.Tensor:
        """Predicted change ``[n_test]`` of every test measurement when ``train_ids`` are removed together."""
        return self.estimate_removals([list(train_ids)], test)[0]

    def cluster_effects(self, test: AttributionDataset) -> torch.Tensor:
        """``[n_test, K]``: predicted effect of removing one example of each cluster (the per-cluster matrix)."""
        k = len(self.synset_.weights)
        weights = self.synset_.weights.repeat(k, 1) - torch.eye(k, dtype=torch.float64)
        return self._effects(weights, test).T

    def _within(self, first_order: torch.Tensor) -> torch.Tensor:
        """Each column's deviation from its cluster's mean, per row."""
        cluster_of, k = self.synset_.cluster_of, len(self.synset_.weights)
        sums = torch.zeros(len(first_order), k, dtype=first_order.dtype).index_add_(1, cluster_of, first_order)
        return first_order - (sums / self.synset_.weights.to(first_order.dtype))[:, cluster_of]

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        scores = self.cluster_effects(test)[:, self.synset_.cluster_of]
        if self.within_cluster:
            scores = scores + self._within(self.spread_.attribute(test).scores.double())
        return scores.float()

    def _self_influence(self) -> torch.Tensor:
        rows = torch.arange(len(self.train_))
        effects = self.cluster_effects(self.train_)[rows, self.synset_.cluster_of]  # [n, K] first, never n × n
        if self.within_cluster:
            # example i's own score minus the mean of its scores over its cluster: the diagonal of
            # ``attribute(train)``, one cluster's block at a time (never n × n)
            for c in range(len(self.synset_.weights)):
                members = torch.nonzero(self.synset_.cluster_of == c).flatten()
                block = self.spread_.attribute(self.train_.subset(members.tolist())).scores.double()[:, members]
                effects[members] += block.diagonal() - block.mean(1)
        return effects.float()

