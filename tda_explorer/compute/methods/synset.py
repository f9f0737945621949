"""Synthetic sets fitted by reversed gradient matching, and their replay (seed 000; recipe in methods-synset.md).

Offline (``distill``): the training set is clustered within each class (k-means on the inputs); each cluster
D_k gets one synthetic example s_k, initialised at the member nearest the centroid, with the cluster's label and
weight w_k = |D_k|. The synthetic inputs are then fitted to the *recorded* training run — the network is not
retrained, the synset is matched to the trajectory that happened ("reversed" gradient matching):
    L(S) = Σ_{t, k, l} 1 − cos(w_k ∇_l ℓ(s_k; θ_t), G_{k,l}(θ_t)),   G_k(θ_t) = Σ_{i ∈ D_k} ∇ℓ(z_i; θ_t),
over the recorded checkpoints θ_t (a few drawn per step) and parameter tensors l, with Adam on the inputs,
clamped to the data's range.

Online (``replay``): a removal is a change of weights, w'_k = w_k − |G ∩ D_k| (fractions for partial
down-weighting), and its effect is estimated by replaying training from the recorded initialisation θ_0 on the
weighted synset — E epochs of ``steps_per_epoch`` full-synset steps, the learning rate scaled by the real steps
per epoch over the synthetic ones (SGD; Adam keeps its rate) — and *subtracting a control replay* with the
unperturbed weights, so the synset's own drift cancels. Many queries replay together in lock-step.

A run of your own loop recorded with ``RunRecorder`` is a trajectory too (``Trajectory.from_recording``): its
initial state, its checkpoints (one per epoch, materialised by replaying it) and the recording itself, so a synset
replay follows the recorded optimizer (its class and hyperparameters: momentum, Nesterov, weight decay, Adam's
betas, …) and learning-rate schedule — each replay epoch takes the mean rate of the recorded epoch it stands for —
and the recording's loss. The replay runs the model in eval mode (Dropout off). BatchNorm that normalised with batch
statistics in the recorded run does so in the replays too (``replay_module``): with the statistics of the synthetic
batch while replaying and of the measured batch when the replayed models are measured. Running statistics cannot
stand in: the recorded ones belong to the recorded parameters, and a replay that starts from θ_0 normalised by the
final ones diverges (a ResNet on generated images: NaN within four epochs).

Choices left open by the published description (documented here, measured in methods-synset.md's prototype):
replay from θ_0 rather than brief fine-tuning from the trained model (closer to retraining);
cosine-only matching (β = 0; the magnitude term did not help); 4 steps per epoch; clusters per class are the
caller's choice (``SynsetLOO`` measures and picks 5).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients
from tda_explorer.compute.engine.task import AttributionTask, pick_output
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.compute.training.train import TrainConfig, train_weighted
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled


@dataclass
class Trajectory:
    """What a training run must record for synset methods: the initial parameters, the recipe, the checkpoints.

    A built-in recipe's run gives its ``TrainConfig``; a run of your own loop gives its ``RunRecorder``
    (``Trajectory.from_recording``), whose optimizer and learning rates the replays then follow (``config`` None)."""

    init_state: dict[str, torch.Tensor]
    config: TrainConfig | None
    checkpoints: list[dict[str, torch.Tensor]]
    recording: RunRecorder | None = None

    def __post_init__(self) -> None:
        if self.config is None and self.recording is None:
            raise TDAError("a Trajectory needs the recipe (config=TrainConfig) or the recording (recording="
                           "RunRecorder; Trajectory.from_recording(recorder) builds one)")

    @classmethod
    def from_recording(cls, recording: RunRecorder, every: int | None = None) -> Trajectory:
        """The trajectory of a finished ``RunRecorder``: its initial state, a checkpoint after every ``every`` steps
        (default: each epoch) and at the end, materialised by replaying it (whole state dicts: BatchNorm statistics
        included), and the recording itself for the replays' optimizer and schedule."""
        finished_recording(recording, "deriving its trajectory (synset methods)")
        checkpoints = [c.state_dict for c in recording.checkpoints(every=every)]
        return cls({k: v.detach().clone() for k, v in recording.initial_state.items()}, None, checkpoints,
                   recording)

    def recipe_key(self) -> dict | str:
        """The recipe (or, for a recording, the recording's fingerprint), for caches."""
        return self.config.to_dict() if self.config is not None else self.recording.fingerprint()


@dataclass
class Synset:
    """Synthetic examples standing in for clusters of the training set."""

    inputs: torch.Tensor  # [K, ...]
    labels: torch.Tensor  # [K]
    weights: torch.Tensor  # [K] float64: cluster sizes
    cluster_of: torch.Tensor  # [n] long: each training row's cluster
    matching_cosine: float  # mean layer cosine after distillation

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "labels": self.labels, "weights": self.weights, "cluster_of": self.cluster_of,
                "matching_cosine": self.matching_cosine}


