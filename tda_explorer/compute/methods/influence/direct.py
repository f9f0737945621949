"""Influence functions: τ(z, z′) = (1/n) ∇f(z′)ᵀ (H + λI)⁻¹ ∇ℓ(z).

Convention: H is the curvature of the *mean* training objective (weight decay included), so removing z
changes the parameters by ≈ (1/n) H⁻¹∇ℓ(z), and τ is in "change of the test loss per removed example"
units. Positive = proponent. Solvers:

* ``explicit``: the dense matrix in float64 and a Cholesky factorisation (never an inverse); the oracle on
  tiny models. An indefinite matrix without enough damping is refused, not silently inverted. With
  ``projection_dim=k`` it works on projected features instead: Pᵀ H P (k curvature products with the columns of
  the seeded projection P) and projected gradients Pᵀ∇ℓ — exactly the influence function of the model whose
  parameters may only move in the random k-dimensional subspace θ + P z, for models too large for a p×p matrix.
* ``cg``: block conjugate gradients on curvature-vector products (double backward or GGN): all right-hand sides
  (test points, or every training example for self-influence) share one block of search directions, so many
  right-hand sides converge in few iterations; optionally preconditioned with the Kronecker (EK-FAC) solution.
* ``lissa`` (``lissa.py``) and ``arnoldi`` (``arnoldi.py``) build on the same base class.

Every solver's options extend ``InfluenceArguments`` (curvature, damping), those of K-FAC / EK-FAC, ASTRA and
DataInf included, whose help says where a solver gives the words another meaning (their damping is relative).

Every iterative solve records ``residual_``, the largest relative residual ‖(H + λI)x − v‖ / ‖v‖ over its
right-hand sides on the full training set, and refuses an answer that is non-finite or no better than x = 0.
The iterative solvers (cg, lissa, arnoldi, astra) share one back-off policy (``backoff.py``): a solve that fails
with default settings halves the step, raises the damping, then falls back to EK-FAC, each with a
``SolverBackoffWarning``; only a setting chosen explicitly raises (a ``TDAError`` naming it).

Damping: ``damping=None`` is read from the training run when its recipe is known (``train_config=``, which the
explorer and ``evaluate`` pass on from a ``recipe`` resource) and its optimizer is SGD, with or without momentum: the
ridge that the run's T steps at rate η amount to, λ = (1 − momentum) / (η T) (``TrainConfig.implicit_damping``).
With an Adam / AdamW recipe and the run's optimizer state on the task's last checkpoint (``train_model``,
``RunRecorder``, ``capture_checkpoint`` and the Hugging Face callback record it), the same ridge in the metric Adam
steps in: λ = ``ADAM_RIDGE`` (3) × mean(√v̂ + ε) / (η T), with √v̂ + ε Adam's per-parameter divisor of the step
(``adam_damping``). Otherwise (no recipe, or an Adam run without its state) it is ``DAMPING_LEVEL`` (0.01) × the
largest eigenvalue of the chosen curvature (power iteration; its magnitude for an indefinite Hessian), a scale read
from the spectrum. The same rules serve every solver here (explicit, cg, lissa, arnoldi, and ASTRA's λ);
``damping_rule_`` says which one was taken ("recipe", "adam", "spectrum"; "given" for a float, the absolute λ).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, all_finite
from tda_explorer.compute.catalogue import (
    CATALOGUE,
    NONNEGATIVE,
    POSITIVE_INT,
    Family,
    Interval,
    Options,
    create,
    option,
    register,
)
from tda_explorer.compute.engine.curvature import CURVATURES, Curvature, largest_eigenvalue
from tda_explorer.compute.engine.featurize import make_projector
from tda_explorer.compute.engine.kfac import fit_factors
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.methods.influence.backoff import BackoffSolver, Diverged, SolverBackoffWarning, diverged
from tda_explorer.compute.methods.influence.cholesky import cholesky_in_place, cholesky_solve
from tda_explorer.compute.training.optimizer_state import ADAM_KINDS, adam_step_scale
from tda_explorer.compute.training.train import Checkpoint, TrainConfig
from tda_explorer.data.dataset import AttributionDataset

PRECONDITIONERS = ("none", "ekfac")
# default λ without an SGD recipe = this × the curvature's largest eigenvalue: the best worst-case regret of the levels
# over the 13 zoo tasks; benchmarks/README.md, "Influence-function damping across the zoo"
DAMPING_LEVEL = 0.01
# an Adam / AdamW run with its optimizer state recorded: λ = this × mean(√v̂ + ε) / (lr · steps), the least worst-case
# regret over the zoo's six Adam runs; benchmarks/README.md, "Damping from an Adam run"
ADAM_RIDGE = 3.0
BLOCK_ROWS = 2048  # right-hand sides per block of CG: bounds the s×s eigendecompositions (s ≤ this)
MEMORY_SHARE = 0.25  # if-explicit's exact forms may take this share of the device's memory ...
BACKOFF_PROJECTION = 2048  # ... else it backs off to a subspace of this dimension (TRAK's default projection)
PRODUCT_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the stochastic solvers' ``precision``


def precision_option():
    """The stochastic solvers' (LiSSA's, ASTRA's) ``precision``: the dtype of their minibatch curvature products."""
    return option("float32", "dtype of the minibatch curvature products (the iterations are stochastic anyway; the "
                             "answer's residual on the whole training set is checked in float64)",
                  Options(tuple(PRODUCT_DTYPES)))


