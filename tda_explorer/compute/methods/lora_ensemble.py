"""LoRA ensemble (Deng, Li, Zhang, Ma, 2024): M low-rank adapters on the frozen trained model, each fine-tuned
briefly with its own seed; an inner method (TRAK by default) attributes each adapted model through its adapter
parameters only, and the scores are averaged — ensemble members for the price of a few adapter epochs instead of M
trainings from scratch. ``training_seconds_`` and ``stored_bytes_`` say what it cost.
"""

from __future__ import annotations

import time

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.training.lora import adapter_names, add_lora, train_adapters
from tda_explorer.data.dataset import AttributionDataset


def stored_bytes(attributor: Attributor) -> int:
    """Bytes of the fitted state an attributor keeps (its tensors, and those in its lists and dicts)."""
    total = 0
    for value in vars(attributor).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
    return total


class LoRAEnsemble(Attributor):
    """Average of ``inner`` over ``members`` LoRA-adapted copies of the task's model.

    Parameters
    ----------
    members : int
        M adapters (seeds 0 … M−1).
    rank : int
        Adapter rank (1 … the narrower side of each Linear layer).
    epochs, lr, batch_size
        Each adapter's fine-tuning (Adam on the mean training loss).
    inner, inner_options
        The method run on each adapted model (over its adapter parameters).
    """

    name = "lora-ensemble"

    def __init__(self, task: AttributionTask, *, members: int = 5, rank: int = 4, epochs: int = 3, lr: float = 1e-2,
                 batch_size: int = 64, inner: str = "trak", inner_options: dict | None = None, **kwargs):
        super().__init__(task, **kwargs)
        from tda_explorer.compute.methods import METHODS

        if inner not in METHODS or inner == self.name:
            raise TDAError(f"inner must be one of {sorted(m for m in METHODS if m != self.name)}, got {inner!r}")
        self.members = check_positive_int(members, "members")
        self.rank = rank
        add_lora(task.model, rank)  # validates the rank against every layer now, not after training
        self.epochs, self.lr = check_positive_int(epochs, "epochs"), float(lr)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.inner, self.inner_options = inner, dict(inner_options or {})

    def config(self) -> dict:
        return {**super().config(), "members": self.members, "rank": self.rank, "epochs": self.epochs, "lr": self.lr,
                "inner": self.inner, "inner_options": self.inner_options}

    def _fit(self, train: AttributionDataset) -> None:
        from tda_explorer.compute.methods import get_method

        self.attributors_, self.training_seconds_ = [], 0.0
        for seed in range(self.members):
            started = time.perf_counter()
            model = add_lora(self.task.model, self.rank, seed=seed).to(self.device)
            train_adapters(model, train.inputs.to(self.device), train.labels.to(self.device), self.epochs, self.lr,
                           min(self.batch_size, len(train)), seed, self.task.train_loss)
            self.training_seconds_ += time.perf_counter() - started
            task = AttributionTask(model, parameters=adapter_names(model), measurement=self.task.measurement,
                                   loss_fn=self.task.loss_fn, access=self.task.access)
            self.attributors_.append(get_method(self.inner, task, device=self.device, **self.inner_options).fit(train))
        self.stored_bytes_ = sum(stored_bytes(a) for a in self.attributors_)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return torch.stack([a.attribute(test).scores for a in self.attributors_]).mean(0)

    def _self_influence(self) -> torch.Tensor:
        return torch.stack([a.self_influence() for a in self.attributors_]).mean(0)
