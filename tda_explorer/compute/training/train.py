"""Training with recorded checkpoints, and batched training of many models on many subsets.

One procedure serves both: training a single model is training an ensemble of one on the full
set, so the model being attributed and the retrained ground-truth models follow the same recipe.
Models are trained in lock-step with ``torch.func`` (``vmap`` over stacked parameters, which one ``torch.optim``
optimizer steps), which is what makes 100 retrainings for LDS cheap on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm.auto import tqdm

from tda_explorer._validation import TDAError, as_device, check_choice, check_positive_int
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.jobs import check_cancelled


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained: full objective = mean cross-entropy + weight_decay/2 · ‖θ‖².

    ``optimizer``: "sgd" (with ``momentum``, heavy ball), "adam", or "adamw", whose weight decay is decoupled (the
    optimizer shrinks the weights by lr · weight_decay each step; the loss has no L2 term)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-3
    optimizer: str = "adam"
    n_checkpoints: int = 5
    seed: int = 0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_choice(self.optimizer, "optimizer", ("adam", "adamw", "sgd"))
        if not self.lr > 0:
            raise TDAError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise TDAError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1 or (self.momentum and self.optimizer != "sgd"):
            raise TDAError(f"momentum must be in [0, 1) and is SGD's only (optimizer='sgd'), got {self.momentum} "
                           f"with {self.optimizer!r}")

    @property
    def loss_weight_decay(self) -> float:
        """The L2 term's coefficient in the loss: ``weight_decay``, except for AdamW, whose decay is decoupled
        (applied by the optimizer step, not through the gradient)."""
        return 0.0 if self.optimizer == "adamw" else self.weight_decay

    def implicit_damping(self, n_train: int) -> float | None:
        """The ridge λ that this run's gradient steps amount to, ``(1 − momentum) / (lr · steps)``: T steps of
        gradient descent at rate η from the initial weights fit about what the objective + λ/2 ‖θ − θ₀‖² with
        λ = 1 / (ηT) does (heavy-ball momentum μ: rate η / (1 − μ)). None for Adam / AdamW, whose per-parameter rates
        the recipe does not give."""
        if self.optimizer != "sgd":
            return None
        return (1.0 - self.momentum) / (self.lr * self.steps(n_train))

    def steps(self, n_train: int) -> int:
        """The optimizer steps this recipe takes on ``n_train`` examples: ``epochs`` × ⌈n_train / batch_size⌉."""
        return self.epochs * -(-check_positive_int(n_train, "n_train") // self.batch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.momentum:  # absent at its default, so the fingerprints of earlier recipes do not change
            d.pop("momentum")
        return d


@dataclass
class Checkpoint:
    """Parameters saved during training with the learning rate in force there.

    ``optimizer`` names the kind of optimizer whose steps led here ("sgd", "adam", "adamw", …: the class name in
    lower case), and ``optimizer_state`` holds what it had accumulated, by parameter name (Adam/AdamW: ``exp_avg``,
    ``exp_avg_sq``, ``step``, ``betas``, ``eps``; see ``compute.training.optimizer_state``). Methods that read the
    update direction (TracIn) use them and never take an Adam run for SGD.
    """

    state_dict: dict[str, torch.Tensor]
    learning_rate: float
    step: int
    optimizer: str = "sgd"
    optimizer_state: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise TDAError(f"optimizer must name the optimizer's kind ('sgd', 'adam', 'adamw', …), got "
                           f"{self.optimizer!r}")
        self.optimizer = self.optimizer.lower()
        if self.optimizer_state is not None and not isinstance(self.optimizer_state, dict):
            raise TDAError(f"optimizer_state must be a dict (or None), got {type(self.optimizer_state).__name__}")


@dataclass
class TrainingRecord:
    """What one training run leaves behind: the final model and its checkpoints."""

    model: nn.Module
    config: TrainConfig
    checkpoints: list[Checkpoint] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _objective(base: nn.Module, weight_decay: float) -> Callable:
    def loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(base, params, (x,))
        ce = cross_entropy(out, y).mean()
        if weight_decay:
            ce = ce + 0.5 * weight_decay * sum((p * p).sum() for p in params.values())
        return ce

    return loss


def check_lock_step(model: nn.Module) -> None:
    """Refuse a model the lock-step engine cannot train: one with running statistics (torch's BatchNorm), which the
    engine's functional steps neither keep nor may update in place."""
    tracking = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if tracking:
        raise TDAError(f"model_factory: the built-in training engine trains models in lock-step as pure functions of "
                       f"their parameters, and cannot keep the running statistics of {', '.join(tracking[:3])}; "
                       "train those models yourself: suspicion takes oof_probabilities= (your own cross-validation), "
                       "a Session retrain= (your own training function)")


def has_active_dropout(model: nn.Module) -> bool:
    """Whether ``model`` in its current mode draws Dropout masks (training mode and a Dropout with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules())


def _gradient_step(base: nn.Module, objective: Callable, seed: int, device: torch.device) -> Callable:
    """``step(t, *args)``: ``vmap(grad(objective))`` over stacked models. When ``base`` has active Dropout, each model
    draws its own masks from a stream seeded by ``seed`` and the step ``t`` (a rerun draws the same masks), and the
    caller's global RNG state is left as it was."""
    stochastic = has_active_dropout(base)
    gradients = vmap(grad(objective), randomness="different" if stochastic else "error")
    if not stochastic:
        return lambda t, *args: gradients(*args)
    devices = [] if device.type == "cpu" else [device]

    def step(t: int, *args):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed) * 1_000_003 + t)
            return gradients(*args)

    return step


