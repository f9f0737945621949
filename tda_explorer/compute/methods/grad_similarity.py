"""Grad-Dot and Grad-Cos: inner products (or cosines) of final-model gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the method catalogue: these methods register themselves in it
from tda_explorer.compute.catalogue import Family, register
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class GradDotArguments(AttributorArguments):
    """Grad-Dot and Grad-Cos take only the options every attributor takes."""


@register("grad-dot", Family.PAIRWISE, GradDotArguments)
class GradDot(Attributor):
    """τ(z, z′) = ∇f(z′)ᵀ ∇ℓ(z) at the final parameters: one step of further training, first order."""

    normalize = False

    def _fit(self, train: AttributionDataset) -> None:
        self.train_grads_ = self._features(train, test=False)
        self.train_norms_ = self.train_grads_.norm(dim=1)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        g_test = self._features(test, test=True)
        g_train = self.train_grads_
        if self.normalize:
            g_test = g_test / g_test.norm(dim=1, keepdim=True).clamp_min(1e-12)
            g_train = g_train / self.train_norms_.unsqueeze(1).clamp_min(1e-12)
        return g_test @ g_train.T

    def _self_influence(self) -> torch.Tensor:
        return self.train_norms_**2


@register("grad-cos", Family.PAIRWISE, GradDotArguments)
class GradCos(GradDot):
    """Grad-Dot on unit-normalised gradients.

    Self-influence of a cosine is 1 by construction, so ``self_influence`` returns the squared
    gradient norm (as Grad-Dot), which is what ranks surprising examples.
    """

    normalize = True
