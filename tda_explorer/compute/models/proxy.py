"""Proxy models for attribution when access to the target is limited (Zhang, Deng, Bae, Ma, 2025).

Four proxies, each standing in for an access level the target leaves:
- ``hparams`` (architecture only): the same architecture retrained on the training set with guessed
  hyperparameters — by default 3× the learning rate, 40% of the epochs and another seed (the recipe's guess);
- ``distill`` (query access, architecture known): the same architecture trained on the training set towards the
  target's outputs, loss (1 − β)·CE(y, f_p) + β·T²·KL(softmax(Q(x)/T) ‖ softmax(f_p(x)/T)), β = 0.5, T = 2, the
  queries being the training inputs (one query per training example: the budget this needs);
- ``small`` (query access only): a smaller architecture (for an MLP, two hidden layers of half the width)
  distilled the same way;
- ``init`` (limited compute): the architecture at a random initialisation, never trained.
Every proxy carries end-of-epoch checkpoints like ``train_model`` (TracIn needs them). Attribution runs on the
proxy; evaluation always scores it against the *target's* ground truth.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.training.optimizer_state import capture_optimizer_state, optimizer_kind
from tda_explorer.compute.training.train import (
    Checkpoint,
    TrainConfig,
    TrainingRecord,
    _checkpoint_schedule,
    train_model,
)
from tda_explorer.jobs import check_cancelled

PROXY_KINDS = ("hparams", "distill", "small", "init")
PROXY_ACCESS = {"hparams": "architecture", "distill": "query", "small": "query", "init": "architecture"}


def query_outputs(query: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The target's logits (or log-probabilities) for ``inputs``, checked: ``[n, n_classes]`` and finite."""
    if not callable(query):
        raise TDAError("query must be a callable inputs -> logits (or probabilities) of the target model; query "
                       "access without one cannot be distilled")
    with torch.no_grad():
        out = torch.as_tensor(query(inputs)).float()
    if out.shape != (len(inputs), n_classes):
        raise TDAError(f"query returned shape {tuple(out.shape)}; expected [n_inputs, n_classes] = "
                       f"[{len(inputs)}, {n_classes}]")
    if not torch.isfinite(out).all():
        raise TDAError("query returned NaN or inf")
    if (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-4):
        out = out.clamp_min(1e-12).log()  # probabilities: their logs are logits up to a constant
    return out


def distill(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
            config: TrainConfig, beta: float = 0.5, temperature: float = 2.0) -> TrainingRecord:
    """Train ``student`` towards ``teacher_logits`` and the labels (see the module docstring), with checkpoints."""
    if not 0 <= beta <= 1:
        raise TDAError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise TDAError(f"temperature must be > 0, got {temperature}")
    epochs_at, steps_per_epoch = _checkpoint_schedule(config, len(labels))
    optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.SGD
    optimizer = optimizer_class(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    record = TrainingRecord(model=student, config=config)
    target = torch.softmax(teacher_logits / temperature, dim=1)
    gen = torch.Generator().manual_seed(config.seed)
    bs = min(config.batch_size, len(labels))
    student.train()
    for epoch in range(1, config.epochs + 1):
        check_cancelled()
        for rows in torch.randperm(len(labels), generator=gen).split(bs):
            out = student(inputs[rows])
            soft = nn.functional.kl_div(torch.log_softmax(out / temperature, 1), target[rows], reduction="batchmean")
            loss = (1 - beta) * cross_entropy(out, labels[rows]).mean() + beta * temperature**2 * soft
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch in epochs_at:
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            record.checkpoints.append(Checkpoint(state, config.lr, step=epoch * steps_per_epoch,
                                                 optimizer=optimizer_kind(optimizer),
                                                 optimizer_state=capture_optimizer_state(student, optimizer)))
    student.eval()
    return record


def smaller_architecture(model: nn.Module, seed: int) -> nn.Module:
    """A smaller stand-in architecture: an MLP (Linear–activation–Linear) becomes two hidden layers of half the
    width; other architectures are refused by name."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not (isinstance(model, nn.Sequential) and len(linears) == 2):
        raise TDAError(f"proxy 'small' knows how to shrink a one-hidden-layer MLP; got {type(model).__name__} with "
                       f"{len(linears)} Linear layers: pass your own smaller architecture")
    n_in, hidden, n_out = linears[0].in_features, linears[0].out_features, linears[1].out_features
    width = max(1, hidden // 2)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, n_out))
    finally:
        torch.random.set_rng_state(state)


def build_proxy(kind: str, factory: Callable[[int], nn.Module], inputs: torch.Tensor, labels: torch.Tensor,
                config: TrainConfig, query: Callable[[torch.Tensor], torch.Tensor] | None = None,
                seed: int | None = None) -> TrainingRecord:
    """A proxy of the kind ``kind`` for a target of architecture ``factory`` trained with ``config`` on
    (``inputs``, ``labels``); ``query`` is the target's output function (``distill`` and ``small``)."""
    check_choice(kind, "proxy", PROXY_KINDS)
    seed = config.seed + 1 if seed is None else seed
    if kind == "hparams":
        guess = replace(config, lr=3 * config.lr, epochs=max(1, round(0.4 * config.epochs)), seed=seed)
        return train_model(factory, inputs, labels, guess)
    if kind == "init":
        model = factory(seed).eval()
        return TrainingRecord(model, config, [Checkpoint(copy.deepcopy(model.state_dict()), config.lr, 0)])
    student = factory(seed) if kind == "distill" else smaller_architecture(factory(seed), seed)
    n_classes = next(m for m in reversed(list(student.modules())) if isinstance(m, nn.Linear)).out_features
    teacher = query_outputs(query, inputs, n_classes)
    return distill(student, inputs, labels, teacher, replace(config, seed=seed))