def cluster_within_classes(inputs: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """k-means cluster index of each row, clusters never mixing classes (at most ``per_class`` per class)."""
    from sklearn.cluster import KMeans

    flat = inputs.reshape(len(inputs), -1).double().numpy()
    cluster_of = np.zeros(len(inputs), dtype=np.int64)
    next_id = 0
    for c in sorted(set(labels.tolist())):
        rows = np.nonzero(labels.numpy() == c)[0]
        k = min(per_class, len(rows))
        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(flat[rows]) if k > 1 else np.zeros(
            len(rows), dtype=np.int64)
        used = np.unique(assign)
        remap = {a: next_id + i for i, a in enumerate(used)}
        cluster_of[rows] = [remap[a] for a in assign]
        next_id += len(used)
    return torch.from_numpy(cluster_of)


def _cluster_gradient_sums(task: AttributionTask, train: AttributionDataset, cluster_of: torch.Tensor, k: int,
                           state: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    sums = torch.zeros(k, sum(state[n].numel() for n in task.tracked_names()), dtype=torch.float32, device=device)
    for positions, g in iter_per_sample_gradients(task.model, task.tracked_names(), train.inputs, train.labels,
                                                  task.train_loss, params=state, device=device):
        sums.index_add_(0, cluster_of[positions].to(device), g.float())
    return sums


def distill(task: AttributionTask, train: AttributionDataset, trajectory: Trajectory, per_class: int = 10,
            steps: int = 400, lr: float = 1e-2, checkpoints_per_step: int = 4, seed: int = 0,
            device: torch.device | str = "cpu") -> Synset:
    """Fit a synset to the recorded trajectory by reversed gradient matching (see the module docstring)."""
    check_positive_int(steps, "steps")
    if not trajectory.checkpoints:
        raise TDAError("the trajectory has no checkpoints: record some during training (train_model saves "
                       "config.n_checkpoints of them) to match the synset against")
    device = torch.device(device)
    cluster_of = cluster_within_classes(train.inputs, train.labels, per_class, seed)
    k = int(cluster_of.max()) + 1
    flat = train.inputs.reshape(len(train), -1).double()
    medoids, labels = [], []
    for c in range(k):
        rows = torch.nonzero(cluster_of == c).flatten()
        centre = flat[rows].mean(0)
        medoids.append(int(rows[(flat[rows] - centre).norm(dim=1).argmin()]))
        labels.append(int(train.labels[rows[0]]))
    weights = torch.bincount(cluster_of, minlength=k).double()
    names = task.tracked_names()
    targets = [_cluster_gradient_sums(task, train, cluster_of, k, ck, device) for ck in trajectory.checkpoints]
    sizes = [p.numel() for n, p in task.model.named_parameters() if n in names]
    synthetic = train.inputs[medoids].clone().to(device).requires_grad_(True)
    y = torch.tensor(labels, device=device)
    low, high = float(train.inputs.min()), float(train.inputs.max())
    base = copy.deepcopy(task.model).to("meta")

    def per_example(state: dict[str, torch.Tensor]) -> Callable:
        frozen = {n: v for n, v in state.items() if n not in names}

        def example_loss(params: dict, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = functional_call(base, {**frozen, **params}, (x.unsqueeze(0),))
            return task.train_loss(out, target.unsqueeze(0)).sum()

        return vmap(grad(example_loss), in_dims=(None, 0, 0))
    opt = torch.optim.Adam([synthetic], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    w = weights.to(device, torch.float32)[:, None]
    cosine = 0.0
    for _ in range(steps):
        picks = torch.randperm(len(targets), generator=gen)[:checkpoints_per_step].tolist()
        loss, cos_sum = 0.0, 0.0
        for t in picks:
            state = {n: v.to(device) for n, v in trajectory.checkpoints[t].items()}
            grads = per_example(state)({n: state[n] for n in names}, synthetic, y)
            g = torch.cat([grads[n].reshape(k, -1) for n in names], dim=1) * w
            for part, target in zip(g.split(sizes, dim=1), targets[t].split(sizes, dim=1)):
                cos = nn.functional.cosine_similarity(part, target, dim=1, eps=1e-12)
                loss = loss + (1 - cos).sum()
                cos_sum += float(cos.detach().mean()) / len(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            synthetic.clamp_(low, high)
        cosine = cos_sum / len(picks)
    return Synset(synthetic.detach().cpu(), y.cpu(), weights, cluster_of, cosine)


def replay(synset: Synset, weights: torch.Tensor, trajectory: Trajectory, model: nn.Module, n_train: int,
           steps_per_epoch: int = 4, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Train one model per row of ``weights`` ``[M, K]`` on the weighted synset from θ_0 (stacked parameters)."""
    if trajectory.recording is not None:
        return _replay_recorded(synset, weights, trajectory, model, n_train, steps_per_epoch, device)
    config = trajectory.config
    real_steps = -(-n_train // min(config.batch_size, n_train))
    s = min(check_positive_int(steps_per_epoch, "steps_per_epoch"), real_steps)
    lr = config.lr * real_steps / s if config.optimizer == "sgd" else config.lr
    k = len(synset.labels)
    replay_config = TrainConfig(epochs=config.epochs * s, batch_size=k, lr=lr, weight_decay=config.weight_decay,
                                optimizer=config.optimizer, seed=config.seed)
    init = {n: v.detach().clone() for n, v in trajectory.init_state.items()}

    def factory(_: int) -> nn.Module:
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(init)
        return fresh

    # train_weighted divides the weighted loss sum by the batch size (K); the objective is a mean over n examples
    scaled = weights.double() * (k / n_train)
    return train_weighted(factory, synset.inputs, synset.labels, scaled, replay_config, [config.seed] * len(weights),
                          device=device)


def replay_module(model: nn.Module, trajectory: Trajectory) -> nn.Module:
    """The module the synset replays run and are measured with: ``model`` in eval mode, or, when the recorded run
    trained BatchNorm on batch statistics, a copy whose BatchNorm layers always normalise with the batch's own
    statistics (no running statistics)."""
    r = trajectory.recording
    batch_norm = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if r is None or not r.training or not batch_norm:
        return model
    module = copy.deepcopy(model).eval()
    replace_all_batch_norm_modules_(module)
    return module


def _replay_recorded(synset: Synset, weights: torch.Tensor, trajectory: Trajectory, model: nn.Module, n_train: int,
                     steps_per_epoch: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """``replay`` for a recorded loop: the recording's optimizer class and hyperparameters over the stacked
    parameters ``[M, ...]`` (elementwise updates, so each model steps on its own), E recorded epochs × s
    full-synset steps with the recorded epoch's mean learning rate per group (SGD: scaled by its steps over s, so
    an epoch covers the same distance; adaptive optimizers keep the rate), on Σ_k w_k ℓ(s_k) / n with the
    recording's loss. Returns the stacked parameters and the (recorded final) buffers."""
    r = trajectory.recording
    device = torch.device(device)
    real = r.steps_per_epoch
    s = min(check_positive_int(steps_per_epoch, "steps_per_epoch"), real)
    n_models = len(weights)
    model = replay_module(model, trajectory)
    names = [n for n, _ in model.named_parameters()]
    kept = {n for n, _ in model.named_buffers()}
    buffers = {n: v.to(device) for n, v in r.final_state.items() if n in kept}
    params = {n: trajectory.init_state[n].detach().to(device).expand(n_models, *trajectory.init_state[n].shape)
              .clone() for n in names}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in g["params"]]}
              for g in r.groups]
    optimizer = r.optimizer_class(groups)
    scale_lr = issubclass(r.optimizer_class, torch.optim.SGD)
    base = copy.deepcopy(model).to("meta").eval()
    x, y = synset.inputs.to(device), synset.labels.to(device)
    w = weights.to(device, next(iter(params.values())).dtype)

    def objective(p: dict[str, torch.Tensor], wm: torch.Tensor) -> torch.Tensor:
        out = functional_call(base, {**buffers, **p}, (x,))
        return (wm * r.loss_fn(pick_output(out, r.output), y)).sum() / n_train

    step = vmap(grad(objective))
    rates = torch.tensor(r.learning_rates, dtype=torch.float64)  # [T, groups]
    for start in range(0, r.n_steps, real):
        epoch = rates[start : start + real]
        lrs = epoch.mean(0) * (len(epoch) / s if scale_lr else 1.0)
        for group, lr in zip(optimizer.param_groups, lrs.tolist()):
            group["lr"] = lr
        for _ in range(s):
            check_cancelled()
            grads = step(params, w)
            for k, p in params.items():
                p.grad = grads[k]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {**{k: v.detach() for k, v in params.items()},
            **{k: v.expand(n_models, *v.shape) for k, v in buffers.items()}}


def removal_weights(synset: Synset, groups: list[list[int]],
                    fractions: list[list[float]] | None = None) -> torch.Tensor:
    """Synset weights ``[len(groups), K]`` after removing each group of training *positions*."""
    out = synset.weights.repeat(len(groups), 1)
    for g, positions in enumerate(groups):
        share = torch.ones(len(positions), dtype=torch.float64) if fractions is None else torch.as_tensor(
            fractions[g], dtype=torch.float64).expand(len(positions))
        out[g].index_add_(0, synset.cluster_of[list(positions)], -share)
    return out
