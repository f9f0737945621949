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
Where the GGN's products go through its factor A (``Curvature.factor``: n·C rows), every iterate is b's multiple plus a
combination of A's rows, so a run can be held as those coefficients and stepped through the Gram matrix AAᵀ (built once
per fit): the same iterates at N·m·C multiply-adds per step instead of 2·p·m·C. It is taken where that costs less over
the whole run (a model with many more parameters than its training set has outputs, the zoo's transformer;
benchmarks/README.md, "LiSSA in the factor's row space").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from tda_explorer._validation import all_finite

# the method catalogue: this solver registers itself in it
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, Interval, Options, option, register
from tda_explorer.compute.engine.curvature import FACTOR_MEMORY, Curvature, largest_eigenvalue
from tda_explorer.compute.methods.influence.backoff import BackoffSolver, Diverged
from tda_explorer.compute.methods.influence.direct import (
    PRODUCT_DTYPES,
    InfluenceArguments,
    InfluenceFunction,
    precision_option,
)
from tda_explorer.jobs import check_cancelled

#: A run whose depth leaves more than this share of the series along the least-curved directions (``series_left``) is
#: warned about (``TruncatedSeriesWarning``).
TRUNCATION_LEFT = math.exp(-3)


def series_left(rate: float, depth: int, tail: int) -> float:
    """The share of the series LiSSA leaves undone along a direction where each step keeps 1 − ``rate`` of it:
    exp(−rate·j) after j steps, averaged over the last ``tail`` of ``depth`` steps (the iterates it answers with)."""
    start = depth - tail
    if rate * tail < 1e-12:
        return math.exp(-rate * start)
    return (math.exp(-rate * start) - math.exp(-rate * depth)) / (rate * tail)


class TruncatedSeriesWarning(UserWarning):
    """LiSSA's depth truncates its series: what it solves is damped more than asked along the least-curved directions;
    the message gives the depth that solves the system as asked."""


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
        self._gram: torch.Tensor | None = None  # AAᵀ of the GGN's factor, for runs in its row space (``_series``)
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
        self._warn_if_truncated()
        v = v.double()
        b = v.to(self.products_.dtype)  # the iterates in the products' precision
        gen = torch.Generator().manual_seed(a.seed)
        n = self.products_.n
        bound = 2 * v.norm(dim=1)
        advice = f"raise scale (now {self.scale_:.3g}) or damping (now {self.lam_:.3g})"
        total = torch.zeros_like(v)
        tail = self._tail(a.depth)
        keep, step = 1 - self.lam_ / self.scale_, 1 / self.scale_
        for _ in range(a.repeats):
            series = self._series(b)
            for j in range(a.depth):
                series.step(torch.randperm(n, generator=gen)[: a.minibatch], keep, step)
                if j % self.check_every == self.check_every - 1:
                    norms = series.norms().double()
                    if not bool(torch.isfinite(norms).all()) or bool((norms > (j + 2) * bound).any()):
                        x = series.current()
                        self.residual_ = self._relative_residual(x.double() / self.scale_, v) if all_finite(x) \
                            else float("inf")
                        raise Diverged(self.residual_, f"{self.name} diverged: relative residual "
                                                       f"{self.residual_:.3g} when its iterates began to grow (step "
                                                       f"{j + 1} of {a.depth}); {advice}")
                if j >= a.depth - tail:
                    series.accumulate()
            total = total + series.total().double() / (tail * self.scale_)
        return self._checked(total / a.repeats, v, advice)

    def _tail(self, depth: int) -> int:
        """The iterates a run of ``depth`` steps answers with: its second half (``average``), else its last."""
        return depth - depth // 2 if self.args.average else 1

    def _warn_if_truncated(self) -> None:
        """A ``TruncatedSeriesWarning`` when the depth leaves more than ``TRUNCATION_LEFT`` of the series undone along
        the directions of least curvature, where each step keeps 1 − r of it, r = (λ + wd) / s (``series_left``),
        once per setting."""
        a = self.args
        rate = (self.lam_ + self.products_.wd) / self.scale_

        def left_at(depth: int) -> float:
            return series_left(rate, depth, self._tail(depth))

        left = left_at(a.depth)
        setting = (a.depth, self.lam_, self.scale_)
        if left <= TRUNCATION_LEFT or getattr(self, "_truncation_warned", None) == setting:
            return
        self._truncation_warned = setting
        depth = a.depth
        while left_at(depth) > TRUNCATION_LEFT:
            depth *= 2
        low = depth // 2
        while low + 1 < depth:  # the least depth that leaves at most TRUNCATION_LEFT
            mid = (low + depth) // 2
            low, depth = (low, mid) if left_at(mid) <= TRUNCATION_LEFT else (mid, depth)
        warnings.warn(f"{self.name}: depth {a.depth} is short of scale / (damping + weight decay) = {1 / rate:.3g}: "
                      f"the series stops with {left:.0%} of it left along the directions of least curvature, which "
                      f"acts as extra damping there (damping {self.lam_:.3g}); for the damped system as asked pass "
                      f"depth >= {depth}", TruncatedSeriesWarning, stacklevel=4)

    def _series(self, b: torch.Tensor) -> ParameterSeries | RowSpaceSeries:
        """The iterates of one run from ``b``: in the row space of the GGN's factor where that costs fewer multiply-adds
        over the whole run (its Gram matrix built once per fit, within ``FACTOR_MEMORY``), else in parameter space."""
        factor = self.products_.factor()
        if factor is None:
            return ParameterSeries(self.products_, b)
        a = self.args
        rows, dim = factor.shape
        per_example = rows // self.products_.n
        batch_rows = min(a.minibatch, self.products_.n) * per_example
        steps = a.depth * a.repeats
        gram_cost = 0 if self._gram is not None else rows * rows * dim
        row_space = gram_cost + 2 * len(b) * rows * dim + steps * len(b) * (batch_rows * rows
                                                                             + rows * rows / self.check_every)
        parameter = steps * len(b) * 2 * batch_rows * dim
        if row_space >= parameter or rows * rows * factor.element_size() > FACTOR_MEMORY:
            return ParameterSeries(self.products_, b)
        if self._gram is None:
            self._gram = factor @ factor.T
        return RowSpaceSeries(factor, self._gram, b, per_example, self.products_.wd)


