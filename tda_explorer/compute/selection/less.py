"""LESS (Xia et al., 2024): select the training data whose Adam updates most align with a target task.

1. **Warmup** (``warmup``): train the selection model with Adam on a random ``fraction`` of the pool (default 5%)
   for a few epochs (default 4), keeping each epoch's parameters, Adam moments and mean learning rate
   (``AdamCheckpoint``; ``AdamCheckpoint.capture`` takes one from your own loop and any ``torch.optim.Adam(W)``).
2. **Pool features**: at each checkpoint i, every candidate's per-example gradient g over the tracked parameters
   (all, a prefix subset, or LoRA adapters) becomes the Adam direction Γ = m̂′ / (√v̂′ + ε), with m′ = β₁m + (1−β₁)g
   and v′ = β₂v + (1−β₂)g² from the checkpoint's moments, bias-corrected at step t+1. Γ is elementwise in
   parameter space, so it is formed *before* the seeded random projection (to ``projection_dim``), then
   unit-normalised.
3. **Target features**: plain gradients of the target examples at the same checkpoints, the same projection,
   unit-normalised.
4. **Score**: Inf_i(z, j) = cosine of z's feature with subtask j at checkpoint i; score(z) = max_j Σ_i η̄_i Inf_i(z, j)
   with η̄ the checkpoints' mean learning rates renormalised to sum to one. Keep the top ``fraction``.

How the top ``fraction`` is filled is ours to choose (``allocation``). Ranking by the max-over-subtasks score lets
the subtasks with the largest cosines take the whole budget: on the planted pool (digits seen through four
transformations, 20 target examples with their classes as subtasks) it picked only target-source examples but
only 3–4 of the 10 classes, and trained models fell below a random selection. Giving every subtask an equal share,
filled in turn from its own ranking (``"per-subtask"``, the default), kept the precision and beat the random
selection (figures: design choices in benchmarks/README.md).

Choices where the paper and its code differ, taken here: the bias-corrected Adam direction with ε outside the root
(the paper; the code leaves out the correction and puts ε inside — after unit normalisation the two differ only
through ε); a subtask's influence is the mean of the cosines with its examples (the code;
``subtask_aggregation="mean-gradient"`` instead takes the cosine with the mean of the subtask's unit-normalised
target features, close to the paper's average of the target gradients but with every example weighted alike).
On the planted pool both aggregations selected only target-source examples.

Your own Adam/AdamW warmup loop recorded with ``RunRecorder`` replaces step 1 (``recording=``): its checkpoints,
one per epoch, are materialised by replaying it (``recording_adam_checkpoints``), and the pool is scored with the
recorded final model. An SGD run is refused by name: LESS's features are Adam's update directions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tda_explorer._validation import TDAError, as_device, check_choice, check_fraction, check_positive_int
from tda_explorer.compute.catalogue import FRACTION, POSITIVE_INT, Family, Options, build_arguments, option, register
from tda_explorer.compute.engine.featurize import make_projector
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.data.dataset import AttributionDataset

AGGREGATIONS = ("mean-cosine", "mean-gradient")
ALLOCATIONS = ("per-subtask", "max")


@dataclass(frozen=True)
class WarmupConfig:
    """The warmup run: Adam on a random ``fraction`` of the pool, one checkpoint per epoch, linear lr decay."""

    fraction: float = 0.05
    epochs: int = 4
    lr: float = 1e-2
    batch_size: int = 16
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_fraction(self.fraction, "fraction")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        if not self.lr > 0:
            raise TDAError(f"lr must be > 0, got {self.lr}")


@dataclass
class AdamCheckpoint:
    """Tracked parameters with their Adam moments at a point of training, and the mean lr of the epoch before."""

    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                parameters: Sequence[str] | None = None) -> AdamCheckpoint:
        """Snapshot ``model``'s parameters (all trainable, or those named by the ``parameters`` prefixes) and the
        moments ``optimizer`` (``torch.optim.Adam``/``AdamW``) holds for them, with ``lr`` the epoch's mean."""
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TDAError(f"optimizer must be torch.optim.Adam or AdamW (LESS needs Adam's moments), got "
                           f"{type(optimizer).__name__}")
        names = AttributionTask(model, parameters=parameters).tracked_names()
        named = dict(model.named_parameters())
        params, m, v, steps = {}, {}, {}, set()
        for name in names:
            state = optimizer.state.get(named[name])
            if not state:
                raise TDAError(f"optimizer holds no Adam state for parameter {name!r}: take at least one step first, "
                               "or pass parameters= naming only the trained ones")
            params[name] = named[name].detach().clone()
            m[name], v[name] = state["exp_avg"].detach().clone(), state["exp_avg_sq"].detach().clone()
            steps.add(int(state["step"]))
        tracked = {id(named[n]) for n in names}
        groups = {i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) in tracked}
        settings = {(tuple(optimizer.param_groups[i]["betas"]), optimizer.param_groups[i]["eps"]) for i in groups}
        if len(settings) > 1 or len(steps) > 1:
            raise TDAError("the tracked parameters sit in optimizer groups with different betas/eps or have taken "
                           "different numbers of steps: capture each group separately with parameters=")
        (betas, eps), = settings
        return cls(params, m, v, steps.pop(), float(lr), betas, float(eps))

    def adam_direction(self, grads: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Γ = m̂′ / (√v̂′ + ε) for per-example gradients ``[n, p]`` flattened in ``names`` order."""
        b1, b2 = self.betas
        m = torch.cat([self.exp_avg[k].reshape(-1) for k in names]).to(grads)
        v = torch.cat([self.exp_avg_sq[k].reshape(-1) for k in names]).to(grads)
        t = self.step + 1
        m_hat = (b1 * m + (1 - b1) * grads) / (1 - b1**t)
        v_hat = (b2 * v + (1 - b2) * grads.square()) / (1 - b2**t)
        return m_hat / (v_hat.sqrt() + self.eps)


def warmup(model: nn.Module, pool: AttributionDataset, config: WarmupConfig = WarmupConfig(), *,
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
           parameters: Sequence[str] | None = None, device: str | torch.device | None = None,
           ) -> tuple[nn.Module, list[AdamCheckpoint], list[int]]:
    """Train a copy of ``model`` with Adam on a random ``config.fraction`` of ``pool``.

    Returns the warmed-up copy, one ``AdamCheckpoint`` per epoch and the positions of the warmup examples.
    Only the tracked ``parameters`` (prefixes; default all trainable) are trained — LoRA adapters for a large model.
    """
    if not isinstance(pool, AttributionDataset):
        raise TDAError(f"pool must be an AttributionDataset, got {type(pool).__name__}")
    device = as_device(device)
    model = copy.deepcopy(model).to(device)
    names = AttributionTask(model, parameters=parameters).tracked_names()
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.requires_grad_(name in names)
    gen = torch.Generator().manual_seed(config.seed)
    n_warm = max(1, round(config.fraction * len(pool)))
    chosen = torch.randperm(len(pool), generator=gen)[:n_warm]
    optimizer = torch.optim.AdamW([named[n] for n in names], lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = -(-n_warm // config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total)
    checkpoints = []
    model.train()
    for _ in range(config.epochs):
        order = chosen[torch.randperm(n_warm, generator=gen)]
        lrs = []
        for start in range(0, n_warm, config.batch_size):
            rows = order[start:start + config.batch_size]
            loss = loss_fn(model(pool.inputs[rows].to(device)), pool.labels[rows].to(device)).mean()
            optimizer.zero_grad()
            loss.backward()
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        checkpoints.append(AdamCheckpoint.capture(model, optimizer, float(np.mean(lrs)), names))
    model.eval()
    return model, checkpoints, chosen.tolist()


def recording_adam_checkpoints(recording: Any, every: int | None = None, parameters: Sequence[str] | None = None
                               ) -> list[AdamCheckpoint]:
    """``AdamCheckpoint``s of an Adam/AdamW run of your own loop recorded with ``RunRecorder``, materialised by
    replaying it: after every ``every`` steps (default one epoch) and at the end, each with the mean learning rate of
    the steps since the previous one."""
    if not isinstance(recording, RunRecorder) and hasattr(recording, "checkpoints"):
        return list(recording.checkpoints)  # a record of checkpoints with Adam's moments (the Trainer callback)
    finished_recording(recording, "less")
    if not issubclass(recording.optimizer_class, (torch.optim.Adam, torch.optim.AdamW)):
        raise TDAError(f"LESS forms Adam's update directions from the run's moments; this run used "
                       f"{recording.optimizer_class.__name__}, which has none: record an Adam/AdamW warmup, or let "
                       "LESS run its own (leave recording=None), or use tracin on this recording")
    steps = recording.checkpoint_steps(every)
    wanted, taken, previous = set(steps), [], [0]

    def take(step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        rates = [r[0] for r in recording.learning_rates[previous[0]:step]]
        taken.append(AdamCheckpoint.capture(model, optimizer, float(np.mean(rates)), parameters))
        previous[0] = step

    model, optimizer = recording._run(recording._weights(None, None),
                                      lambda step, rows, m, o: take(step, m, o) if step in wanted and step else None)
    take(recording.n_steps, model, optimizer)
    return taken


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


class LESS:
    """Scores a pool for a target task with LESS (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The selection model's architecture (parameters come from the checkpoints).
    checkpoints : list of AdamCheckpoint
        From ``warmup`` or captured from your own Adam run.
    loss_fn : callable (outputs, targets) -> per-example loss
    projection_dim : int or None
        Random projection size (None: exact gradients).
    projection_seed : int
    subtask_aggregation : {"mean-cosine", "mean-gradient"}
    device : str or torch.device
    max_memory : int, optional
        Budget in bytes for one chunk of per-example gradients.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[AdamCheckpoint], *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
                 projection_dim: int | None = 8192, projection_seed: int = 0,
                 subtask_aggregation: str = "mean-cosine", device: str | torch.device | None = None,
                 max_memory: int | None = None):
        if not checkpoints or not all(isinstance(c, AdamCheckpoint) for c in checkpoints):
            raise TDAError("checkpoints must be a non-empty list of AdamCheckpoint (from warmup or "
                           "AdamCheckpoint.capture)")
        self.model, self.checkpoints, self.loss_fn = model, list(checkpoints), loss_fn
        self.names = list(checkpoints[0].params)
        self.device = as_device(device)
        task = AttributionTask(model, parameters=self.names)
        self.projector = make_projector(task, projection_dim, "rademacher", projection_seed, self.device)
        self.aggregation = check_choice(subtask_aggregation, "subtask_aggregation", AGGREGATIONS)
        self.max_memory = max_memory
        lrs = torch.tensor([c.lr for c in checkpoints], dtype=torch.float64)
        self.weights = lrs / lrs.sum()
        self.pool_: AttributionDataset | None = None

    def _features(self, data: AttributionDataset, checkpoint: AdamCheckpoint, adam: bool) -> torch.Tensor:
        chunks = []
        for _, g in iter_per_sample_gradients(self.model, self.names, data.inputs, data.labels, self.loss_fn,
                                              params=checkpoint.params, max_memory=self.max_memory,
                                              device=self.device, ids=data.ids, argument=data.name):
            g = checkpoint.adam_direction(g, self.names) if adam else g
            chunks.append(self.projector.project(g) if self.projector is not None else g.float())
        return _normalise(torch.cat(chunks))

    def fit(self, pool: AttributionDataset) -> LESS:
        """Adam-direction features of every pool example at every checkpoint; returns ``self``."""
        if not isinstance(pool, AttributionDataset):
            raise TDAError(f"pool must be an AttributionDataset, got {type(pool).__name__}")
        self.features_ = [self._features(pool, c, adam=True) for c in self.checkpoints]
        self.pool_ = pool
        return self

    def subtask_scores(self, target: AttributionDataset, subtasks: Sequence[Any] | None = None
                       ) -> tuple[torch.Tensor, list[Any]]:
        """Σ_i η̄_i Inf_i(z, j) for every pool example and subtask ``[n_pool, J]``, with the subtask names.

        ``subtasks`` names each target example's subtask (default: one subtask holding them all).
        """
        if self.pool_ is None:
            raise TDAError("LESS is not fitted: call fit(pool) first")
        if not isinstance(target, AttributionDataset):
            raise TDAError(f"target must be an AttributionDataset, got {type(target).__name__}")
        if len(target) == 0:
            raise TDAError("target is empty: pass at least one example of the target task")
        subtasks = ["all"] * len(target) if subtasks is None else list(subtasks)
        if len(subtasks) != len(target):
            raise TDAError(f"subtasks must name one subtask per target example ({len(target)}), got {len(subtasks)}")
        names = list(dict.fromkeys(subtasks))
        groups = {s: [i for i, t in enumerate(subtasks) if t == s] for s in names}
        total = torch.zeros(len(self.pool_), len(names), dtype=torch.float64)
        for weight, checkpoint, pool_features in zip(self.weights, self.checkpoints, self.features_):
            target_features = self._features(target, checkpoint, adam=False)
            for j, s in enumerate(names):
                rows = target_features[groups[s]]
                if self.aggregation == "mean-gradient":
                    rows = _normalise(rows.mean(0, keepdim=True))
                total[:, j] += weight * (pool_features @ rows.T).mean(1).double().cpu()
        return total, names

    def score(self, target: AttributionDataset, subtasks: Sequence[Any] | None = None) -> pd.DataFrame:
        """Each pool example's LESS score, the max over subtasks: ``train_id, score, best_subtask`` (pool order)."""
        total, names = self.subtask_scores(target, subtasks)
        best, which = total.max(1)
        return pd.DataFrame({"train_id": self.pool_.ids, "score": best.numpy(),
                             "best_subtask": [names[i] for i in which.tolist()]})

    def select(self, target: AttributionDataset, fraction: float = 0.05, subtasks: Sequence[Any] | None = None,
               allocation: str = "per-subtask") -> pd.DataFrame:
        """The top ``fraction`` of the pool: ``rank, train_id, score, best_subtask, label``.

        ``allocation="max"`` ranks by the max-over-subtasks score (the paper); ``"per-subtask"`` gives every
        subtask an equal share, filled in turn from each subtask's own ranking (an example already taken is
        skipped), so no subtask crowds out the others (see the module docstring for the measurement).
        """
        fraction = check_fraction(fraction, "fraction")
        check_choice(allocation, "allocation", ALLOCATIONS)
        total, names = self.subtask_scores(target, subtasks)
        k = max(1, round(fraction * len(total)))
        best, which = total.max(1)
        chosen = allocate(total, k, allocation)
        return pd.DataFrame({"rank": np.arange(1, k + 1), "train_id": [self.pool_.ids[i] for i in chosen],
                             "score": best[chosen].numpy(), "best_subtask": [names[which[i]] for i in chosen],
                             "label": [self.pool_.labels[i].tolist() for i in chosen]})


def allocate(total: torch.Tensor, k: int, allocation: str = "per-subtask") -> list[int]:
    """The ``k`` pool positions chosen from subtask scores ``total`` ``[n_pool, J]``: "max" — the top k by the best
    subtask score (the paper's); "per-subtask" — the subtasks take turns, each adding its best example not yet
    chosen."""
    check_choice(allocation, "allocation", ALLOCATIONS)
    if allocation == "max":
        return torch.argsort(total.max(1).values, descending=True, stable=True)[:k].tolist()
    orders = [iter(torch.argsort(column, descending=True, stable=True).tolist()) for column in total.T]
    chosen, taken, j = [], set(), 0
    while len(chosen) < k:
        position = next(i for i in orders[j % len(orders)] if i not in taken)
        chosen.append(position)
        taken.add(position)
        j += 1
    return chosen


@dataclass
class LESSArguments:
    """The options of ``select`` (LESS end to end); ``model``, ``pool`` and ``target`` are its inputs."""

    fraction: float = option(0.05, "share of the pool to select, in (0, 1]", FRACTION)
    subtasks: Sequence[Any] | None = option(None, "one subtask name per target example (e.g. the target's class "
                                                  "labels); a candidate's score is its best subtask's; None: one "
                                                  "subtask of all", config=False)
    warmup_config: WarmupConfig = option(help="the warmup run: Adam on a random fraction of the pool (5%), 4 epochs, "
                                              "one checkpoint per epoch (WarmupConfig)", config=False,
                                         factory=WarmupConfig)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = option(
        cross_entropy, "per-example training loss (outputs, targets) -> [n], for the warmup and the gradients",
        config=False)
    parameters: Sequence[str] | None = option(None, "parameter-name prefixes to train and featurise (e.g. LoRA "
                                                    "adapters); None: all trainable", cli=False)
    projection_dim: int | None = option(8192, "random projection size of the Adam-direction features (seeded "
                                              "Rademacher); None: exact gradients", POSITIVE_INT)
    subtask_aggregation: str = option("mean-cosine", "a subtask's influence: the mean of the cosines with its "
                                                     "examples, or the cosine with their mean unit feature",
                                      Options(AGGREGATIONS))
    allocation: str = option("per-subtask", "how the top fraction is filled: equal shares per subtask, each from its "
                                            "own ranking, or the top by max-over-subtasks score (the paper)",
                             Options(ALLOCATIONS))
    device: str | torch.device | None = option(None, "where the warmup and the gradients run: 'cpu', 'cuda', … "
                                                     "(default CPU)", config=False)
    recording: Any = option(None, "your own Adam/AdamW warmup loop recorded with RunRecorder, in place of the "
                                  "built-in warmup: its checkpoints (one per epoch) by replaying it", config=False)


@register("less", Family.SELECTION, LESSArguments, needs=("pool_and_target",))
def select(model: nn.Module, pool: AttributionDataset, target: AttributionDataset, fraction: float = 0.05, *,
           subtasks: Sequence[Any] | None = None, warmup_config: WarmupConfig = WarmupConfig(),
           loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
           parameters: Sequence[str] | None = None, projection_dim: int | None = 8192,
           subtask_aggregation: str = "mean-cosine", allocation: str = "per-subtask",
           device: str | torch.device | None = None, recording: Any = None) -> pd.DataFrame:
    """LESS end to end: select the share of a pool whose Adam updates best align with a target task.

    Warms up a copy of ``model`` on a random slice of ``pool``, scores the pool for ``target`` and keeps the top
    ``fraction``. ``model`` is the selection model at its *initial* (or pretrained) parameters (it is not modified);
    ``pool`` the candidates and ``target`` a few examples of the task to select for. The options (``fraction``,
    ``subtasks``, ``allocation``, ``parameters``, …) are ``LESSArguments``, checked there.

    Returns
    -------
    DataFrame ``rank, train_id, score, best_subtask, label`` of the selection, best first; ``df.attrs`` holds
    ``warmup_ids`` (the warmup slice) and ``method``.
    """
    a = build_arguments(LESSArguments, "less", {
        "fraction": fraction, "subtasks": subtasks, "warmup_config": warmup_config, "loss_fn": loss_fn,
        "parameters": parameters, "projection_dim": projection_dim, "subtask_aggregation": subtask_aggregation,
        "allocation": allocation, "device": device, "recording": recording})
    if a.recording is not None:
        checkpoints = recording_adam_checkpoints(a.recording, parameters=a.parameters)
        warmed = copy.deepcopy(a.recording.model)
        warmed.load_state_dict(a.recording.final_state)
        warmed.eval()
        warm_positions = sorted({int(i) for rows in a.recording.positions for i in rows})
        pool_ids = a.recording.train.ids
    else:
        warmed, checkpoints, warm_positions = warmup(model, pool, a.warmup_config, loss_fn=a.loss_fn,
                                                     parameters=a.parameters, device=a.device)
        pool_ids = pool.ids
    less = LESS(warmed, checkpoints, loss_fn=a.loss_fn, projection_dim=a.projection_dim,
                subtask_aggregation=a.subtask_aggregation, device=a.device).fit(pool)
    table = less.select(target, a.fraction, a.subtasks, a.allocation)
    table.attrs.update(method="less", warmup_ids=[pool_ids[i] for i in warm_positions])
    return table
