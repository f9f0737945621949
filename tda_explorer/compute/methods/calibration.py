"""Calibrating a method on the user's own model: its damping, Fisher kind, projection dimension and step chosen
against a cheap truth built on that model, within a time budget.

The truth (``CalibrationTruth``), one of:

* ``replay``: the run was recorded (``RunRecorder``): same-seed replays of a few small removals (``removals``
  random disjoint groups of ``removal_size`` training examples), each test measurement's change when a group is
  left out. A method is scored per test point by the Spearman correlation, across the groups, of its predicted
  change (the sum of its scores over the group) with the replayed one: the LDS of small removals.
* ``retraining``: the same removal effects from the retraining engine: the recipe (model factory and
  ``TrainConfig``) trained in lock-step on everything and without each group, same seed and batches
  (``train_weighted``); or a session's retrainer (its ``Retrainer``, or the user's ``retrain`` function, paired
  seeds), built by the caller and handed in with ``removal_truth``.
* ``further-training``: only the final model and its training recipe (a ``TrainConfig``): the final-model-only truth
  (Wei et al. 2025, ``compute.training.further_training``): the recipe's epochs of further training from the final
  model, paired runs each leaving out one of ``examples`` chosen training examples; scored per test point by the
  cosine of the method's (centred) scores on those examples with the (centred) effects.

Each is built once per model, data and recipe and kept in memory (the last few), so calibrating a second method on
the same model does not pay for it again.

The search (``calibrate``): the configured default runs first (fit on the training set, attribute at most
``test_points`` test points), then the candidates the method's declared options allow, one option at a time from the
best setting so far, in order of importance: ``damping`` over six decades around the default (nearest decades first; a
``None`` default is read off the fitted default where the method resolves it: the influence functions' ``lam_``, or
for a relative damping the level the default's rule amounts to, K-FAC's / EK-FAC's / ASTRA's
``resolved_relative_damping``), the other Fisher / curvature kinds (``fisher``, ``curvature``), ASTRA's ``step``, then
the projection dimension (halved, doubled, ...; only where the method projects by default: an exact default is what a
projection approximates). A candidate replaces the best so far only when its mean score is higher by more than two
standard errors of the paired per-test-point difference *and* it stays higher in 95% of bootstrap resamples of the
truth's groups (or examples): every test point is scored on the same few removals, so their noise is shared and the
per-test-point error alone let a cheap truth's noise move the choice. The chosen setting is never worse than the
default on the truth (ties keep the default), and a truth too coarse to separate two settings keeps the default.

Every trial is timed. Without ``budget_s`` the trials stop at 16× the default's own run (calibrating and computing
with the choice then stay within 20× of computing the default); with it, the whole
calibration (truth, default and candidates) stays within ``budget_s``: a candidate starts only when the slowest trial
so far still fits, a candidate far slower than the default (another curvature kind can be) is stopped at the
budget's end (``jobs.time_limit``: the long loops check it) and recorded as "stopped: budget", and a budget that
cannot hold the default and one more setting is refused, naming the minimum measured from the default's run.
Methods with nothing to tune return at once with their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.catalogue import Interval, Options
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.training.further_training import (
    FurtherTrainingTruth,
    further_training_truth,
)
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.compute.training.train import TrainConfig, stacked_outputs, train_weighted
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import JobCancelled, TimeLimitExceeded, check_cancelled, report_progress, time_limit

#: Without ``budget_s``, the trials (the default's included) stop at this many times the default's own run, so that
#: calibrating and then computing with the choice stay within 20× of computing the default (the truth aside: it is
#: built once per model and data).
DEFAULT_BUDGET_FACTOR = 16.0
#: A candidate replaces the best setting so far only when it is better by more than this many standard errors of the
#: paired per-test-point difference.
MARGIN_SE = 2.0
#: ... and wins in at least this share of ``BOOTSTRAPS`` resamples (with replacement) of the truth's groups or examples.
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAPS = 200
#: Decades tried around the default damping, nearest first (six decades in all with the default's).
DAMPING_DECADES = (-1, 1, -2, 2, -3, 3)
#: Kinds of curvature / Fisher a method may declare.
KIND_OPTIONS = ("fisher", "curvature")
#: Truths kept in memory (the last ones built).
TRUTH_CACHE_SIZE = 4
CALIBRATION_TRUTHS = ("replay", "retraining", "further-training")

NEEDS_TRUTH = ("calibrate needs a recording or a final model with a training recipe: recording=RunRecorder(...) of "
               "the training run (same-seed replays of a few small removals), or recipe=TrainConfig(...) saying how "
               "the final model was trained (further training from the final model; with a model factory, "
               "recipe={'model_factory': f, 'train_config': config} retrains it without a few small groups)")

_TRUTHS: OrderedDict[str, CalibrationTruth] = OrderedDict()


@dataclass
class CalibrationTruth:
    """A cheap truth on the user's model that settings are scored against.

    ``kind``: "replay", "retraining" or "further-training"; ``test``: the test points it measures; removal truths keep
    ``groups`` (training positions removed together) and ``effects`` ``[n_groups, n_test]`` (removed − full: positive
    when the group was a proponent); the further-training truth keeps ``further``. ``seconds``: what building it took.
    """

    kind: str
    description: str
    test: AttributionDataset
    seconds: float
    groups: list[list[int]] | None = None
    effects: torch.Tensor | None = None
    further: FurtherTrainingTruth | None = None

    @property
    def units(self) -> int:
        """How many independent measurements the truth rests on: its removal groups, or its left-out examples."""
        return len(self.further.ids) if self.further is not None else len(self.groups)

    def predicted(self, scores: torch.Tensor, train: AttributionDataset) -> torch.Tensor:
        """What scores ``[n_test, n_train]`` predict for each of the truth's units ``[units, n_test]``: the change when
        a group is removed (the sum of its scores), or the (centred) scores of each left-out example."""
        scores = scores.double()
        if self.further is not None:
            columns = scores[:, train.positions(self.further.ids, "ids")]
            if self.further.centred:
                columns = columns - columns.mean(1, keepdim=True)
            return columns.T
        return torch.stack([scores[:, g].sum(1) for g in self.groups])

    def agreement(self, predicted: torch.Tensor, units: torch.Tensor | None = None) -> torch.Tensor:
        """Per test point ``[n_test]``: the agreement of ``predicted`` (``predicted``'s output) with the truth over its
        units, or over the units ``units`` (indices, repeats allowed: a bootstrap resample)."""
        actual = self.further.effects.T.double() if self.further is not None else self.effects.double()
        if units is not None:
            predicted, actual = predicted[units], actual[units]
        if self.further is not None:
            return torch.nn.functional.cosine_similarity(predicted, actual, dim=0)
        return _spearman_columns(predicted, actual)

    def per_test(self, scores: torch.Tensor, train: AttributionDataset) -> torch.Tensor:
        """Agreement ``[n_test]`` of scores ``[n_test, n_train]`` with this truth, per test point: the Spearman
        correlation across groups of the predicted change with the actual one (removal truths), or the cosine with
        the further-training effects (NaN where undefined, e.g. constant scores)."""
        return self.agreement(self.predicted(scores, train))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along dim 0 (from 0), ties given their mean rank."""
    below = (x.unsqueeze(0) < x.unsqueeze(1)).sum(1)
    equal = (x.unsqueeze(0) == x.unsqueeze(1)).sum(1)
    return (below + 0.5 * (equal - 1)).double()


def _spearman_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (``[m, k]`` each); NaN where one is
    constant."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denominator = (ra.square().sum(0) * rb.square().sum(0)).sqrt()
    return torch.where(denominator > 0, (ra * rb).sum(0) / denominator.clamp_min(1e-300),
                       torch.full_like(denominator, float("nan")))


# -- the truths ----------------------------------------------------------------------------------------------------
def sample_test_points(test: AttributionDataset, n: int, seed: int = 0) -> AttributionDataset:
    """At most ``n`` test points, a seeded random subset in their order (all of them when there are no more)."""
    n = check_positive_int(n, "test_points")
    if len(test) <= n:
        return test
    positions = sorted(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return test.subset(positions)


def removal_groups(train: AttributionDataset, removals: int = 10, size: int | None = None, seed: int = 0
                   ) -> list[list[Any]]:
    """``removals`` disjoint random groups of training ids of ``size`` each (default: 5% of the training set, at
    least 1, fewer groups when they would not fit): the small removals a removal truth replays."""
    removals = check_positive_int(removals, "removals")
    n = len(train)
    size = max(1, n // 20) if size is None else check_positive_int(size, "removal_size")
    if size >= n:
        raise TDAError(f"removal_size must be below the training set's size ({n}), got {size}")
    count = min(removals, n // size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [[train.ids[p] for p in order[g * size:(g + 1) * size]] for g in range(count)]


def removal_truth(kind: str, train: AttributionDataset, test: AttributionDataset, groups: Sequence[Sequence[Any]],
                  effects: torch.Tensor, seconds: float = 0.0, description: str = "") -> CalibrationTruth:
    """A removal truth from effects measured elsewhere (a retraining engine): ``effects[g, x]`` the change of test
    measurement x when the training ids ``groups[g]`` are removed (removed − full)."""
    if kind not in CALIBRATION_TRUTHS[:2]:
        raise TDAError(f"kind must be 'replay' or 'retraining' for a removal truth, got {kind!r}")
    positions = train.group_positions([list(g) for g in groups], "groups")
    effects = torch.as_tensor(effects).double().cpu()
    if effects.shape != (len(positions), len(test)):
        raise TDAError(f"effects must be [n_groups, n_test] = [{len(positions)}, {len(test)}], got "
                       f"{list(effects.shape)}")
    if len(positions) < 3:
        raise TDAError(f"a removal truth needs at least 3 groups (a rank correlation across them), got "
                       f"{len(positions)}")
    size = round(sum(map(len, positions)) / len(positions))
    description = description or f"{len(positions)} removals of {size} training examples, {len(test)} test points"
    return CalibrationTruth(kind, description, test, float(seconds), positions, effects)


def _remember(key: str, build) -> CalibrationTruth:
    if key in _TRUTHS:
        _TRUTHS.move_to_end(key)
        return _TRUTHS[key]
    truth = build()
    _TRUTHS[key] = truth
    while len(_TRUTHS) > TRUTH_CACHE_SIZE:
        _TRUTHS.popitem(last=False)
    return truth


def replay_truth(recording: RunRecorder, task: AttributionTask, train: AttributionDataset, test: AttributionDataset,
                 removals: int = 10, removal_size: int | None = None, seed: int = 0) -> CalibrationTruth:
    """The same-seed truth of a recorded run: ``recording.removal_effects`` for ``removal_groups`` on ``test``,
    measured with the task's test measurement."""
    finished_recording(recording, "calibrating on the same-seed truth (replays without a few small groups)")
    if recording.data_fingerprint != train.fingerprint():
        raise TDAError("recording: it was recorded on other training data than the train given to calibrate")
    groups = removal_groups(train, removals, removal_size, seed)
    key = config_fingerprint("replay", recording.fingerprint(), task.config(), test.fingerprint(),
                             [len(g) for g in groups], seed)

    def build() -> CalibrationTruth:
        t0 = time.perf_counter()
        effects = recording.removal_effects(groups, test, measurement=task.test_measurement)
        return removal_truth("replay", train, test, groups, effects, time.perf_counter() - t0,
                             f"{len(groups)} same-seed replays of the recorded run, each without {len(groups[0])} "
                             f"training examples, {len(test)} test points")

    return _remember(key, build)


def retraining_truth(task: AttributionTask, train: AttributionDataset, test: AttributionDataset, factory: Any,
                     recipe: TrainConfig, removals: int = 10, removal_size: int | None = None, seed: int = 0,
                     device: str | torch.device | None = None) -> CalibrationTruth:
    """The retraining engine's same-seed truth: the recipe (``factory(seed) -> model`` and its ``TrainConfig``) trained
    once on everything and once without each of ``removal_groups``, in lock-step with the same initialisation and
    batches (``train_weighted``), each test measurement's change."""
    if not callable(factory):
        raise TDAError(f"model_factory must be a function seed -> nn.Module, got {type(factory).__name__}")
    if not train.in_memory or not test.in_memory:
        raise TDAError("retraining needs in-memory data: train.to_memory() / test.to_memory(), or calibrate with "
                       "recording=RunRecorder(...) instead")
    groups = removal_groups(train, removals, removal_size, seed)
    key = config_fingerprint("retraining", factory, recipe.to_dict(), task.config(), train.fingerprint(),
                             test.fingerprint(), [len(g) for g in groups], seed)

    def build() -> CalibrationTruth:
        t0 = time.perf_counter()
        weights = torch.ones(1 + len(groups), len(train))
        for g, rows in enumerate(train.group_positions(groups)):
            weights[1 + g, rows] = 0
        params = train_weighted(factory, train.inputs, train.labels, weights, recipe, [recipe.seed] * len(weights),
                                device=device)
        outputs = stacked_outputs(task.model, params, test.inputs, device)
        losses = torch.stack([task.test_measurement(o, test.labels.to(o.device)) for o in outputs]).double().cpu()
        return removal_truth("retraining", train, test, groups, losses[1:] - losses[0], time.perf_counter() - t0,
                             f"the recipe retrained {len(groups)} times, each without {len(groups[0])} training "
                             f"examples (same seed and batches as the full run), {len(test)} test points")

    return _remember(key, build)


def recipe_factory(recipe: Any) -> Any:
    """The model factory in ``recipe`` (a retraining ``Recipe``'s ``factory``, a dict's ``model_factory``), or None."""
    factory = recipe.get("model_factory") if isinstance(recipe, dict) else getattr(recipe, "factory", None)
    return factory if callable(factory) else None


def recipe_config(recipe: Any) -> TrainConfig | None:
    """The ``TrainConfig`` in ``recipe``: a ``TrainConfig``, anything with one as ``.config`` (a retraining
    ``Recipe``) or a dict with ``train_config`` (a session's ``recipe`` resource); None for None."""
    if recipe is None:
        return None
    for config in (recipe, getattr(recipe, "config", None),
                   recipe.get("train_config") if isinstance(recipe, dict) else None):
        if isinstance(config, TrainConfig):
            return config
    raise TDAError(f"recipe must be the TrainConfig the final model was trained with (or a Recipe / dict holding "
                   f"one as train_config), got {type(recipe).__name__}")


def further_truth(task: AttributionTask, train: AttributionDataset, test: AttributionDataset, recipe: TrainConfig,
                  examples: int = 24, epochs: int | None = None, lr: float | None = None, seeds: Sequence[int] = (0,),
                  seed: int = 0, device: str | torch.device | None = None) -> CalibrationTruth:
    """The final-model-only truth: ``epochs`` (default: the recipe's) of further training from the task's model with
    the recipe's optimizer, batch size and weight decay at ``lr`` (default the recipe's), leaving out each of
    ``examples`` random training examples in paired runs, averaged over ``seeds``.

    As long as the recipe by default: a short horizon measures first-order effects (one step of further training is
    Grad-Dot), which pushes an influence function's damping up; on the zoo's digits logistic regression 5 epochs of
    100 chose a damping 100× the default and lost a quarter of EK-FAC's LDS, while the whole recipe kept it."""
    if not train.in_memory or not test.in_memory:
        raise TDAError("further training needs in-memory data: train.to_memory() / test.to_memory(), or calibrate "
                       "with recording=RunRecorder(...) instead")
    examples = min(check_positive_int(examples, "examples"), len(train))
    if examples < 2:
        raise TDAError("the further-training truth needs at least 2 training examples to leave out")
    epochs = recipe.epochs if epochs is None else check_positive_int(epochs, "epochs")
    lr = recipe.lr if lr is None else float(lr)
    positions = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:examples].tolist())
    ids = [train.ids[p] for p in positions]
    device = str(device or "cpu")
    key = config_fingerprint("further-training", model_fingerprint(task.model), task.config(), train.fingerprint(),
                             test.fingerprint(), recipe.to_dict(), examples, epochs, lr, list(seeds), seed)

    def build() -> CalibrationTruth:
        t0 = time.perf_counter()
        truth = further_training_truth(task, train, test, ids, epochs, lr, recipe.batch_size, seeds,
                                       weight_decay=recipe.loss_weight_decay, device=device,
                                       optimizer=recipe.optimizer, momentum=recipe.momentum)
        return CalibrationTruth("further-training", f"{epochs} epoch{'s' * (epochs > 1)} of further training "
                                f"({recipe.optimizer}, lr {lr:g}) from the final model without each of {examples} "
                                f"training examples, {len(seeds)} seed{'s' * (len(seeds) > 1)}, {len(test)} test "
                                "points", test, time.perf_counter() - t0, further=truth)

    return _remember(key, build)


# -- the result ----------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """What ``calibrate`` chose and why.

    ``options``: the chosen settings that differ from the configured default (empty: the default was kept);
    ``default``: the tuned options as configured; ``truth`` and ``truth_description``: what the settings were scored
    against (None: nothing to tune); ``score`` and ``default_score``: the mean agreement with the truth of the chosen
    setting and of the default; ``seconds``: the whole calibration, ``truth_seconds`` what building the truth took
    (0 when it was reused); ``trials``: one row per setting (``stage, options, score, seconds, status, chosen``).
    """

    method: str
    options: dict[str, Any]
    default: dict[str, Any]
    truth: str | None
    truth_description: str
    score: float | None
    default_score: float | None
    seconds: float
    truth_seconds: float
    budget_s: float | None
    trials: pd.DataFrame

    def summary(self) -> str:
        """One line: the chosen settings, the truth, the score beside the default's, the settings tried."""
        if self.truth is None:
            return (f"{self.method}: nothing to calibrate (no damping, Fisher kind, projection or step option to "
                    "tune); its defaults are kept")
        chosen = ", ".join(f"{k}={_text(v)}" for k, v in self.options.items()) or "the default kept"
        tried = int((self.trials["status"].str.startswith("ok")).sum())
        return (f"{self.method}: {chosen}; score {self.score:.3f} against the default's {self.default_score:.3f} on "
                f"the {self.truth} truth ({self.truth_description}); {tried} of {len(self.trials)} settings tried in "
                f"{self.seconds:.1f} s")

    def __str__(self) -> str:
        return self.summary()


def _text(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- the candidates ------------------------------------------------------------------------------------------------
def _allowed(field: dataclasses.Field, value: Any) -> bool:
    check = field.metadata.get("check")
    if check is None:
        return True
    try:
        check.check(field.name, value)
    except TDAError:
        return False
    return True


def _damping_options(fields: dict[str, dataclasses.Field], current: Any, fitted: Any, best: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """Damping candidates over six decades around ``current`` (nearest first); a ``None`` default is read off the
    fitted default: its ``lam_`` where the damping is absolute; for the Kronecker family and ASTRA, whose option also
    takes a kind (``damping_kind``), the damping in use in the form it has (``resolved_damping``: one λ on every layer,
    as the SGD recipe's ridge, an Adam run's or a match to a multiple of the exact λ give it, stays absolute; a level
    per layer stays relative); else the field's own default (TRAK's None means its default level)."""
    field = fields["damping"]
    relative = "RELATIVE" in field.metadata.get("help", "")
    kind: dict[str, Any] = {"damping_kind": best["damping_kind"]} if "damping_kind" in best else {}
    if current is None:
        resolved = getattr(fitted, "lam_", None)
        if relative and hasattr(fitted, "resolved_damping") and "damping_kind" in fields:
            current, form = fitted.resolved_damping()
            kind = {"damping_kind": form} if form != fields["damping_kind"].default else {}
        elif relative:
            current = field.default if isinstance(field.default, (int, float)) else 1e-3
        elif isinstance(resolved, (int, float)) and math.isfinite(resolved) and resolved > 0:
            current = float(resolved)
        else:
            return []
    if current == 0:
        values = [10.0 ** k for k in (-4, -3, -2, -1, 0)]
    else:
        values = [float(current) * 10.0 ** k for k in DAMPING_DECADES]
    return [{"damping": v, **kind} for v in values if _allowed(field, v)]


def _stage_options(name: str, attributor: Any, fields: dict[str, dataclasses.Field], best: dict[str, Any],
                   fitted: Any) -> list[dict[str, Any]]:
    """The options stage ``name`` tries (each a dict of the options it sets), from the best setting so far."""
    field = fields[name]
    current = best.get(name, getattr(attributor.args, name))
    if name == "damping":
        return _damping_options(fields, current, fitted, best)
    return [{name: v} for v in _stage_values(name, attributor, field, current)]


def _stage_values(name: str, attributor: Any, field: dataclasses.Field, current: Any) -> list[Any]:
    """The values a stage other than the damping tries for its option ``name`` (now at ``current``)."""
    check = field.metadata.get("check")
    if name in KIND_OPTIONS:
        return [v for v in check.values if v != current] if isinstance(check, Options) else []
    if name == "step":
        if not isinstance(check, Interval) or not isinstance(current, (int, float)):
            return []
        return [v for v in (current / 2, current * 1.5, current / 4, current * 2) if _allowed(field, v)]
    if name == "projection_dim":
        if current is None or not field.metadata.get("cli"):
            return []  # exact by default (what a projection approximates), or the method does not project
        values = [current // 2, current * 2, current // 4, current * 4]
        return [v for v in dict.fromkeys(values) if v >= 1 and v < attributor.n_params and _allowed(field, v)]
    return []


def stages(attributor: Any) -> list[str]:
    """The options ``calibrate`` tunes for this attributor, in the order it tunes them."""
    fields = {f.name: f for f in dataclasses.fields(type(attributor).Arguments)}
    out = []
    if "damping" in fields:
        out.append("damping")
    out += [k for k in KIND_OPTIONS if k in fields and isinstance(fields[k].metadata.get("check"), Options)
            and len(fields[k].metadata["check"].values) > 1]
    step = fields.get("step")
    if step is not None and isinstance(step.metadata.get("check"), Interval):
        out.append("step")
    projection = fields.get("projection_dim")
    if projection is not None and projection.metadata.get("cli") and attributor.args.projection_dim is not None:
        out.append("projection_dim")
    return out


# -- the search ----------------------------------------------------------------------------------------------------
def _run_trial(attributor: Any, options: dict[str, Any], train: AttributionDataset, truth: CalibrationTruth
               ) -> tuple[Any, torch.Tensor, str]:
    """Fit the method with ``options`` and score it on the truth: the fitted attributor, what it predicts for each of
    the truth's units (``CalibrationTruth.predicted``) and a status ("ok", or "ok (solver backed off)")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        candidate = type(attributor)(attributor.task, **options)
        candidate.fit(train)
        scores = candidate.attribute(truth.test).scores
    backed_off = any(w.category.__name__ == "SolverBackoffWarning" for w in caught)  # influence.backoff's
    predicted = truth.predicted(scores, train)
    if not torch.isfinite(truth.agreement(predicted)).any():
        raise TDAError("its scores agree with the truth nowhere (constant or non-finite scores)")
    return candidate, predicted, "ok (solver backed off)" if backed_off else "ok"


def _better(candidate: torch.Tensor, best: torch.Tensor, truth: CalibrationTruth, seed: int = 0) -> bool:
    """Whether the setting that predicts ``candidate`` beats the one that predicts ``best`` (``_run_trial``'s
    predictions) on ``truth``: higher in mean agreement by more than ``MARGIN_SE`` standard errors of the paired
    per-test-point difference, and in at least ``BOOTSTRAP_LEVEL`` of ``BOOTSTRAPS`` resamples of the truth's units
    (every test point shares the same few groups or examples, so their noise is common to all test points and the
    standard error alone overstates a difference)."""
    a, b = truth.agreement(candidate), truth.agreement(best)
    both = torch.isfinite(a) & torch.isfinite(b)
    if int(both.sum()) < 2 or not float(a.nanmean()) > float(b.nanmean()):
        return False
    diff = (a - b)[both]
    if not float(diff.mean()) > MARGIN_SE * float(diff.std() / math.sqrt(len(diff))):
        return False
    gen = torch.Generator().manual_seed(seed)
    wins = 0
    for _ in range(BOOTSTRAPS):
        units = torch.randint(truth.units, (truth.units,), generator=gen)
        wins += float((truth.agreement(candidate, units) - truth.agreement(best, units)).nanmean()) > 0
    return wins >= BOOTSTRAP_LEVEL * BOOTSTRAPS


def _holds(test: AttributionDataset, points: AttributionDataset) -> bool:
    """Whether ``test`` holds the test points ``points`` (same ids and, for in-memory data, the same examples)."""
    if not set(points.ids) <= set(test.ids):
        return False
    if not (test.in_memory and points.in_memory):
        return True
    held = test.subset(test.positions(points.ids))
    return torch.equal(held.inputs, points.inputs) and torch.equal(held.labels, points.labels)


def calibrate(attributor: Any, train: AttributionDataset, test: AttributionDataset | None = None, *,
              budget_s: float | None = None, recording: RunRecorder | None = None, recipe: Any = None,
              truth: CalibrationTruth | None = None, test_points: int = 64, removals: int = 10,
              removal_size: int | None = None, examples: int = 24, epochs: int | None = None, lr: float | None = None,
              seed: int = 0, retrain: bool = True) -> Calibration:
    """Choose ``attributor``'s damping, Fisher kind, step and projection dimension against a cheap truth on its
    model (see the module docstring); the attributor itself is left as it is (``Attributor.calibrate`` applies the
    result). ``truth`` is a prebuilt ``CalibrationTruth``; else ``recording`` gives the replay truth, a ``recipe``
    with a model factory (a retraining ``Recipe``, or a dict with ``model_factory`` and ``train_config``) the
    retraining truth (unless ``retrain=False``), and a recipe's ``TrainConfig`` alone the further-training truth;
    ``test`` defaults to a given truth's test points, else to the recipe's ``test`` where it has one."""
    t_start = time.perf_counter()
    name = attributor.name
    if not isinstance(train, AttributionDataset):
        raise TDAError(f"train must be an AttributionDataset, got {type(train).__name__}")
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0 or not math.isfinite(budget_s)):
        raise TDAError(f"budget_s must be a positive number of seconds (or None: {DEFAULT_BUDGET_FACTOR:g}× the "
                       f"default's run), got {budget_s!r}")
    tuned = stages(attributor)
    base = dict(attributor.options_)
    configured = {k: getattr(attributor.args, k) for k in tuned}
    columns = ["stage", "options", "score", "seconds", "status", "chosen"]
    if not tuned:
        return Calibration(name, {}, configured, None, "", None, None, time.perf_counter() - t_start, 0.0, budget_s,
                           pd.DataFrame(columns=columns))
    if test is None:
        test = truth.test if isinstance(truth, CalibrationTruth) else getattr(recipe, "test", None)
        if not isinstance(test, AttributionDataset):
            raise TDAError("test: give the test points the truth measures (calibrate(train, test, ...))")
    if not isinstance(test, AttributionDataset):
        raise TDAError(f"test must be an AttributionDataset, got {type(test).__name__}")
    if isinstance(truth, CalibrationTruth) and not _holds(test, truth.test):
        raise TDAError("test: the truth given measures other test points; leave test out (the truth's own are "
                       "used) or give the test set it was built on")

    # the truth
    t0 = time.perf_counter()
    report_progress(0.0, f"calibrating {name}: building the truth")
    kept = {id(t) for t in _TRUTHS.values()}
    if truth is None:
        points = sample_test_points(test, test_points, seed)
        if recording is not None:
            truth = replay_truth(recording, attributor.task, train, points, removals, removal_size, seed)
        elif recipe is not None and recipe_factory(recipe) is not None and retrain:
            truth = retraining_truth(attributor.task, train, points, recipe_factory(recipe), recipe_config(recipe),
                                     removals, removal_size, seed, attributor.device)
        elif recipe is not None:
            truth = further_truth(attributor.task, train, points, recipe_config(recipe), examples, epochs, lr,
                                  seed=seed, device=attributor.device)
        else:
            raise TDAError(NEEDS_TRUTH)
    elif not isinstance(truth, CalibrationTruth):
        raise TDAError(f"truth must be a CalibrationTruth (removal_truth, replay_truth, further_truth), got "
                       f"{type(truth).__name__}")
    truth_seconds = time.perf_counter() - t0
    built = "was reused" if id(truth) in kept else f"took {truth_seconds:.2f} s"

    # the default
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        fitted, best_predicted, status = _run_trial(attributor, base, train, truth)
    except JobCancelled:
        raise
    except Exception as err:
        raise TDAError(f"calibrate: {name} fails at its configured default, so there is nothing to compare "
                       f"settings with: {type(err).__name__}: {err}") from err
    default_seconds = time.perf_counter() - t0
    default_score = float(truth.agreement(best_predicted).nanmean())
    rows.append({"stage": "default", "options": {}, "score": default_score, "seconds": default_seconds,
                 "status": status})
    elapsed = time.perf_counter() - t_start
    if budget_s is None:
        limit = elapsed + (DEFAULT_BUDGET_FACTOR - 1) * default_seconds
    else:
        minimum = elapsed + default_seconds
        if budget_s < minimum:
            raise TDAError(f"budget_s={budget_s:g} s is too small to calibrate {name}: the {truth.kind} truth {built} "
                           f"and the default's run took {default_seconds:.2f} s, so trying one "
                           f"setting besides the default needs budget_s >= {math.ceil(minimum * 10) / 10:g} s")
        limit = float(budget_s)

    # the candidates, one option at a time from the best setting so far
    fields = {f.name: f for f in dataclasses.fields(type(attributor).Arguments)}
    best: dict[str, Any] = {}
    slowest = default_seconds
    for stage in tuned:
        for delta in _stage_options(stage, attributor, fields, best, fitted):
            check_cancelled()
            options = {**best, **delta}
            row = {"stage": stage, "options": options, "score": float("nan"), "seconds": float("nan")}
            now = time.perf_counter() - t_start
            if now + slowest > limit:
                rows.append({**row, "status": "skipped: budget"})
                continue
            report_progress(min(now / limit, 1.0), f"calibrating {name}: {len(rows)} settings tried")
            t0 = time.perf_counter()
            try:
                with time_limit(limit - now):
                    _, predicted, status = _run_trial(attributor, {**base, **options}, train, truth)
            except JobCancelled:
                raise
            except TimeLimitExceeded:  # slower than the default by more than the budget left: stopped at it
                seconds = time.perf_counter() - t0
                slowest = max(slowest, seconds)
                rows.append({**row, "seconds": seconds, "status": "stopped: budget"})
                continue
            except Exception as err:  # a setting that fails is a result of the search, not its end
                seconds = time.perf_counter() - t0
                slowest = max(slowest, seconds)
                text = (str(err).strip().splitlines() or [""])[0][:200]
                rows.append({**row, "seconds": seconds, "status": f"error: {type(err).__name__}: {text}"})
                continue
            better = _better(predicted, best_predicted, truth, seed)
            seconds = time.perf_counter() - t0  # the comparison with the best so far included
            slowest = max(slowest, seconds)
            rows.append({**row, "score": float(truth.agreement(predicted).nanmean()), "seconds": seconds,
                         "status": status})
            if better:
                best, best_predicted = options, predicted
    chosen = {k: v for k, v in best.items() if v != configured.get(k)}
    trials = pd.DataFrame(rows, columns=columns[:-1])
    trials["chosen"] = [r["options"] == best and r["status"].startswith("ok") for r in rows]
    trials["options"] = [json.dumps(r["options"], sort_keys=True) if r["options"] else "default" for r in rows]
    return Calibration(name, chosen, configured, truth.kind, truth.description,
                       float(truth.agreement(best_predicted).nanmean()),
                       default_score, time.perf_counter() - t_start, truth_seconds, budget_s, trials)
