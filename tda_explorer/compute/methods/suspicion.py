"""``suspicion``: a mislabel score that asks both the models that never saw an example and the model that did.

    suspicion(i) = −log p_oof(y_i | x_i) − log p_model(y_i | x_i)                        (signal="loss", default)
    suspicion(i) = −log p_oof(y_i | x_i) + log self_influence(i)                          (signal="self-influence")

* **out-of-fold disagreement**: the probability of the *given* label under models that never saw i (``folds`` folds,
  averaged over ``repeats`` random splits) — small when the label is implausible from the rest of the data;
* **in-sample**: by default the attributed model's own training loss at the given label (−log p_model, in the same
  units), so the sum is the negative log of the product of the two probabilities: an example must be implausible to
  both to rank first. ``signal="self-influence"`` takes the base method's self-influence (TracIn by default) instead,
  an unscaled quantity that also grows with the example's gradient norm (on a linear model ‖x‖²), which is not about
  its label.

The default was chosen on the zoo's eight noisy tasks beside cleanlab's self-confidence ranking on its own out-of-fold
probabilities (benchmarks/README.md, "Suspicion beside its baselines"): the loss signal is at or above cleanlab on
all eight, where the self-influence signal was behind on synth20-logreg-adam (class-pair confusions; TracIn's
self-influence alone is weak there) and even on reviews-transformer-adam. It is built from the two baselines the
explorer shows beside every ranking (the training loss and the out-of-fold confidence), so read it beside them: on
wine-logreg-sgdm and shapes16-mlp-adam the self-influence signal ranks a little better, and on digits class-pair
confusions (digits-mlp-gelu-adamw) the training loss alone still edges it. Pairwise scores (``attribute``) are those of
the base method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, Options, create, option, register
from tda_explorer.compute.engine.task import predict
from tda_explorer.compute.methods.base import Attributor, AttributorArguments, attributor_spec, shared_options
from tda_explorer.compute.training.train import TrainConfig, out_of_fold_probabilities
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory


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
    # "loss": at or above cleanlab on every noisy zoo task (benchmarks/README.md "Suspicion beside its baselines")
    signal: str = option("loss", "the in-sample signal beside the out-of-fold probability: 'loss', the attributed "
                                 "model's own training loss at the given label (−log p_model), or 'self-influence', "
                                 "the base method's (log self-influence)", Options(("loss", "self-influence")))


@register("suspicion", Family.MISLABEL, SuspicionArguments, needs=("recipe",))
class Suspicion(Attributor):
    """Mislabel suspicion = −log out-of-fold probability of the given label − log the model's own (or + log
    self-influence).

    Out-of-fold probabilities are ``oof_probabilities`` or computed here from ``model_factory`` and
    ``train_config``; self-influence and pairwise scores come from the method ``base`` built with ``base_options``.
    """

    tensor_inputs = True  # dict inputs (a tokenizer's) are refused

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
                out_of_fold_probabilities(self.model_factory, in_memory(train, self.name).inputs, train.labels,
                                          self.train_config,
                                          folds=self.folds, seed=self.train_config.seed * 1000 + r, device=self.device)
                for r in range(self.repeats)
            ) / self.repeats
        if probs.shape != (len(train), train.n_classes):
            raise TDAError(
                f"oof_probabilities must be [n_train, n_classes] = [{len(train)}, {train.n_classes}], "
                f"got {tuple(probs.shape)}"
            )
        self.oof_ = probs.float()
        if self.args.signal == "loss":
            logits = predict(self.task, train, self.device, argument="train")
            self.model_loss_ = self.task.train_loss(logits, train.labels).double().cpu()

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return self.base._attribute(test)

    def _self_influence(self) -> torch.Tensor:
        labels = self.train_.labels
        p_given = self.oof_.cpu()[torch.arange(len(labels)), labels].clamp_min(1e-12).double()
        if self.args.signal == "loss":
            return self.model_loss_ - p_given.log()
        surprise = self.base._self_influence().double().cpu().clamp_min(1e-30)
        return surprise.log() - p_given.log()
