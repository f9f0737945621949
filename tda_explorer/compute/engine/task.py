"""``AttributionTask``: *what* is attributed — kept apart from *how* (the attributors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.compute.engine.losses import cross_entropy, neg_margin
from tda_explorer.compute.training.train import Checkpoint

MEASUREMENTS = ("loss", "margin")
ACCESS_LEVELS = ("full", "architecture", "query", "final-model")


@dataclass
class AttributionTask:
    """The model, its training loss, the test measurement and the tracked parameters.

    Sign convention: both the training loss and the measurement are *loss-oriented* (lower is
    better), so a positive score means the training example lowers the test measurement's loss:
    a proponent, whose removal would raise it.

    Parameters
    ----------
    model : nn.Module
        The trained model (final parameters).
    checkpoints : list of Checkpoint
        Parameters saved during training with their learning rates (for TracIn and ensembles).
    measurement : {"loss", "margin"}
        What is attributed on a test example: its cross-entropy, or TRAK's (negated) margin.
    parameters : None, "last_layer" or list of str
        Which parameters are tracked: all trainable (None), those of the last module with
        parameters, or those whose name starts with one of the given prefixes.
    loss_fn : callable (outputs, targets) -> per-example loss
        Training loss per example (cross-entropy by default).
    weight_decay : float
        L2 coefficient of the training objective (enters curvature-based methods).
    access : {"full", "architecture", "query", "final-model"}
        What was available of the model attributed: everything, its architecture only (a proxy retrained with
        guessed hyperparameters), query access only (a distilled proxy), or the final model only. Recorded with
        every result so a reader knows how far to trust it.
    """

    model: nn.Module
    checkpoints: Sequence[Checkpoint] = field(default_factory=list)
    measurement: str = "loss"
    parameters: None | str | Sequence[str] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    weight_decay: float = 0.0
    access: str = "full"

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TDAError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        check_choice(self.measurement, "measurement", MEASUREMENTS)
        check_choice(self.access, "access", ACCESS_LEVELS)
        self.tracked_names()  # validates ``parameters``

    def tracked_names(self) -> list[str]:
        """Names of the tracked parameters, in the model's order."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.parameters is None:
            names = [n for n, _ in named]
        elif self.parameters == "last_layer":
            last = [m for m in self.model.modules() if any(True for _ in m.parameters(recurse=False))][-1]
            ids = {id(p) for p in last.parameters(recurse=False)}
            names = [n for n, p in named if id(p) in ids]
        elif isinstance(self.parameters, str):
            raise TDAError(
                f"parameters must be None, 'last_layer' or a list of name prefixes, got {self.parameters!r}"
            )
        else:
            prefixes = list(self.parameters)
            names = [n for n, _ in named if any(n == q or n.startswith(q + ".") for q in prefixes)]
        if not names:
            available = sorted({n.rsplit(".", 1)[0] for n, _ in named})
            raise TDAError(
                f"parameters={self.parameters!r} selects no trainable parameter; modules with parameters: "
                f"{available}"
            )
        return names

    def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example training loss."""
        return self.loss_fn(outputs, targets)

    def test_measurement(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example loss-oriented measurement on test examples."""
        return self.loss_fn(outputs, targets) if self.measurement == "loss" else neg_margin(outputs, targets)

    def config(self) -> dict:
        """A JSON-able description used in fingerprints."""
        return {
            "measurement": self.measurement,
            "parameters": self.parameters if self.parameters is None or isinstance(self.parameters, str)
            else list(self.parameters),
            "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
            "weight_decay": self.weight_decay,
            "n_checkpoints": len(self.checkpoints),
            "access": self.access,
        }