def _optimizer(params: dict[str, torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim``'s SGD (with ``config.momentum``), Adam or AdamW (default betas and eps) over the stacked
    parameters ``[M, ...]``, updated in place: their updates are elementwise, so each of the M models takes its own
    step, in lock-step."""
    tensors = list(params.values())
    if config.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(tensors, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(tensors, lr=config.lr)


def _optimizer_step(optimizer: torch.optim.Optimizer, params: dict, grads: dict) -> None:
    """One step of ``optimizer`` on the stacked ``params`` with the stacked ``grads`` (name -> [M, ...])."""
    for k, p in params.items():
        p.grad = grads[k]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the parameters handed back carry no gradients


class EnsembleTrainer:
    """Trains one model per row of ``subsets`` (positions into ``inputs``) in lock-step.

    Resumable: ``run(epochs)`` continues from the current parameters and optimizer state, so
    checkpoints can be taken between segments.

    Parameters
    ----------
    model_factory : callable seed -> nn.Module
        Builds a freshly initialised model for a seed.
    subsets : LongTensor [M, m]
        Row positions each model trains on (equal sizes).
    seeds : list of int, optional
        Initialisation seed per model (default: ``config.seed`` for all).
    """

    def __init__(
        self,
        model_factory: Callable[[int], nn.Module],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        subsets: torch.Tensor,
        config: TrainConfig,
        seeds: list[int] | None = None,
        device: str | torch.device | None = None,
    ):
        if subsets.dim() != 2 or subsets.shape[1] == 0:
            raise TDAError(
                f"subsets must be [n_models, subset_size] with subset_size > 0, got {tuple(subsets.shape)}"
            )
        self.config, self.dev = config, as_device(device)
        seeds = seeds if seeds is not None else [config.seed] * len(subsets)
        models = [model_factory(s).to(self.dev) for s in seeds]
        check_lock_step(models[0])
        params, _ = stack_module_state(models)
        self.params = {k: v.detach().clone() for k, v in params.items()}
        base = copy.deepcopy(models[0]).to("meta")
        self.step_fn = _gradient_step(base, _objective(base, config.loss_weight_decay), seeds[0], self.dev)
        self.inputs, self.labels = inputs.to(self.dev), labels.to(self.dev)
        self.subsets = subsets.to(self.dev)
        self.gen = torch.Generator(device="cpu").manual_seed(int(seeds[0]) * 7919 + 17)
        self.optimizer = _optimizer(self.params, config)
        self.t = 0

    def run(self, epochs: int) -> dict[str, torch.Tensor]:
        """Train ``epochs`` more epochs; return the stacked parameters (name -> [M, ...])."""
        c, (n_models, m) = self.config, self.subsets.shape
        bs = min(c.batch_size, m)
        for _ in range(epochs):
            check_cancelled()
            order = torch.argsort(torch.rand(n_models, m, generator=self.gen), dim=1).to(self.dev)
            shuffled = torch.gather(self.subsets, 1, order)
            for start in range(0, m, bs):
                idx = shuffled[:, start : start + bs]
                grads = self.step_fn(self.t, self.params, self.inputs[idx], self.labels[idx])
                self.t += 1
                _optimizer_step(self.optimizer, self.params, grads)
        return self.params

    def optimizer_state(self, member: int = 0) -> dict | None:
        """Model ``member``'s Adam moments now, by parameter name, on the CPU (what an Adam-aware score needs at a
        checkpoint: ``Checkpoint.optimizer_state``); None for SGD."""
        if self.config.optimizer == "sgd":
            return None
        group = self.optimizer.param_groups[0]
        moments: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
        step = 0
        for name, p in self.params.items():
            held = self.optimizer.state.get(p, {})
            for key in moments:
                value = held.get(key)
                moments[key][name] = (torch.zeros_like(p[member], device="cpu") if value is None
                                      else value[member].detach().to("cpu", copy=True))
            step = int(held["step"]) if "step" in held else step
        return {**moments, "step": step, "betas": tuple(float(b) for b in group["betas"]), "eps": float(group["eps"])}


def train_ensemble(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    subsets: torch.Tensor,
    config: TrainConfig,
    seeds: list[int] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Train one model per row of ``subsets`` for ``config.epochs``; return stacked parameters."""
    trainer = EnsembleTrainer(model_factory, inputs, labels, subsets, config, seeds, device)
    return trainer.run(config.epochs)


def train_weighted(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    config: TrainConfig,
    seeds: list[int],
    device: str | torch.device | None = None,
    callback: Callable[[int, torch.Tensor, dict[str, torch.Tensor], float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train one model per row of ``weights`` ``[M, n]`` in lock-step, each on its seed's batch order.

    Model m starts from ``model_factory(seeds[m])`` and walks the batches of a permutation of all n examples
    drawn from its seed, so two rows with the same seed share initialisation and batches. Example i's loss counts
    with weight ``weights[m, i]`` and the batch mean still divides by the batch size: a weight of 0 drops exactly
    that example's term from the steps it was in (trajectory-specific leave-one-out), a fraction down-weights it.
    ``callback(step, batch_positions, params, lr)`` (one model only) sees every step before its update — the
    hook a recorder uses (``StepRecorder``); ``params`` are views of the parameters the step then updates in place,
    so a callback that keeps them clones them.
    """
    if weights.dim() != 2 or weights.shape[1] != len(labels):
        raise TDAError(f"weights must be [n_models, {len(labels)}], got {tuple(weights.shape)}")
    if len(seeds) != len(weights):
        raise TDAError(f"seeds must have one entry per row of weights ({len(weights)}), got {len(seeds)}")
    if callback is not None and len(weights) != 1:
        raise TDAError(f"a step callback records one training run; got {len(weights)} models")
    dev = as_device(device)
    models = [model_factory(s).to(dev) for s in seeds]
    check_lock_step(models[0])
    stacked, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in stacked.items()}
    base = copy.deepcopy(models[0]).to("meta")
    n, bs = len(labels), min(config.batch_size, len(labels))

    def objective(p: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ce = cross_entropy(functional_call(base, p, (x,)), y)
        loss = (w * ce).sum() / bs
        if config.loss_weight_decay:
            loss = loss + 0.5 * config.loss_weight_decay * sum((q * q).sum() for q in p.values())
        return loss

    step_fn = _gradient_step(base, objective, seeds[0], dev)
    inputs, labels, weights = inputs.to(dev), labels.to(dev), weights.to(dev, next(iter(params.values())).dtype)
    gens = [torch.Generator().manual_seed(int(s) * 7919 + 17) for s in seeds]
    optimizer = _optimizer(params, config)
    t = 0
    for _ in range(config.epochs):
        check_cancelled()
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)
        for start in range(0, n, bs):
            idx = order[:, start : start + bs]
            if callback is not None:
                callback(t, idx[0], {k: v[0] for k, v in params.items()}, config.lr)
            grads = step_fn(t, params, inputs[idx], labels[idx], torch.gather(weights, 1, idx))
            t += 1
            _optimizer_step(optimizer, params, grads)
    return params


def stacked_outputs(model: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
                    device: str | torch.device | None = None) -> torch.Tensor:
    """Outputs ``[M, n, ...]`` of ``model``'s architecture under each of M stacked parameter sets (no grad), in
    evaluation mode. Buffers the stack does not hold (BatchNorm's running statistics) are ``model``'s own, shared by
    the M models: the functional training steps the parameters only."""
    base = copy.deepcopy(model).to("meta").eval()
    x = inputs.to(as_device(device))
    buffers = {k: v.to(x.device) for k, v in model.named_buffers() if k not in params}
    with torch.no_grad():
        return vmap(lambda p: functional_call(base, {**buffers, **p}, (x,)))(params)


def unstack(params: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The parameters of model ``index`` from a stacked dict."""
    return {k: v[index].detach().clone() for k, v in params.items()}


def _checkpoint_schedule(config: TrainConfig, n: int) -> tuple[list[int], int]:
    """The epochs after which ``config.n_checkpoints`` evenly spaced checkpoints are taken, and steps per epoch."""
    n_ckpt = check_positive_int(config.n_checkpoints, "n_checkpoints")
    return sorted({round(config.epochs * (i + 1) / n_ckpt) for i in range(n_ckpt)}), -(-n // min(config.batch_size, n))


def train_model(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> TrainingRecord:
    """Train one model on all rows, saving ``config.n_checkpoints`` evenly spaced checkpoints.

    Checkpoints are taken at the end of evenly spaced epochs (the last one is the final model),
    each with the learning rate in force, as TracIn-CP needs.
    """
    epochs_at, steps_per_epoch = _checkpoint_schedule(config, len(labels))
    all_rows = torch.arange(len(labels)).unsqueeze(0)
    record = TrainingRecord(model=model_factory(config.seed), config=config)
    done, params = 0, None
    # Train segment by segment; each segment continues from the last parameters and optimizer clock.
    trainer = EnsembleTrainer(model_factory, inputs, labels, all_rows, config, device=device)
    bar = tqdm(total=config.epochs, desc="training", unit="epoch", leave=False, disable=not progress)
    for epoch in epochs_at:
        params = trainer.run(epoch - done)
        bar.update(epoch - done)
        done = epoch
        record.checkpoints.append(Checkpoint(unstack(params, 0), config.lr, step=done * steps_per_epoch,
                                             optimizer=config.optimizer, optimizer_state=trainer.optimizer_state(0)))
    bar.close()
    record.model.load_state_dict(unstack(params, 0))
    record.model.eval()
    return record


def replay_record(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    device: str | torch.device | None = None,
) -> TrainingRecord:
    """The recipe's run as the retraining engine replays it (``train_weighted`` at w = 1 for ``config.seed``), with
    ``config.n_checkpoints`` end-of-epoch checkpoints as ``train_model`` takes them: the model that same-seed
    removals (zeroed weights, same initialisation and batch order) perturb."""
    epochs_at, steps_per_epoch = _checkpoint_schedule(config, len(labels))
    record = TrainingRecord(model=model_factory(config.seed), config=config)
    at_steps = {e * steps_per_epoch for e in epochs_at if e < config.epochs}

    def take(step: int, positions: torch.Tensor, params: dict, lr: float) -> None:
        if step in at_steps:
            state = {k: v.detach().clone() for k, v in params.items()}
            record.checkpoints.append(Checkpoint(state, config.lr, step=step, optimizer=config.optimizer))

    final = train_weighted(model_factory, inputs, labels, torch.ones(1, len(labels)), config, [config.seed],
                           device=device, callback=take)
    state = unstack(final, 0)
    # the replay's optimizer kind is recorded (its Adam moments are not: an Adam-aware score then refuses, never
    # reading the run as SGD)
    record.checkpoints.append(Checkpoint(state, config.lr, step=config.epochs * steps_per_epoch,
                                         optimizer=config.optimizer))
    record.model.load_state_dict(state)
    record.model.eval()
    return record


def out_of_fold_probabilities(
    model_factory: Callable[[int], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    folds: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Class probabilities ``[n, C]`` of each example from a model that never saw it.

    The ``folds`` models (one per held-out fold, same recipe) train together in lock-step; each
    trains on all other folds (truncated to a common size, dropping at most folds−1 examples).
    """
    folds = check_positive_int(folds, "folds")
    n = len(labels)
    if folds < 2 or folds > n:
        raise TDAError(f"folds must be between 2 and the number of examples ({n}), got {folds}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held_out = list(torch.tensor_split(perm, folds))
    kept = [perm[~torch.isin(perm, h)] for h in held_out]
    size = min(len(k) for k in kept)
    subsets = torch.stack([k[:size] for k in kept])
    params = train_ensemble(model_factory, inputs, labels, subsets, config,
                            seeds=[config.seed + 1 + f for f in range(folds)], device=device)
    base = model_factory(config.seed).to("meta")
    probs = None
    with torch.no_grad():
        for f, rows in enumerate(held_out):
            out = functional_call(base, unstack(params, f), (inputs[rows].to(params[next(iter(params))].device),))
            if probs is None:
                probs = torch.zeros(n, out.shape[1])
            probs[rows] = out.softmax(-1).cpu().float()
    return probs
