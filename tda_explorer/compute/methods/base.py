"""The ``Attributor`` interface every method implements: ``fit``, ``attribute``, ``self_influence``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.catalogue import (
    CATALOGUE,
    POSITIVE_INT,
    Interval,
    MethodSpec,
    Options,
    arguments_config,
    build_arguments,
    option,
)
from tda_explorer.compute.engine.attribution import Attribution
from tda_explorer.compute.engine.featurize import ALL_KINDS, iter_features, make_projector
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.store import FeatureStore
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.plan import Plan, estimate_plan
from tda_explorer.compute.training.dropout_masks import mask_seed
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class AttributorArguments:
    """Options every attributor takes (a method's ``Arguments`` extends these)."""

    device: str | torch.device | None = option(None, "where the computation runs: 'cpu', 'cuda', 'cuda:1' (default "
                                                     "CPU)", config=False)
    max_memory: int | None = option(None, "budget in bytes for one chunk of per-sample gradients (default: a few "
                                          "hundred MB), for one vectorised curvature product (default 1 GiB) and "
                                          "for the training gradients K-FAC / EK-FAC hold between queries (default: "
                                          "a quarter of the memory)",
                                    POSITIVE_INT, config=False, cli=True)
    projection_dim: int | None = option(None, "project gradients to this many features per example (streamed, "
                                               "seeded); None or >= the parameter count keeps them exact; with "
                                               "projection_kind='logra' the rank of each layer side", POSITIVE_INT)
    projection_kind: str = option("rademacher", "random projection: dense Rademacher or Gaussian signs, or LoGra's "
                                                "per-layer Kronecker projection", Options(ALL_KINDS))
    projection_seed: int = option(0, "seed of the projection matrix (the same on every device)",
                                  Interval(0, None, integer=True))
    store: FeatureStore | str | Path | None = option(None, "cache of training features on disk (a folder or a "
                                                           "FeatureStore); a second fit on an unchanged model is a hit",
                                                     config=False)


class Attributor(ABC):
    """Scores training examples for test examples.

    ``Attributor(task, **options)``: the options are the fields of the class's ``Arguments`` dataclass (see
    ``tda-explorer methods`` or ``compute.catalogue``), checked in one place; ``self.args`` holds them.
    Subclasses register with ``compute.catalogue.register`` and override ``_fit``, ``_attribute`` and
    ``_self_influence`` (and ``_setup`` for what they derive from their options).
    """

    name: ClassVar[str] = "attributor"
    Arguments: ClassVar[type] = AttributorArguments
    #: Whether the method needs the training inputs as one tensor (dicts of tensors, a tokenizer's, are refused).
    tensor_inputs: ClassVar[bool] = False

    @classmethod
    def refuses_recipe(cls, config: Any) -> str | None:
        """Why the method cannot follow a run trained with the recipe ``config`` (a ``TrainConfig``), or None (the
        default: any run); read by ``Session.method_availability`` without building the method."""
        return None

    def __init__(self, task: AttributionTask, **options: Any):
        if not isinstance(task, AttributionTask):
            raise TDAError(f"task must be an AttributionTask, got {type(task).__name__}")
        self.task = task
        self.options_ = dict(options)  # as given: what calibrate starts from and re-applies with its choice
        self.args = build_arguments(type(self).Arguments, self.name, options)
        self.device = as_device(self.args.device)
        self.max_memory = self.args.max_memory
        self.n_params = sum(p.numel() for n, p in task.model.named_parameters() if n in task.tracked_names())
        self.projector = make_projector(task, self.args.projection_dim, self.args.projection_kind,
                                        self.args.projection_seed, self.device)
        store = self.args.store
        self.store = FeatureStore(store) if isinstance(store, (str, Path)) else store
        self.train_: AttributionDataset | None = None
        self._setup()

    # -- public API -------------------------------------------------------------------------
    def fit(self, train: AttributionDataset) -> Attributor:
        """Featurise the training set; returns ``self``."""
        if not isinstance(train, AttributionDataset):
            raise TDAError(f"train must be an AttributionDataset, got {type(train).__name__}")
        self.train_ = train
        self._fit(train)
        return self

    def attribute(self, test: AttributionDataset) -> Attribution:
        """Scores ``[n_test, n_train]`` of every test example against every training example."""
        train = self._check_fitted()
        if not isinstance(test, AttributionDataset):
            raise TDAError(f"test must be an AttributionDataset, got {type(test).__name__}")
        scores = self._attribute(test)
        return Attribution(scores.float().cpu(), test.ids, train.ids, self.name, self.config())

    def self_influence(self) -> torch.Tensor:
        """Self-influence ``[n_train]`` (larger = more surprising), never via an n×n matrix."""
        self._check_fitted()
        return self._self_influence().float().cpu()

    def plan(self, train: AttributionDataset, test: AttributionDataset) -> Plan:
        """Estimated time and peak memory of ``fit(train)`` + ``attribute(test)``, measured by running this method as
        configured on a few batches (``methods.plan``), with gradient chunks sized to ``max_memory``."""
        for name, data in (("train", train), ("test", test)):
            if not isinstance(data, AttributionDataset):
                raise TDAError(f"{name} must be an AttributionDataset, got {type(data).__name__}")
        return estimate_plan(self, train, test)

    def calibrate(self, train: AttributionDataset, test: AttributionDataset | None = None, *,
                  budget_s: float | None = None, recording: Any = None, recipe: Any = None, truth: Any = None,
                  **settings: Any) -> Any:
        """Choose this method's damping, Fisher kind, projection dimension and step (those it declares) against a
        cheap truth built on the task's model, within ``budget_s`` seconds (default: 16× the default's run), and
        configure this attributor with the choice (a later ``fit`` uses it); returns the ``Calibration`` (chosen
        settings, the truth used, its score beside the default's, every trial), also kept as ``calibration_``.

        The truth: same-seed replays of a few small removals with ``recording=RunRecorder(...)`` of the training
        run, or further training from the final model with ``recipe=`` its ``TrainConfig``; ``truth=`` a prebuilt
        ``CalibrationTruth``. ``settings``: the search's sizes (``test_points``, ``removals``, ``removal_size``,
        ``examples``, ``epochs``, ``lr``, ``seed``; ``methods.calibration.calibrate``)."""
        from tda_explorer.compute.methods.calibration import calibrate

        result = calibrate(self, train, test, budget_s=budget_s, recording=recording, recipe=recipe, truth=truth,
                           **settings)
        if result.options:
            self.__init__(self.task, **{**self.options_, **result.options})
        self.calibration_ = result
        return result

    def config(self) -> dict[str, Any]:
        """The method's configuration (JSON-able): the task, the projection and the plain-valued options."""
        return {"task": self.task.config(), "projection": self.projector.config() if self.projector else None,
                **arguments_config(self.args)}

    # -- for subclasses ---------------------------------------------------------------------
    def _setup(self) -> None:  # noqa: B027 - a hook: most methods derive nothing
        """Derive state from ``self.args`` and check what the options alone cannot (default: nothing)."""

    @abstractmethod
    def _fit(self, train: AttributionDataset) -> None: ...

    @abstractmethod
    def _attribute(self, test: AttributionDataset) -> torch.Tensor: ...

    @abstractmethod
    def _self_influence(self) -> torch.Tensor: ...

    def _check_fitted(self) -> AttributionDataset:
        if self.train_ is None:
            raise TDAError(f"{type(self).__name__} is not fitted: call fit(train) before attribute()")
        return self.train_

    def _features(self, data: AttributionDataset, *, test: bool, params: dict | None = None,
                  loss_fn: Callable | None = None, tag: str = "", dropout_seed: int | None = None) -> torch.Tensor:
        """Per-sample gradients ``[n, p]`` (or their projection ``[n, k]``) of the training loss,
        or of the test measurement with ``test=True``, at ``params`` (default: the model's).

        Training features are read from / written to the store when one is set.
        """
        loss_fn = loss_fn or (self.task.test_measurement if test else self.task.train_loss)
        key = None
        if self.store is not None and not test:
            state = {**self.task.model.state_dict(), **(params or {})}
            key = config_fingerprint(model_fingerprint(state), self.task.config(), tag,
                                     self.projector.config() if self.projector else None, data.fingerprint())
            cached = self.store.get(key)
            if cached is not None:
                return cached.to(self.device)
        if dropout_seed is not None:
            dropout_seed = mask_seed(dropout_seed, test)
        features = torch.cat([g for _, g in iter_features(
            self.task, data, loss_fn, self.projector, params=params, max_memory=self.max_memory, device=self.device,
            dropout_seed=dropout_seed, argument="test" if test else "train",
        )])
        if key is not None:
            features = self.store.put(key, features, {"dataset": data.name, "tag": tag}).to(self.device)
        return features


def attributor_spec(name: Any, argument: str, owner: str, options: dict | None = None) -> MethodSpec:
    """The catalogue entry of the attributor ``name`` that the method ``owner`` builds (any attributor but ``owner``
    itself), with ``options`` checked against its arguments when given; a ``TDAError`` listing the valid names."""
    valid = sorted(n for n, spec in CATALOGUE.items()
                   if n != owner and isinstance(spec.factory, type) and issubclass(spec.factory, Attributor))
    if name not in valid:
        raise TDAError(f"{argument} must be one of {valid}, got {name!r}")
    spec = CATALOGUE[name]
    if options is not None:
        if not isinstance(options, dict):
            raise TDAError(f"{argument}_options must be a dict of {name}'s options, got {type(options).__name__}")
        build_arguments(spec.arguments, name, options)  # unknown options and bad values refused now, not at fit
    return spec


def shared_options(args: AttributorArguments) -> dict[str, Any]:
    """The options every attributor takes (device, max_memory, projection_*, store) that ``args`` sets to other than
    their defaults: what a method that builds another one passes on to it."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(AttributorArguments)
            if getattr(args, f.name) != f.default}
