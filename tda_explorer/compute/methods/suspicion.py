"""``suspicion``: a mislabel score that combines two independent signals.

    suspicion(i) = log self_influence(i) − log p_oof(y_i | x_i)

* **self-influence** of a base method (TracIn by default): how surprising example i is to the
  trained model along its training run — large for examples the model had to bend to fit;
* **out-of-fold disagreement**: the probability of the *given* label under models that never saw
  i (``folds`` folds, averaged over ``repeats`` random splits) — small when the label is implausible.

The log-sum is a product of the two: an example must be both surprising and implausible to rank
first. Adding LAVA's optimal-transport value as a third signal (z-scores summed) did not help, so it is left out
(``benchmarks/bench_valuation.py``). Pairwise scores (``attribute``) are those of the base method.

Where it is not better than its baselines (``benchmarks/bench_suspicion.py``; the figures are in
``benchmarks/README.md``, table "Suspicion beside its baselines"): against cleanlab's self-confidence ranking on the
same out-of-fold probabilities (1 − p_oof(given label), the session's "out-of-fold confidence" ranking) it is
behind on ROC-AUC on the zoo tasks synth20-logreg-adam (class-pair confusions) and reviews-transformer-adam (10%
uniform flips; there also on recall@10%), where TracIn's self-influence alone is a weak signal and drags the
product down. On the built-in digits experiments with 10% flipped labels (lr, mlp, mlp-gelu, mlp-dropout; seeds
0–2) and the other noisy zoo tasks it ties with self-confidence within one run's noise — a few ten-thousandths of
AUC and one or two examples of recall@10% either way (behind on recall@10% on digits-lr seeds 0 and 2,
digits-mlp-gelu seed 0, zoo digits-logreg-sgd, digits-mlp-dropout-sgd and digits-mlp-gelu-adamw) — and is ahead
by more than 0.001 AUC only on zoo shapes16-mlp-adam and wine-logreg-sgdm. On class-pair confusions of digits
(digits-mlp-gelu-adamw) the plain training loss beats both. So read its ranking beside the training-loss and
out-of-fold baselines that the explorer and ``evaluate`` show with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, create, option, register
from tda_explorer.compute.methods.base import Attributor, AttributorArguments, attributor_spec, shared_options
from tda_explorer.compute.training.train import TrainConfig, out_of_fold_probabilities
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class SuspicionArguments(AttributorArguments):
    base: str = option("tracin", "the method giving self-influence and the pairwise scores: any attributor's "
                                 "catalogue name but suspicion")
    base_options: dict = option(help="the base method's options; the options every attributor takes (device, "
                                     "max_memory, projection_*, store) given to suspicion are passed on unless set "
                                     "here", factory=dict, cli=False)
    oof_probabilities: torch.Tensor | None = option(None, "out-of-fold class probabilities [n_train, n_classes] from "
                                                          "your own cross-validation (instead of model_factory and "
                                                          "train_config)", config=False)
    model_factory: Callable[[int], nn.Module] | None = option(None, "with train_config, the training recipe of the "
                                                                    "out-of-fold models: seed -> a fresh model",
                                                              config=False)
    train_config: TrainConfig | None = option(None, "with model_factory, how the out-of-fold models are trained",
                                              config=False)
    folds: int = option(5, "cross-validation folds of the out-of-fold models", Interval(2, None, integer=True))
    repeats: int = option(3, "random fold splits whose out-of-fold probabilities are averaged", POSITIVE_INT)


@register("suspicion", Family.MISLABEL, SuspicionArguments, needs=("recipe",))
class Suspicion(Attributor):
    """Mislabel suspicion = log self-influence − log out-of-fold probability of the given label.

    Out-of-fold probabilities are ``oof_probabilities`` or computed here from ``model_factory`` and
    ``train_config``; self-influence and pairwise scores come from the method ``base`` built with ``base_options``.
    """

    def _setup(self) -> None:
        a = self.args
        attributor_spec(a.base, "base", self.name, a.base_options)
        if a.oof_probabilities is None and (a.model_factory is None or a.train_config is None):
            raise TDAError(
                "suspicion needs out-of-fold probabilities: pass oof_probabilities= (an [n_train, n_classes] "
                "tensor from your own cross-validation) or model_factory= and train_config= to compute them"
            )
        self.base = create(a.base, self.task, **{**shared_options(a), **a.base_options})
        self.oof_probabilities = a.oof_probabilities
        self.model_factory, self.train_config = a.model_factory, a.train_config
        self.folds, self.repeats = a.folds, a.repeats

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
