"""LiSSA (Agarwal et al. 2017): the stochastic Neumann series for (H + λI)⁻¹ v.

x₀ = v, x_{j+1} = v + (I − (H̃_j + λI)/s) x_j over minibatch curvatures H̃_j, answer x_J / s, averaged over
``repeats`` independent runs; all right-hand sides (test points) share each minibatch product.

Choices (documented, measured on digits): the scale s must exceed the largest eigenvalue of every minibatch's
H̃ + λI for the series to converge, so by default s = 1.5 × the largest of power-iteration estimates on the full
training set and on 8 random minibatches (a fixed scale such as dattri's 50 diverges or crawls depending on the
model; the full-set estimate alone diverged on the digits MLP with minibatches of 64). A depth J much smaller than s/λ
truncates the series, which acts as extra damping s/J on the small eigenvalues; the residual of the answer on
the full training set is recorded in ``residual_``, and a run whose answer is non-finite or no better than
x = 0 raises instead of returning garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the method catalogue: this solver registers itself in it
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, Interval, option, register
from tda_explorer.compute.engine.curvature import largest_eigenvalue
from tda_explorer.compute.methods.influence.direct import InfluenceArguments, InfluenceFunction


@dataclass
class LiSSAArguments(InfluenceArguments):
    depth: int = option(1000, "recursion depth J of each run (minibatch curvature products); a depth much below "
                              "scale/λ truncates the series, which acts as extra damping scale/J", POSITIVE_INT)
    scale: float | None = option(None, "s, which must exceed the largest eigenvalue of every minibatch's H̃ + λI for "
                                       "the series to converge; None: 1.5 × the largest power-iteration estimate on "
                                       "the full training set and on 8 random minibatches", POSITIVE)
    repeats: int = option(1, "independent runs averaged", POSITIVE_INT)
    minibatch: int = option(64, "training examples per curvature product", POSITIVE_INT)
    seed: int = option(0, "seed of the minibatch draws (and of the minibatches of the scale estimate)",
                       Interval(0, None, integer=True))


@register("if-lissa", Family.PAIRWISE, LiSSAArguments)
class LiSSAInfluence(InfluenceFunction):
    """Influence functions with LiSSA, the stochastic Neumann series over minibatch curvatures.

    Fitted: ``scale_`` (the series' scale s), ``residual_`` (the relative residual of the last solve).
    """

    def _prepare(self) -> None:
        super()._prepare()
        a = self.args
        if a.scale is not None:
            self.scale_ = float(a.scale)
        else:
            gen = torch.Generator().manual_seed(a.seed + 1)
            views = [self.curvature_] + [
                self.curvature_.on_rows(torch.randperm(self.curvature_.n, generator=gen)[: a.minibatch])
                for _ in range(8)
            ]
            self.scale_ = 1.5 * max(
                largest_eigenvalue(lambda v, c=c: self._damped(v, c), self.curvature_.dim, device=self.device)
                for c in views)

    def _solve(self, v: torch.Tensor) -> torch.Tensor:
        a = self.args
        v = v.double()
        gen = torch.Generator().manual_seed(a.seed)
        n = self.curvature_.n
        total = torch.zeros_like(v)
        for _ in range(a.repeats):
            x = v.clone()
            for j in range(a.depth):
                rows = torch.randperm(n, generator=gen)[: a.minibatch].to(self.curvature_.x.device)
                x = v + x - self._damped(x, self.curvature_.on_rows(rows)) / self.scale_
                if j % 100 == 99 and not torch.isfinite(x).all():
                    break
            total = total + x / self.scale_
        return self._checked(total / a.repeats, v,
                             f"raise scale (now {self.scale_:.3g}) or damping (now {self.lam_:.3g})")
