"""``suspicion``: a mislabel score that combines two independent signals.

    suspicion(i) = log self_influence(i) − log p_oof(y_i | x_i)

* **self-influence** of a base method (TracIn by default): how surprising example i is to the
  trained model along its training run — large for examples the model had to bend to fit;
* **out-of-fold disagreement**: the probability of the *given* label under models that never saw
  i (``folds`` folds, averaged over ``repeats`` random splits) — small when the label is implausible.

The log-sum is a product of the two: an example must be both surprising and implausible to rank
first. Measured on digits-MLP with 10% flipped labels (seeds 0–2), it beat each signal alone and
rank averaging: ROC-AUC 0.9974–0.9988, recall after inspecting 10% 0.93–0.95 (TracIn alone
0.9962–0.9981 / 0.89–0.96; out-of-fold alone 0.9958–0.9988 / 0.91–0.94). Adding LAVA's optimal-transport value
as a third signal (z-scores summed) did not help on the same seeds (mean AUC 0.9970 against 0.9979, recall at 10%
0.93 against 0.94), so it is left out (``benchmarks/bench_valuation.py`` repeats the measurement). Pairwise scores
(``attribute``) are those of the base method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.training.train import TrainConfig, out_of_fold_probabilities
from tda_explorer.data.dataset import AttributionDataset


class Suspicion(Attributor):
    """Mislabel suspicion = log self-influence − log out-of-fold probability of the given label.

    Parameters
    ----------
    task : AttributionTask
    base : str
        Registry name of the method giving self-influence and pairwise scores (default "tracin").
    oof_probabilities : Tensor [n_train, C], optional
        Out-of-fold class probabilities computed elsewhere (e.g. by your own cross-validation).
    model_factory : callable seed -> nn.Module, optional
        With ``train_config``: the training recipe used to compute out-of-fold probabilities here.
    train_config : TrainConfig, optional
    folds, repeats : int
        Cross-validation folds and how many random fold splits are averaged.
    **base_config
        Passed to the base method.
    """

    name = "suspicion"

    def __init__(self, task: AttributionTask, *, base: str = "tracin", oof_probabilities: torch.Tensor | None = None,
                 model_factory: Callable[[int], nn.Module] | None = None, train_config: TrainConfig | None = None,
                 folds: int = 5, repeats: int = 3, **base_config):
        from tda_explorer.compute.methods import get_method

        super().__init__(task, device=base_config.get("device"), max_memory=base_config.get("max_memory"))
        if base == self.name:
            raise TDAError("base must be another method than 'suspicion'")
        self.base = get_method(base, task, **base_config)
        if oof_probabilities is None and (model_factory is None or train_config is None):
            raise TDAError(
                "suspicion needs out-of-fold probabilities: pass oof_probabilities= (an [n_train, n_classes] "
                "tensor from your own cross-validation) or model_factory= and train_config= to compute them"
            )
        self.oof_probabilities = oof_probabilities
        self.model_factory, self.train_config = model_factory, train_config
        self.folds = check_positive_int(folds, "folds")
        self.repeats = check_positive_int(repeats, "repeats")

    def config(self) -> dict:
        return {"base": self.base.name, "base_config": self.base.config(), "folds": self.folds,
                "repeats": self.repeats}

    def _fit(self, train: AttributionDataset) -> None:
        self.base.fit(train)
        probs = self.oof_probabilities
        if probs is None:
            probs = sum(
                out_of_fold_probabilities(self.model_factory, train.inputs, train.labels, self.train_config,
                                          folds=self.folds, seed=self.train_config.seed * 1000 + r, device=self.device)
                for r in range(self.repeats)
            ) / self.repeats
        if probs.shape != (len(train), train.n_classes):
            raise TDAError(
                f"oof_probabilities must be [n_train, n_classes] = [{len(train)}, {train.n_classes}], "
                f"got {tuple(probs.shape)}"
            )
        self.oof_ = probs.float()

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return self.base._attribute(test)

    def _self_influence(self) -> torch.Tensor:
        labels = self.train_.labels
        p_given = self.oof_.cpu()[torch.arange(len(labels)), labels].clamp_min(1e-12)
        surprise = self.base._self_influence().double().cpu().clamp_min(1e-30)
        return surprise.log() - p_given.double().log()
