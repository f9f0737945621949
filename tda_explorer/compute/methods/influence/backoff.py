"""One back-off policy for the iterative influence solvers (``if-lissa``, ``if-astra``, ``if-cg``, ``if-arnoldi``).

No default fails: when a solve with the solver's *default* settings diverges (a non-finite answer, iterates that
grow, a residual no better than x = 0 or a CG that misses its tolerance), the solver backs off by itself, in
this order, with a ``SolverBackoffWarning`` at each stage that says what happened and what is used now:

1. halve the step (ASTRA's ``step``; LiSSA's step 1/s, i.e. double its ``scale``), up to ``HALVINGS`` times;
2. raise the damping by a decade, up to ``DAMPING_RAISES`` times (the system solved changes: the report says to
   what);
3. fall back to the EK-FAC solution: ``if-ekfac`` with its defaults on the same model and data (ASTRA reuses its
   own factors), for models whose tracked layers EK-FAC supports.

Only a setting the user chose explicitly may raise: a stage runs only while the options it would override were
left at their defaults. Halving the step needs the step option (``step_options``) unset; raising the damping or
falling back changes the system solved, so it needs every one of the solver's ``control_options`` unset. A solve
that diverges with one of those given explicitly raises a ``TDAError`` naming it, as before.

The fitted attributor keeps ``solver_report_``: the stages taken (each a sentence), the settings finally used
(step or scale, damping) and whether it fell back to EK-FAC; after a back-off ``config()`` carries it as
``solver_backoff``. Settings found by one solve (``attribute``) are where the next one (``self_influence``)
starts, and the budget of halvings and damping raises is per fit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from tda_explorer._validation import TDAError, all_finite
from tda_explorer.compute.catalogue import create
from tda_explorer.compute.engine.kfac import fit_factors, tracked_layers
from tda_explorer.compute.engine.task import AttributionTask

HALVINGS = 3  # step halvings at most, per fit
DAMPING_RAISES = 3  # damping raises at most, per fit
DAMPING_FACTOR = 10.0  # each raise multiplies the damping by this


class SolverBackoffWarning(UserWarning):
    """An iterative influence solver changed a default setting (step, damping) or fell back to EK-FAC because its
    default diverged; the message says what happened and which setting is used now."""


class Diverged(Exception):  # noqa: N818 - a signal between a solve attempt and the policy, never raised to users
    """One solve attempt failed: ``residual`` (inf for a non-finite answer) and ``advice`` naming the options."""

    def __init__(self, residual: float, message: str):
        super().__init__(message)
        self.residual, self.message = residual, message


def diverged(residual: float) -> bool:
    """Whether an answer with this relative residual ‖Ax − v‖/‖v‖ is refused: non-finite or no better than x = 0."""
    return not residual < 1


class BackoffSolver:
    """Mixin for the iterative solvers: records the options given explicitly and runs every solve under the policy.

    A solver sets ``step_options`` (the options whose default step the policy may halve; empty: no step) and
    ``control_options`` (every option whose explicit value forbids changing the system), and implements
    ``_attempt(rhs)`` (one solve with the current settings, raising ``Diverged``), ``_halve_step()`` and
    ``_raise_damping(factor)`` (each returning the new setting in words), ``_ekfac_solve(rhs)`` (the fallback) and
    ``_settings()`` (the settings used now, plain values). It calls ``_reset_backoff()`` when fitted.
    """

    step_options: ClassVar[tuple[str, ...]] = ()
    control_options: ClassVar[tuple[str, ...]] = ("damping",)

    def __init__(self, task: AttributionTask, **options: Any):
        self.explicit_options_ = frozenset(options)
        super().__init__(task, **options)

    # -- hooks --------------------------------------------------------------------------------------------------
    def _attempt(self, rhs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _halve_step(self) -> str:
        raise NotImplementedError

    def _raise_damping(self, factor: float) -> str:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _ekfac_solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(P + D)⁻¹ rhs`` with ``if-ekfac``'s defaults fitted on the training set (factors only, once)."""
        if getattr(self, "fallback_", None) is None:
            tracked_layers(self.task)  # every tracked module must be factored: no default restriction here
            ekfac = create("if-ekfac", self.task, device=self.device, max_memory=self.max_memory,
                           train_config=getattr(self.args, "train_config", None))
            ekfac.train_ = self._backoff_train()
            ekfac.factors_ = fit_factors(self.task, ekfac.train_, ekfac.args.fisher, True, ekfac.args.batch_size,
                                         device=self.device)
            self.fallback_ = ekfac
        return self.fallback_._precondition(rhs.double())

    def _backoff_train(self):
        return self.train_

    # -- the policy ---------------------------------------------------------------------------------------------
    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ rhs`` for each row of ``rhs`` under the back-off policy."""
        return self._solve_with_backoff(rhs)

    def _reset_backoff(self) -> None:
        self.fallback_ = None
        self.solver_report_: dict[str, Any] = {"stages": [], "halvings": 0, "damping_raises": 0,
                                               "fallback": None, "settings": self._settings()}

    def _explicit(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if n in self.explicit_options_]

    def _warn(self, text: str) -> None:
        self.solver_report_["stages"].append(text)
        warnings.warn(f"{self.name}: {text}", SolverBackoffWarning, stacklevel=2)

    def _solve_with_backoff(self, rhs: torch.Tensor, attempt: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            ) -> torch.Tensor:
        """``attempt(rhs)`` (default ``self._attempt``) under the back-off policy; the answer, or a ``TDAError``."""
        attempt = attempt or self._attempt
        report = self.solver_report_
        if report["fallback"]:
            return self._ekfac_solve(rhs)
        while True:
            try:
                x = attempt(rhs)
                report["settings"] = self._settings()
                return x
            except Diverged as err:
                failure = err
            what = f"diverged (relative residual {failure.residual:.3g})" if failure.residual >= 1 else \
                f"did not converge (relative residual {failure.residual:.3g})"
            explicit_step = self._explicit(self.step_options)
            if self.step_options and not explicit_step and report["halvings"] < HALVINGS:
                report["halvings"] += 1
                setting = self._halve_step()
                self._warn(f"the default step {what}; halved it ({report['halvings']} of {HALVINGS}): {setting}")
                continue
            explicit = self._explicit(tuple(dict.fromkeys(self.step_options + self.control_options)))
            if explicit:
                given = ", ".join(f"{n}={getattr(self.args, n)!r}" for n in explicit)
                raise TDAError(f"{failure.message} (chosen explicitly: {given}; a default would have been backed "
                               "off)")
            if report["damping_raises"] < DAMPING_RAISES:
                report["damping_raises"] += 1
                setting = self._raise_damping(DAMPING_FACTOR)
                self._warn(f"{what} at the default settings; raised the damping {DAMPING_FACTOR:g}× "
                           f"({report['damping_raises']} of {DAMPING_RAISES}): {setting}")
                continue
            try:
                x = self._ekfac_solve(rhs)
            except TDAError as err:
                raise TDAError(f"{failure.message}; after {report['halvings']} step halvings and "
                               f"{report['damping_raises']} damping raises the EK-FAC fallback is unavailable too: "
                               f"{err}") from None
            if not all_finite(x):
                raise TDAError(f"{failure.message}; the EK-FAC fallback is non-finite as well (a non-finite model "
                               "or data?)")
            report["fallback"] = "if-ekfac"
            report["settings"] = {**self._settings(), "fallback": "if-ekfac"}
            self._warn(f"{what} after {report['halvings']} step halvings and {report['damping_raises']} damping "
                       "raises; fell back to the EK-FAC solution (if-ekfac's defaults) for this and later solves")
            return x

    def config(self) -> dict[str, Any]:
        """The method's configuration, with ``solver_backoff`` (stages and settings used) when the fit backed off."""
        config = super().config()
        report = getattr(self, "solver_report_", None)
        if report and report["stages"]:
            config["solver_backoff"] = {"stages": list(report["stages"]), "settings": dict(report["settings"]),
                                        "fallback": report["fallback"]}
        return config
