"""ASTRA (Wang et al. 2025): EK-FAC-preconditioned stochastic iterations for the iHVP, started at EK-FAC.

Solves (G + D) x = v for each test gradient v, with G the GGN of the mean objective (weight decay included)
and D the per-layer damping of the EK-FAC preconditioner P: x₀ = (P + D)⁻¹ v, then with minibatch GGNs G̃,
    u ← μ u − α (P + D)⁻¹ [(G̃ + D) x − v],   x ← x + u,
α halved every ``halve_every`` iterations. Open choice (documented; measured on digits): the step is relative to
the largest eigenvalue of (P + D)⁻¹(G + D), estimated by power iteration on the full objective, α = step / λ_max.
A fixed α diverged on the digits MLP, where the true-Fisher preconditioner underestimates the GGN in a few
directions; with this scaling heavy-ball momentum μ = 0.9 (the published setting) is stable (α·λ_max < 2(1 + μ)).

Defaults (measured on the digits MLP; figures in benchmarks/README.md): the published schedule (``PUBLISHED``:
200 iterations, momentum 0.9, step halved every 50, batch 256) and 30 plain preconditioned steps (momentum 0,
batch 256) reached the same LDS, the plain steps in far less time, so those are the defaults. Short runs
with momentum did worse: heavy-ball momentum needs many steps to settle. Curvature products run in float32
(``precision``): the iterations are stochastic anyway, and the LDS matched float64's at a lower cost. Every
answer's residual on the full training set is recorded in ``residual_``; a non-finite answer, or one no better
than x = 0, is refused. With the default step, momentum and damping a refused answer backs off (``backoff.py``:
the step halved, then the damping raised, then the EK-FAC solution with if-ekfac's defaults) with a
``SolverBackoffWarning``; an explicit ``step``, ``momentum`` or ``damping`` raises a ``TDAError`` naming it.
Damping: by default the direct solvers' rule, since ASTRA solves the same system (``direct.py``): the SGD recipe's
ridge on every layer when ``train_config`` is given, else ``DAMPING_LEVEL`` (0.01) × the largest eigenvalue of the GGN
on every layer. Until #27 it was 0.1 × each layer's mean EK-FAC eigenvalue, which trailed the direct solvers on the
zoo's Adam tasks (benchmarks/README.md, "Task zoo"). A ``damping`` given is relative per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tda_explorer._validation import all_finite

# the method catalogue: this method registers itself in it
from tda_explorer.compute.catalogue import (
    NONNEGATIVE,
    POSITIVE_INT,
    Family,
    Interval,
    Options,
    create,
    option,
    register,
)
from tda_explorer.compute.engine.curvature import Curvature, largest_eigenvalue
from tda_explorer.compute.engine.kfac import fit_factors
from tda_explorer.compute.methods.influence.backoff import BackoffSolver, Diverged, diverged
from tda_explorer.compute.methods.influence.direct import (
    DAMPING_LEVEL,
    PRODUCT_DTYPES,
    precision_option,
    run_damping,
)
from tda_explorer.compute.methods.influence.ekfac import EKFACArguments, EKFACInfluence
from tda_explorer.data.dataset import AttributionDataset

PUBLISHED = {"iterations": 200, "momentum": 0.9, "halve_every": 50, "minibatch": 256}


@dataclass
class ASTRAArguments(EKFACArguments):
    curvature: str = option("ggn", "the system solved: the GGN of the mean objective (weight decay included), "
                                   "preconditioned by EK-FAC's factored Fisher; the only choice", Options(("ggn",)))
    damping: float | None = option(None, "RELATIVE per layer: D = λ_l I on layer l with λ_l = damping × the mean "
                                         "eigenvalue of its EK-FAC curvature; ASTRA solves (G + D) x = v. None: with "
                                         "an SGD train_config the ridge its steps amount to, (1 − momentum) / (lr · "
                                         "steps), on every layer, else 0.01 × the GGN's largest eigenvalue on every "
                                         "layer (the direct solvers' rules for the same system)", NONNEGATIVE)
    weight_decay_term: bool = option(True, "add the objective's weight decay to the preconditioner's eigenvalues, "
                                           "as G includes it", Options((False, True)))
    iterations: int = option(30, "preconditioned stochastic iterations (the published schedule: 200)", POSITIVE_INT)
    step: float = option(1.0, "step relative to 1 / the largest eigenvalue of (P + D)⁻¹(G + D), estimated by power "
                              "iteration", Interval(0, 2, low_open=True))
    momentum: float = option(0.0, "heavy-ball momentum μ (published: 0.9, which needs many iterations)",
                             Interval(0, 1, high_open=True))
    halve_every: int = option(50, "halve the step every this many iterations", POSITIVE_INT)
    minibatch: int = option(256, "training examples per curvature product", POSITIVE_INT)
    seed: int = option(0, "seed of the minibatch draws", Interval(0, None, integer=True))
    precision: str = precision_option()


@register("if-astra", Family.PAIRWISE, ASTRAArguments, uses=("recipe",))
class ASTRAInfluence(BackoffSolver, EKFACInfluence):
    """Influence functions with ASTRA's EK-FAC-preconditioned stochastic iterations, started at EK-FAC.

    Fitted: ``factors_`` (the preconditioner's), ``residual_`` (the relative residual of the last solve),
    ``solver_report_`` (the settings used: step, damping, fallback).
    """

    step_options = ("step",)
    control_options = ("step", "momentum", "damping")

    def _setup(self) -> None:
        super()._setup()
        self.product_dtype = PRODUCT_DTYPES[self.args.precision]

    def _fit(self, train: AttributionDataset) -> None:
        a = self.args
        self.factors_ = fit_factors(self.task, train, a.fisher, self.corrected, a.batch_size, device=self.device)
        self.lambda_max_ = None
        self.curvature_ = None
        self.spectrum_lam_ = None
        self.g_train_ = self._features(train, test=False).double()
        self.train_data_ = train
        self.step_, self.default_damping_, self.damping_scale_ = a.step, a.damping, 1.0
        self._reset_backoff()

    def with_damping(self, damping: float) -> ASTRAInfluence:
        """The same fitted factors with another damping (no refit); the step's eigenvalue estimate is redone. A damping
        set here counts as chosen explicitly (no back-off changes it)."""
        self._set_damping(damping)
        self.explicit_options_ = self.explicit_options_ | {"damping"}
        return self

    def _set_damping(self, damping: float | None) -> None:
        super().with_damping(damping)
        self.lambda_max_, self.damping_scale_ = None, 1.0

    def _layer_damping(self) -> list[float]:
        """λ_l of each layer, times the back-off's raises: ``damping`` × the layer's mean EK-FAC eigenvalue when given,
        else the direct solvers' rule for the same system on every layer (the SGD recipe's ridge, the Adam run's, or
        ``DAMPING_LEVEL`` × the largest eigenvalue of the GGN, by power iteration once per fit)."""
        scale = getattr(self, "damping_scale_", 1.0)
        if self.args.damping is not None:
            return [lam * scale for lam in super()._layer_damping()]
        ridge, rule = run_damping(self.args.train_config, self.train_, self.task.checkpoints)
        if ridge is not None:
            self.damping_rule_ = rule
            return [ridge * scale] * len(self.factors_)
        if getattr(self, "spectrum_lam_", None) is None:
            full = self._full_curvature()
            self.spectrum_lam_ = DAMPING_LEVEL * largest_eigenvalue(full.matvec, full.dim, device=self.device)
        self.damping_rule_ = "spectrum"
        return [self.spectrum_lam_ * scale] * len(self.factors_)

    def _damping_words(self) -> str:
        lams = ", ".join(f"{lam:.3g}" for lam in self._layer_damping())
        return f"λ per layer {lams} ({self.damping_rule_} rule × {self.damping_scale_:g})"

    def _settings(self) -> dict:
        return {"step": getattr(self, "step_", self.args.step), "damping": self.args.damping,
                "damping_scale": getattr(self, "damping_scale_", 1.0)}

    def _halve_step(self) -> str:
        old, self.step_ = self.step_, self.step_ / 2
        return f"step {self.step_:g} (was {old:g})"

    def _raise_damping(self, factor: float) -> str:
        old = self._damping_words()
        self.damping_scale_ *= factor
        self.lambda_max_ = None
        return f"{self._damping_words()} (was {old})"

    def _ekfac_solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """The fallback: ``if-ekfac`` with its defaults on this fit's factors (no refit); the damping ASTRA reports
        goes back to its default (it is not used)."""
        if self.args.damping != self.default_damping_ or self.damping_scale_ != 1.0:
            self._set_damping(self.default_damping_)
        if getattr(self, "fallback_", None) is None:
            self.fallback_ = create("if-ekfac", self.task, device=self.device, max_memory=self.max_memory,
                                    train_config=self.args.train_config)
            self.fallback_.factors_, self.fallback_.train_ = self.factors_, self.train_data_
        return self.fallback_._precondition(rhs)

    def _damping_flat(self) -> torch.Tensor:
        """Per-parameter damping in the flat layout: λ_l·I on layer l is λ_l in every orthonormal basis."""
        damping = torch.zeros(self.g_train_.shape[1], dtype=torch.float64, device=self.device)
        for (f, w0, _), lam in zip(self._layer_slices(), self._layer_damping()):
            damping[w0 : w0 + f.eigenvalues.numel()] = lam
        return damping

    def _attempt(self, v: torch.Tensor) -> torch.Tensor:
        a = self.args
        gen = torch.Generator().manual_seed(a.seed)
        damping = self._damping_flat()
        n = len(self.train_data_)
        x = self._precondition(v)
        velocity = torch.zeros_like(x)
        step = self.step_ / self._largest_eigenvalue(damping)
        full = self._full_curvature()
        advice = (f"lower step (now {self.step_:g}) or momentum (now {a.momentum:g}), or raise damping "
                  f"(now {self._damping_words()})")
        for t in range(a.iterations):
            if t and t % a.halve_every == 0:
                step /= 2
            rows = torch.randperm(n, generator=gen)[: a.minibatch]
            residual = full.on_rows(rows).matvec(x) + damping * x - v
            velocity = a.momentum * velocity - step * self._precondition(residual)
            x = x + velocity
            if t % 10 == 9 and not all_finite(x):
                break
        residual = float("inf")
        if all_finite(x):
            residual = float(((full.matvec(x) + damping * x - v).norm(dim=1) / v.norm(dim=1).clamp_min(1e-300)).max())
        self.residual_ = residual
        if diverged(residual):
            raise Diverged(residual, f"if-astra diverged: relative residual {residual:.3g} (x = 0 has 1); {advice}")
        return x

    def _full_curvature(self) -> Curvature:
        """The GGN over the whole training set, built once per fit; minibatches are row views of it."""
        if getattr(self, "curvature_", None) is None:
            self.curvature_ = Curvature(self.task, self.train_data_, "ggn", self.device, dtype=self.product_dtype,
                                        max_memory=self.max_memory)
        return self.curvature_

    def _largest_eigenvalue(self, damping: torch.Tensor, iterations: int = 20) -> float:
        """λ_max of (P + D)⁻¹(G + D) by power iteration on the full training set (cached per fit)."""
        if getattr(self, "lambda_max_", None) is None:
            full = self._full_curvature()
            estimate = largest_eigenvalue(lambda z: self._precondition(full.matvec(z) + damping * z),
                                          self.g_train_.shape[1], iterations, device=self.device)
            self.lambda_max_ = 1.1 * estimate  # a margin: power iteration approaches from below
        return self.lambda_max_

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        g_test = self._features(test, test=True).double()
        return (self._solve(g_test) @ self.g_train_.T / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        return ((self._solve(self.g_train_) * self.g_train_).sum(1) / len(self.train_)).float()