@dataclass
class InfluenceArguments(AttributorArguments):
    """Options every influence-function solver takes (each solver's ``Arguments`` extends these)."""

    projection_dim: int | None = option(None, "not supported by this solver (it works on the full parameters): "
                                              "leave None; if-explicit takes it", POSITIVE_INT, cli=False)
    curvature: str = option("ggn", "curvature of the mean training objective (weight decay included): 'ggn', the "
                                   "Gauss-Newton matrix (positive semi-definite), or 'hessian', the exact Hessian "
                                   "(indefinite away from a minimum)", Options(CURVATURES))
    damping: float | None = option(None, "absolute λ added to the curvature of the mean training objective; None: "
                                         "with an SGD train_config the ridge its steps amount to, (1 − momentum) / "
                                         "(lr · steps); with an Adam one and its optimizer state on the task's last "
                                         "checkpoint 3 × mean(√v̂ + ε) / (lr · steps); else 0.01 × the curvature's "
                                         "largest eigenvalue",
                                   NONNEGATIVE)
    # with SGD, λ = 1 / (lr_eff · steps): the zoo's SGD tasks, benchmarks/README.md "Damping from the training run";
    # with Adam, ADAM_RIDGE: the zoo's Adam tasks, benchmarks/README.md "Damping from an Adam run"
    train_config: TrainConfig | None = option(None, "the attributed model's training recipe (lr, epochs, batch size, "
                                                    "optimizer); with SGD it sets the default damping (used by "
                                                    "if-explicit, if-cg, if-lissa, if-arnoldi, if-astra, if-kfac, "
                                                    "if-ekfac), with Adam and the run's recorded optimizer state "
                                                    "that of the direct solvers and if-astra",
                                              config=False, cli=False)


def adam_damping(train_config: TrainConfig | None, train: AttributionDataset | None,
                 checkpoints: Sequence[Checkpoint]) -> float | None:
    """The default damping of an Adam / AdamW run whose optimizer state was recorded: ``ADAM_RIDGE`` × mean(√v̂ + ε) /
    (lr · steps), the ridge of the recipe's steps in the metric Adam steps in (its per-parameter divisor √v̂ + ε, read
    from the last checkpoint's ``optimizer_state``). None without an Adam / AdamW recipe and a last checkpoint of an
    Adam kind that carries its state with at least one step taken."""
    if train_config is None or train is None or train_config.optimizer not in ADAM_KINDS or not checkpoints:
        return None
    last = checkpoints[-1]
    state = last.optimizer_state
    if last.optimizer not in ADAM_KINDS or not isinstance(state, dict) or \
            any(key not in state for key in ("exp_avg_sq", "step", "betas", "eps")):
        return None  # no state, or not one to read (TracIn, which needs it, names what is missing)
    scale = adam_step_scale(state)
    return None if scale is None else ADAM_RIDGE * scale / (train_config.lr * train_config.steps(len(train)))


def recipe_damping(train_config: TrainConfig | None, train: AttributionDataset | None) -> float | None:
    """The default damping read from the recipe of the run that trained on ``train`` (``TrainConfig.implicit_damping``;
    None: no recipe or no training set, or an optimizer whose steps it cannot read); a ``train_config`` of another type
    is a ``TDAError`` naming it."""
    if train_config is None or train is None:
        return None
    if not isinstance(train_config, TrainConfig):
        raise TDAError(f"train_config must be a TrainConfig (the attributed model's training recipe) or None, got "
                       f"{type(train_config).__name__}")
    return train_config.implicit_damping(len(train))


