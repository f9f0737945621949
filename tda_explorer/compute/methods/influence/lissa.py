"""LiSSA (Agarwal et al. 2017): the stochastic Neumann series for (H + λI)⁻¹ v.

x₀ = v, x_{j+1} = v + (I − (H̃_j + λI)/s) x_j over minibatch curvatures H̃_j, answer the mean of the iterates over
the second half of the run, x̄ / s (Polyak–Ruppert averaging, ``average``; Agarwal et al. answer the last, x_J / s),
averaged over ``repeats`` independent runs; all right-hand sides (test points) share each minibatch product. The
average removes most of the minibatch noise the last iterate carries, at no extra product: measured on the zoo
(benchmarks/README.md, "LiSSA's iterates averaged"), the answers' residuals fell 5–10× and the LDS rose on the six
tasks of that bench (within 0.003 of the last iterate's on the zoo's others), and a self-influence solve whose last
iterates were refused on a few noisy right-hand sides (and so ran twice, with the step halved) passes at once.

Choices (documented, measured on digits): the scale s must exceed the largest eigenvalue of every minibatch's
H̃ + λI for the series to converge, so by default s = 1.5 × the largest of power-iteration estimates on the full
training set and on 8 random minibatches (a fixed scale such as dattri's 50 diverges or crawls depending on the
model; the full-set estimate alone diverged on the digits MLP with minibatches of 64). A depth J much smaller than s/λ
truncates the series, which acts as extra damping s/J on the small eigenvalues; the residual of the answer on
the full training set is recorded in ``residual_``, and a run whose answer is non-finite or no better than
x = 0 is refused instead of returning garbage. A run stops early once its iterates grow past what a convergent
series allows (‖x_j‖ > 2(j + 1)‖v‖: every term of a convergent series is at most ‖v‖). With the default scale
and damping such a run backs off (``backoff.py``: the scale doubled, i.e. the step 1/s halved, then the damping
raised, then EK-FAC) with a ``SolverBackoffWarning``; an explicit ``scale`` or ``damping`` raises.
The minibatch products and the iterates run in float32 by default (``precision``; ASTRA's choice): the series is
stochastic anyway and they cost a fraction of float64's on a CPU; the answer is accumulated and its residual on the
whole training set checked in float64 (benchmarks/README.md, "LiSSA's precision").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the method catalogue: this solver registers itself in it
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, Interval, Options, option, register
from tda_explorer.compute.engine.curvature import largest_eigenvalue
from tda_explorer.compute.methods.influence.backoff import BackoffSolver, Diverged
from tda_explorer.compute.methods.influence.direct import (
    PRODUCT_DTYPES,
    InfluenceArguments,
    InfluenceFunction,
    precision_option,
)


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
    precision: str = precision_option()
    average: bool = option(True, "answer with the mean of the iterates over the second half of each run (Polyak–"
                                 "Ruppert averaging: far less minibatch noise at no extra products); False: the last "
                                 "iterate (Agarwal et al.)", Options((False, True)))


@register("if-lissa", Family.PAIRWISE, LiSSAArguments, uses=("recipe",))
class LiSSAInfluence(BackoffSolver, InfluenceFunction):
    """Influence functions with LiSSA, the stochastic Neumann series over minibatch curvatures.

    Fitted: ``scale_`` (the series' scale s), ``residual_`` (the relative residual of the last solve),
    ``solver_report_`` (the settings used), ``products_`` (the curvature the minibatch products run on, in
    ``precision``).
    """

    step_options = ("scale",)
    control_options = ("scale", "damping")
    check_every = 20  # iterations between checks of the iterates

    def _prepare(self) -> None:
        super()._prepare()
        a = self.args
        dtype = PRODUCT_DTYPES[a.precision]
        self.products_ = self.curvature_ if dtype == self.curvature_.dtype else self.curvature_.in_precision(dtype)
        if a.scale is not None:
            self.scale_ = float(a.scale)
        else:
            gen = torch.Generator().manual_seed(a.seed + 1)
            views = [self.products_] + [
                self.products_.on_rows(torch.randperm(self.products_.n, generator=gen)[: a.minibatch])
                for _ in range(8)
            ]
            self.scale_ = 1.5 * max(
                largest_eigenvalue(lambda v, c=c: self._damped(v, c), self.curvature_.dim, device=self.device)
                for c in views)
        self._reset_backoff()

    def _settings(self) -> dict:
        return {"scale": self.scale_, "damping": self.lam_}

    def _halve_step(self) -> str:
        old, self.scale_ = self.scale_, 2 * self.scale_
        return f"scale {self.scale_:.3g} (was {old:.3g}; the step is 1/scale)"

    def _raise_damping(self, factor: float) -> str:
        old, self.lam_ = self.lam_, self.lam_ * factor
        self.scale_ += 1.5 * (self.lam_ - old)  # the scale keeps its margin over the largest eigenvalue of H̃ + λI
        return f"damping {self.lam_:.3g} (was {old:.3g}), scale {self.scale_:.3g}"

    def _attempt(self, v: torch.Tensor) -> torch.Tensor:
        a = self.args
        v = v.double()
        b = v.to(self.products_.dtype)  # the iterates in the products' precision, updated in place
        gen = torch.Generator().manual_seed(a.seed)
        n = self.products_.n
        bound = 2 * v.norm(dim=1)
        advice = f"raise scale (now {self.scale_:.3g}) or damping (now {self.lam_:.3g})"
        total = torch.zeros_like(v)
        tail = a.depth - a.depth // 2 if a.average else 1  # the iterates averaged: the last ``tail`` of each run
        for _ in range(a.repeats):
            x, iterates = b.clone(), torch.zeros_like(b)
            for j in range(a.depth):
                rows = torch.randperm(n, generator=gen)[: a.minibatch]
                curved = self.products_.on_rows(rows).matvec(x)
                x.mul_(1 - self.lam_ / self.scale_).add_(b).sub_(curved, alpha=1 / self.scale_)
                if j % self.check_every == self.check_every - 1:
                    norms = x.norm(dim=1).double()
                    if not bool(torch.isfinite(norms).all()) or bool((norms > (j + 2) * bound).any()):
                        finite = bool(torch.isfinite(x).all())
                        self.residual_ = self._relative_residual(x.double() / self.scale_, v) if finite \
                            else float("inf")
                        raise Diverged(self.residual_, f"{self.name} diverged: relative residual "
                                                       f"{self.residual_:.3g} when its iterates began to grow (step "
                                                       f"{j + 1} of {a.depth}); {advice}")
                if j >= a.depth - tail:
                    iterates.add_(x)
            total = total + iterates.double() / (tail * self.scale_)
        return self._checked(total / a.repeats, v, advice)
