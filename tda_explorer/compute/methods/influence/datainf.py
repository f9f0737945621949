"""DataInf (Kwon et al. 2024): a closed-form, per-layer approximation of the inverse damped Fisher.

Per layer l with per-example gradients g_il (d_l values) the damped empirical Fisher is averaged *after*
inversion, each rank-one term inverted exactly by Sherman–Morrison:
    (1/n Σ_i g_il g_ilᵀ + λ_l I)⁻¹ ≈ 1/n Σ_i (g_il g_ilᵀ + λ_l I)⁻¹ = 1/(n λ_l) Σ_i (I − g_il g_ilᵀ / (λ_l + ‖g_il‖²)).
No curvature products and no factorisation: queries cost three products with the training gradients. The swap
of average and inverse is exact for one example and good when d_l is small next to n (LoRA-sized layers).
Damping (the paper's rule, plus the objective's weight decay): λ_l = wd + damping · mean_i ‖g_il‖² / d_l with
damping = 0.1. A layer is a module's tracked parameters (weight and bias together). Convention as the other
influence functions: τ = (1/n) ∇f(z′)ᵀ (H + λ)⁻¹ ∇ℓ(z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, Options, option, register
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.methods.influence.direct import InfluenceArguments
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class DataInfArguments(InfluenceArguments):
    curvature: str = option("empirical-fisher", "the curvature approximated, layer by layer: the empirical Fisher "
                                                "of the training gradients, the only choice",
                            Options(("empirical-fisher",)))
    damping: float = option(0.1, "RELATIVE per layer (the paper's rule): λ_l = weight decay + damping × mean_i "
                                 "‖g_il‖² / d_l, the mean squared gradient entry of layer l; DataInf divides by it",
                            POSITIVE)
    chunk: int = option(1024, "training rows per block when forming self-influence (bounds memory at chunk × n)",
                        POSITIVE_INT, config=False, cli=True)


@register("if-datainf", Family.PAIRWISE, DataInfArguments)
class DataInfInfluence(Attributor):
    """DataInf influence: a closed-form per-layer inverse of the damped empirical Fisher (Sherman–Morrison).

    Fitted: ``lam_`` (the damping of each layer).
    """

    def _setup(self) -> None:
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by if-datainf (its layers are the model's); leave it None")

    def _layers(self) -> list[slice]:
        """Column ranges of the flat gradient, one per module (its tracked parameters are contiguous)."""
        sizes = {n: p.numel() for n, p in self.task.model.named_parameters()}
        slices, start, current, begin = [], 0, None, 0
        for name in self.task.tracked_names():
            module = name.rsplit(".", 1)[0] if "." in name else ""
            if module != current and current is not None:
                slices.append(slice(begin, start))
                begin = start
            current = module
            start += sizes[name]
        slices.append(slice(begin, start))
        return slices

    def _fit(self, train: AttributionDataset) -> None:
        self.g_train_ = self._features(train, test=False).double()
        self.slices_ = self._layers()
        self.lam_, self.denominators_ = [], []
        for cols in self.slices_:
            sq = (self.g_train_[:, cols] ** 2).sum(1)  # ‖g_il‖²
            lam = self.task.weight_decay + self.args.damping * float(sq.mean()) / (cols.stop - cols.start)
            self.lam_.append(lam)
            self.denominators_.append(lam + sq)

    def _inverse_times(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the DataInf inverse applied to each row of ``v``."""
        n = len(self.g_train_)
        out = []
        for cols, lam, denom in zip(self.slices_, self.lam_, self.denominators_):
            g, vl = self.g_train_[:, cols], v[:, cols]
            coeffs = (vl @ g.T) / denom  # [r, n]
            out.append((vl - coeffs @ g / n) / lam)
        return out

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        v = self._features(test, test=True).double()
        parts = self._inverse_times(v)
        scores = sum(p @ self.g_train_[:, cols].T for p, cols in zip(parts, self.slices_))
        return (scores / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        out = []
        chunk = self.args.chunk
        for start in range(0, len(self.g_train_), chunk):
            rows = self.g_train_[start : start + chunk]
            parts = self._inverse_times(rows)
            out.append(sum((p * rows[:, cols]).sum(1) for p, cols in zip(parts, self.slices_)))
        return (torch.cat(out) / len(self.train_)).float()
