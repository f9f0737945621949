"""TracIn-CP: gradient inner products summed over checkpoints, weighted by their learning rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import Family, option, register
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class TracInArguments(AttributorArguments):
    checkpoints: Sequence[dict] | None = option(None, "state dicts to sum over instead of the task's checkpoints "
                                                      "(None: the task's, each with its learning rate)", config=False)
    learning_rates: Sequence[float] | None = option(None, "the learning rate at each of checkpoints=, one per "
                                                          "checkpoint (required with checkpoints=, refused without)",
                                                    cli=False)


@register("tracin", Family.PAIRWISE, TracInArguments, needs=("checkpoints",))
class TracIn(Attributor):
    """τ(z, z′) = Σ_k η_k ∇f(z′; θ_k)ᵀ ∇ℓ(z; θ_k) over the task's checkpoints (Pruthi et al. 2020).

    The checkpoints are the task's (each with its learning rate), or ``checkpoints=`` with ``learning_rates=``.
    """

    def _setup(self) -> None:
        a, task = self.args, self.task
        checkpoints, learning_rates = a.checkpoints, a.learning_rates
        if checkpoints is None:
            if learning_rates is not None:
                raise TDAError("learning_rates given without checkpoints; pass both or neither")
            if not task.checkpoints:
                raise TDAError(
                    "TracIn needs checkpoints: record them while training (train_model(..., "
                    "n_checkpoints=K)) or pass checkpoints= and learning_rates="
                )
            checkpoints = [c.state_dict for c in task.checkpoints]
            learning_rates = [c.learning_rate for c in task.checkpoints]
        elif learning_rates is None or len(learning_rates) != len(checkpoints):
            got = None if learning_rates is None else len(learning_rates)
            raise TDAError(
                f"checkpoints and learning_rates must have the same length, got {len(checkpoints)} "
                f"checkpoints and {got} learning rates"
            )
        self.checkpoints = list(checkpoints)
        self.learning_rates = [float(x) for x in learning_rates]

    def _params(self, state: dict) -> dict:
        return {k: state[k] for k in self.task.tracked_names()}

    def _fit(self, train: AttributionDataset) -> None:
        self.train_grads_ = [
            self._features(train, test=False, params=self._params(c), tag=f"ckpt{i}")
            for i, c in enumerate(self.checkpoints)
        ]

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        scores = torch.zeros(len(test), len(self.train_), device=self.device)
        for lr, state, g_train in zip(self.learning_rates, self.checkpoints, self.train_grads_):
            g_test = self._features(test, test=True, params=self._params(state))
            scores += lr * (g_test @ g_train.T)
        return scores

    def _self_influence(self) -> torch.Tensor:
        return sum(lr * (g * g).sum(dim=1) for lr, g in zip(self.learning_rates, self.train_grads_))