def run_damping(train_config: TrainConfig | None, train: AttributionDataset | None,
                checkpoints: Sequence[Checkpoint]) -> tuple[float | None, str]:
    """The ridge the training run amounts to and the rule it came from: the SGD recipe's (``recipe_damping``,
    "recipe"), else an Adam run's with its recorded state (``adam_damping``, "adam"), else ``(None, "spectrum")``:
    the caller takes ``DAMPING_LEVEL`` × its curvature's largest eigenvalue."""
    implicit = recipe_damping(train_config, train)
    if implicit is not None:
        return implicit, "recipe"
    adam = adam_damping(train_config, train, checkpoints)
    return (adam, "adam") if adam is not None else (None, "spectrum")


class InfluenceFunction(Attributor):
    """Influence functions: the shared part of every iHVP solver (curvature, damping, scores).

    Not a method itself: ``InfluenceFunction.create(task, solver="lissa", ...)`` builds the attributor of one
    solver (registered as ``if-<solver>``), whose options are ``InfluenceArguments`` and the solver's own.
    """

    name = "if"
    Arguments = InfluenceArguments

    projectable = False  # whether the solver works on projected features (``projection_dim``)

    def _setup(self) -> None:
        if self.projector is not None and not self.projectable:
            raise TDAError(f"projection_dim is not supported by {self.name}; leave it None (if-explicit takes it)")
        self.residual_: float | None = None

    @staticmethod
    def create(task: AttributionTask, solver: str = "cg", **options) -> Attributor:
        """The influence-function attributor of ``solver`` (the catalogue's ``if-*`` methods: explicit, cg, lissa,
        arnoldi, kfac, ekfac, astra, datainf) with its ``options``."""
        solvers = sorted(name[3:] for name in CATALOGUE if name.startswith("if-"))
        if solver not in solvers:
            raise TDAError(f"unknown solver {solver!r}; expected one of: {', '.join(solvers)}")
        return create(f"if-{solver}", task, **options)  # the catalogue's ``create``, not this method

    def _fit(self, train: AttributionDataset) -> None:
        self.curvature_ = Curvature(self.task, train, self.args.curvature, self.device, max_memory=self.max_memory)
        self.g_train_ = self._features(train, test=False).double()
        self._prepare()

    def _prepare(self) -> None:
        """Solver set-up after the curvature and training gradients exist (default: the damping)."""
        self.lam_ = self._lambda(self.curvature_.matvec, self.curvature_.dim)

    def _lambda(self, matvec, dim: int) -> float:
        """The damping: as given, the SGD recipe's implicit ridge, the Adam run's (``adam_damping``), or
        ``DAMPING_LEVEL`` × the largest eigenvalue of ``matvec`` (power iteration, run only for that default);
        ``damping_rule_`` names the one taken."""
        if self.args.damping is not None:
            self.damping_rule_ = "given"
            return float(self.args.damping)
        ridge, self.damping_rule_ = run_damping(self.args.train_config, self.train_, self.task.checkpoints)
        return ridge if ridge is not None else DAMPING_LEVEL * largest_eigenvalue(matvec, dim, device=self.device)

    def _damped(self, v: torch.Tensor, curvature: Curvature | None = None) -> torch.Tensor:
        """``(H + λI) v`` for each row, on ``curvature`` (default: the whole training set)."""
        return (curvature or self.curvature_).matvec(v) + self.lam_ * v

    def _relative_residual(self, x: torch.Tensor, b: torch.Tensor) -> float:
        return float(((self._damped(x) - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())

    def _checked(self, x: torch.Tensor, b: torch.Tensor, advice: str) -> torch.Tensor:
        """Record the residual of an iterative solve; a non-finite answer or one no better than zero is ``Diverged``
        (the back-off policy's signal: ``backoff.py``)."""
        residual = self._relative_residual(x, b) if all_finite(x) else float("inf")
        self.residual_ = residual
        if diverged(residual):
            raise Diverged(residual, f"{self.name} diverged: relative residual {residual:.3g} (x = 0 has 1); {advice}")
        return x

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ rhs`` for each row of ``rhs`` ``[r, p]``."""
        raise NotImplementedError

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        g_test = self._features(test, test=True).double()
        return (self._solve(g_test) @ self.g_train_.T / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        return ((self._solve(self.g_train_) * self.g_train_).sum(1) / len(self.train_)).float()


@dataclass
class ExplicitArguments(InfluenceArguments):
    projection_dim: int | None = option(None, "work in a random k-dimensional subspace: Pᵀ H P from k curvature "
                                              "products and projected gradients Pᵀ∇ℓ (streamed, seeded), for models "
                                              "too large for a p×p matrix; None keeps the exact p×p curvature",
                                        POSITIVE_INT)


@register("if-explicit", Family.PAIRWISE, ExplicitArguments, uses=("recipe",))
class ExplicitInfluence(InfluenceFunction):
    """Influence functions with the dense damped curvature and a Cholesky solve (the oracle on small models).

    Three forms of the same solve; ``form_`` says which one a fit took:

    * ``dense``: the p × p curvature (float64), Cholesky-factored;
    * ``kernel``: for the GGN of a model with fewer outputs over the training set than parameters (n·C < p: large
      models on small data), the exact same solve through the n·C × n·C matrix AAᵀ + μI, where AᵀA is the GGN
      (``Curvature.ggn_factor``) and μ the damping plus the weight decay (Woodbury):
      (AᵀA + μI)⁻¹v = (v − Aᵀ(AAᵀ + μI)⁻¹Av) / μ;
    * ``projected``: ``projection_dim=k`` (Pᵀ H P, projected gradients). When neither exact form fits in
      ``MEMORY_SHARE`` of the device's memory and ``projection_dim`` was left unset, the fit backs off to
      ``BACKOFF_PROJECTION`` with a ``SolverBackoffWarning``; an explicit ``projection_dim=None`` raises instead.
    """

    projectable = True

    def __init__(self, task: AttributionTask, **options):
        self.explicit_options_ = frozenset(options)
        super().__init__(task, **options)

    def _fit(self, train: AttributionDataset) -> None:
        self.form_ = "projected" if self.projector is not None else None
        if self.form_ is None:
            self.form_ = self._exact_form(train)
        super()._fit(train)

    def _exact_form(self, train: AttributionDataset) -> str:
        """The exact form needing less memory ("kernel" or "dense"), or "projected" after a back-off when neither fits
        in ``MEMORY_SHARE`` of the device's memory."""
        p = self.n_params
        dense_bytes, kernel_bytes = 8 * p * p, math.inf  # the float64 matrix, Cholesky-factored over itself
        ridge = self.args.damping is None or self.args.damping > 0 or self.task.weight_decay > 0
        if self.args.curvature == "ggn" and ridge:
            outputs = Curvature(self.task, train.subset([0]), "ggn", self.device).outputs()
            if outputs is not None:
                rows = len(train) * outputs
                kernel_bytes = 8 * rows * (p + rows)  # the factor A and AAᵀ + μI, factored over itself
        form, need = ("kernel", kernel_bytes) if kernel_bytes < dense_bytes else ("dense", dense_bytes)
        budget = MEMORY_SHARE * device_memory(self.device)
        if need <= budget:
            return form
        text = (f"the exact solve needs {need / 2**30:.1f} GiB (p = {p} parameters, {len(train)} training examples), "
                f"more than {MEMORY_SHARE:.0%} of the {self.device.type} memory")
        if "projection_dim" in self.explicit_options_:
            raise TDAError(f"{text}; projection_dim=None was chosen explicitly: give projection_dim=k to work in a "
                           f"random k-dimensional subspace, or use if-cg / if-ekfac")
        k = min(BACKOFF_PROJECTION, p)
        warnings.warn(f"{self.name}: {text}; backed off to a random {k}-dimensional subspace (projection_dim={k}; pass "
                      "projection_dim to choose)", SolverBackoffWarning, stacklevel=4)
        self.projector = make_projector(self.task, k, self.args.projection_kind, self.args.projection_seed,
                                        self.device)
        return "projected"

    def _projected_dense(self, chunk: int = 256) -> torch.Tensor:
        """Pᵀ H P ``[k, k]`` in float64 from k curvature products (symmetrised)."""
        k = self.projector.dim_out
        rows = []
        for start in range(0, k, chunk):
            directions = self.projector.columns(start, min(start + chunk, k)).double()
            rows.append(self._project64(self.curvature_.matvec(directions)))
        matrix = torch.cat(rows)
        return 0.5 * (matrix + matrix.T)

    def _project64(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ P`` in float64 (the projector works in float32)."""
        k = self.projector.dim_out
        return torch.cat([x @ self.projector.columns(s, min(s + 1024, k)).T.to(x) for s in range(0, k, 1024)], 1)

    def _prepare(self) -> None:
        if self.form_ == "kernel":
            self._prepare_kernel()
            return
        held = [self._undamped_dense()]  # handed over, not kept here: a failed factorisation frees it first
        self.lam_ = self._lambda(lambda v: v @ held[0], held[0].shape[0])
        self.chol_ = self._cholesky(held, self.lam_, self._undamped_dense)

    def _undamped_dense(self) -> torch.Tensor:
        """The dense curvature ``[p, p]`` (or Pᵀ H P ``[k, k]``), float64."""
        return self.curvature_.dense() if self.projector is None else self._projected_dense()

    def _prepare_kernel(self) -> None:
        """The Woodbury form: A (``ggn_factor``), μ = λ + wd and the Cholesky factor of AAᵀ + μI."""
        a = self.curvature_.ggn_factor()
        wd = self.curvature_.wd
        self.lam_ = self._lambda(lambda v: (v @ a.T) @ a + wd * v, a.shape[1])
        self.mu_ = self.lam_ + wd
        self.factor_, self.chol_ = a, self._cholesky([a @ a.T], self.mu_, lambda: a @ a.T)

    def _cholesky(self, held: list[torch.Tensor], shift: float, rebuild) -> torch.Tensor:
        """The lower Cholesky factor of ``matrix + shift·I`` (its lower triangle read; ``held`` = ``[matrix]``, taken
        out of it), written over ``matrix``; where that is not positive definite, a ``TDAError`` naming its smallest
        eigenvalue (of ``rebuild()``'s matrix: the failed factorisation has overwritten this one, freed first)."""
        matrix = held.pop()
        matrix.diagonal().add_(shift)
        if cholesky_in_place(matrix) == 0:
            return matrix
        del matrix
        damped = rebuild()
        damped.diagonal().add_(shift)
        smallest = float(torch.linalg.eigvalsh(damped)[0])
        lam = self.lam_
        raise TDAError(
            f"the damped {self.args.curvature} is not positive definite (smallest eigenvalue {smallest:.3g} "
            f"with damping {lam:.3g}); use curvature='ggn' or raise damping above {lam - smallest:.3g}"
        )

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.form_ == "kernel":
            rhs = rhs.double()
            inner = cholesky_solve(self.chol_, self.factor_ @ rhs.T)  # (AAᵀ + μI)⁻¹ A rhsᵀ
            return (rhs - inner.T @ self.factor_) / self.mu_
        return cholesky_solve(self.chol_, rhs.T.double()).T

    def _self_influence(self) -> torch.Tensor:
        if self.form_ == "kernel":
            z = torch.linalg.solve_triangular(self.chol_, self.factor_ @ self.g_train_.T, upper=False)
            quad = ((self.g_train_ ** 2).sum(1) - (z * z).sum(0)) / self.mu_
            return (quad / len(self.train_)).float()
        z = torch.linalg.solve_triangular(self.chol_, self.g_train_.T, upper=False)
        return ((z * z).sum(0) / len(self.train_)).float()


def device_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: a GPU's own, else this machine's (8 GiB where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 8 * 2**30


@dataclass
class CGArguments(InfluenceArguments):
    max_iter: int = option(200, "block conjugate-gradient iterations at most (each a curvature product over the "
                                "training set per search direction); a solve that misses tol raises with its "
                                "residual", POSITIVE_INT)
    tol: float = option(1e-6, "target relative residual ‖(H + λI)x − v‖ / ‖v‖ of every right-hand side",
                        Interval(0, 1, low_open=True, high_open=True))
    preconditioner: str = option("none", "'ekfac': precondition with the Kronecker (EK-FAC) solution at the same "
                                         "damping (the same answer; Linear and Conv2d layers only); on the digits MLP "
                                         "it took more iterations than none", Options(PRECONDITIONERS))


@register("if-cg", Family.PAIRWISE, CGArguments, uses=("recipe",))
class CGInfluence(BackoffSolver, InfluenceFunction):
    """Influence functions with conjugate gradients on curvature-vector products, all test points as one block.

    Breakdown-free block CG (Ji & Li 2017): the right-hand sides (test points, or every training example for
    self-influence) share one block of orthonormalised search directions, rebuilt each iteration from the
    residuals of those not yet at ``tol`` (directions they have in common are dropped), and every one gets the
    Galerkin correction of the whole block. A block of r right-hand sides explores r directions per curvature
    product, so many of them converge in few iterations: self-influence over n training examples costs a few
    times pairwise attribution, not n / n_test times (``benchmarks/bench_cg_self_influence.py``). A default
    solve that misses ``tol`` backs off (``backoff.py``: the damping raised by decades, then the EK-FAC solution)
    with a ``SolverBackoffWarning``.

    Fitted: ``residual_`` (the largest relative residual of the last solve), ``iterations_`` (its block
    iterations), ``solver_report_`` (the settings used).
    """

    control_options = ("damping", "max_iter", "tol")

    def _prepare(self) -> None:
        super()._prepare()
        self.preconditioner_ = None
        choice = self.args.preconditioner
        if choice == "ekfac":
            ekfac = create("if-ekfac", self.task, device=self.device, max_memory=self.max_memory)
            ekfac.factors_ = fit_factors(self.task, self.train_, "true", True, ekfac.args.batch_size,
                                         device=self.device)
            self.preconditioner_ = ekfac
        self._reset_backoff()

    def _settings(self) -> dict:
        return {"damping": self.lam_}

    def _raise_damping(self, factor: float) -> str:
        old, self.lam_ = self.lam_, self.lam_ * factor
        return f"damping {self.lam_:.3g} (was {old:.3g})"

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        """The Kronecker solution (Q (Λ + wd + λ)⁻¹ Qᵀ) r at the solver's damping λ, or r without a preconditioner."""
        ekfac = self.preconditioner_
        if ekfac is None:
            return r
        inverse = torch.cat([1.0 / (f.eigenvalues.double() + self.task.weight_decay + self.lam_).flatten()
                             for f in ekfac.factors_]).to(r)
        return ekfac._unrotate(ekfac._rotate(r) * inverse)

    def _attempt(self, b: torch.Tensor) -> torch.Tensor:
        """Block CG on the rows of ``b`` in blocks of at most ``BLOCK_ROWS``; ``Diverged`` when a row misses ``tol``."""
        b = b.double().to(self.device)
        if len(b) <= BLOCK_ROWS:
            return self._block_cg(b)
        parts, iterations, worst = [], 0, 0.0
        for start in range(0, len(b), BLOCK_ROWS):
            parts.append(self._block_cg(b[start : start + BLOCK_ROWS]))
            iterations, worst = iterations + self.iterations_, max(worst, self.residual_)
        self.iterations_, self.residual_ = iterations, worst
        return torch.cat(parts)

    def _block_cg(self, b: torch.Tensor) -> torch.Tensor:
        """Breakdown-free block CG (Ji & Li 2017) on the rows of ``b``; ``Diverged`` when a row misses ``tol``."""
        max_iter, tol = self.args.max_iter, self.args.tol
        x = torch.zeros_like(b)
        r = b.clone()
        b_norm = b.norm(dim=1).clamp_min(1e-300)
        residuals = r.norm(dim=1) / b_norm
        active = residuals > tol
        iterations = 0
        p = _orthonormal_rows(self._precondition(r[active])) if bool(active.any()) else None
        while p is not None and iterations < max_iter:
            iterations += 1
            q = self._damped(p)
            pq = p @ q.T
            pq = 0.5 * (pq + pq.T)
            chol, info = torch.linalg.cholesky_ex(pq)
            if int(info) != 0:  # the damped curvature is not positive definite on the search directions
                break
            alpha = torch.cholesky_solve(p @ r.T, chol)  # [s, r]
            x += alpha.T @ p
            r -= alpha.T @ q
            residuals = r.norm(dim=1) / b_norm
            if not bool(torch.isfinite(residuals).all()):
                break
            active = residuals > tol
            if not bool(active.any()):
                break
            z = self._precondition(r[active])
            beta = -torch.cholesky_solve(q @ z.T, chol)  # [s, active]
            p = _orthonormal_rows(z + beta.T @ p)
        self.iterations_ = iterations
        worst = float(residuals.max()) if bool(torch.isfinite(residuals).all()) else float("inf")
        self.residual_ = worst
        if not worst <= tol:
            raise Diverged(worst, f"CG did not converge in max_iter={max_iter} iterations: relative residual "
                                  f"{worst:.2e} > tol={tol:g}; raise max_iter or damping (now {self.lam_:.3g})")
        return x


def _orthonormal_rows(w: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor | None:
    """An orthonormal basis (rows) of the span of the rows of ``w``, directions below ``rtol`` (relative, on the
    row-normalised Gram's eigenvalues) dropped; None when nothing is left."""
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    values, vectors = torch.linalg.eigh(w @ w.T)
    keep = values > rtol * values.max().clamp_min(1e-300)
    if not bool(keep.any()):
        return None
    return (vectors[:, keep] / values[keep].sqrt()).T @ w