class ParameterSeries:
    """LiSSA's iterates x_j ``[r, p]`` held as they are: x ← keep·x + b − step·(H̃ + wd·I)x with H̃ the minibatch's
    curvature (``Curvature.on_rows``), plus the sum of the iterates averaged."""

    def __init__(self, products: Curvature, b: torch.Tensor):
        self.products, self.b = products, b
        self.x, self.sum = b.clone(), torch.zeros_like(b)

    def step(self, rows: torch.Tensor, keep: float, step: float) -> None:
        curved = self.products.on_rows(rows).matvec(self.x)
        self.x.mul_(keep).add_(self.b).sub_(curved, alpha=step)

    def norms(self) -> torch.Tensor:
        return self.x.norm(dim=1)

    def current(self) -> torch.Tensor:
        return self.x

    def accumulate(self) -> None:
        self.sum.add_(self.x)

    def total(self) -> torch.Tensor:
        return self.sum


class RowSpaceSeries:
    """The same iterates held as x_j = c_j·b + Aᵀw_j, with A ``[N, p]`` the GGN's factor over the whole training set
    (``Curvature.factor``: a minibatch's curvature is (n/m)·A_bᵀA_b over its m examples' rows b): every term the
    series adds lies in that span, so a step updates the scalar c and the minibatch's entries of w ``[r, N]`` through
    the Gram matrix K = AAᵀ, at N·m·C multiply-adds per right-hand side instead of the factor's 2·p·m·C. The same
    minibatches give the same iterates (to rounding); p-dimensional vectors are formed only for the answer."""

    def __init__(self, factor: torch.Tensor, gram: torch.Tensor, b: torch.Tensor, per_example: int, wd: float):
        self.factor, self.gram, self.b, self.per_example, self.wd = factor, gram, b, per_example, wd
        self.n = factor.shape[0] // per_example
        self.ab = b @ factor.T  # Ab for each right-hand side, [r, N]
        self.bb = (b * b).sum(dim=1)
        self.c, self.w = torch.ones((), dtype=b.dtype, device=b.device), torch.zeros_like(self.ab)  # c: as x overflows
        self.c_sum, self.w_sum = torch.zeros_like(self.c), torch.zeros_like(self.ab)

    def step(self, rows: torch.Tensor, keep: float, step: float) -> None:
        check_cancelled()  # the parameter-space products check it; these steps never reach them
        rows = rows.to(self.w.device)
        idx = (rows.unsqueeze(1) * self.per_example + torch.arange(self.per_example, device=rows.device)).flatten()
        ax = torch.addmm(self.ab[:, idx].mul_(self.c), self.w, self.gram[idx].T)  # A_b x_j, [r, m·C]
        shrink = keep - step * self.wd  # the weight decay's term of (H̃ + wd·I)x
        self.w.mul_(shrink).index_add_(1, idx, ax, alpha=-step * self.n / len(rows))
        self.c = self.c * shrink + 1.0

    def norms(self) -> torch.Tensor:
        """‖x_j‖ per right-hand side, from c, w and K alone."""
        squares = self.c ** 2 * self.bb + 2 * self.c * (self.ab * self.w).sum(dim=1) + ((self.w @ self.gram)
                                                                                         * self.w).sum(dim=1)
        return squares.clamp_min(0).sqrt()

    def current(self) -> torch.Tensor:
        return (self.w @ self.factor).add_(self.b * self.c)

    def accumulate(self) -> None:
        self.c_sum.add_(self.c)
        self.w_sum.add_(self.w)

    def total(self) -> torch.Tensor:
        return (self.w_sum @ self.factor).add_(self.b * self.c_sum)
