"""``Session``: the one source of state for an interactive analysis.

It holds the datasets, the task, computed attributions (cached on disk by fingerprint), model
predictions and the flag store; widgets observe it and never compute anything themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, as_device, check_finite_rows, check_positive_int
from tda_explorer.atomic import load_tensors, save_tensors
from tda_explorer.compute.catalogue import Resources, method_spec
from tda_explorer.compute.engine.attribution import Attribution
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.score_file import ScoreFile, ScoreFileWriter
from tda_explorer.compute.engine.stability import Stability, z_and_p
from tda_explorer.compute.engine.task import AttributionTask, predict
from tda_explorer.compute.methods import available_methods, get_method
from tda_explorer.compute.methods.calibration import (
    CALIBRATION_TRUTHS,
    Calibration,
    CalibrationTruth,
    removal_groups,
    removal_truth,
)
from tda_explorer.compute.methods.plan import Plan
from tda_explorer.compute.training.train import TrainConfig
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.evaluate.metrics import mislabel_auc, rank_correlation, recall_at
from tda_explorer.evaluate.trust import model_randomization
from tda_explorer.experiments.scenario import Scenario
from tda_explorer.flags import FlagStore
from tda_explorer.jobs import BackgroundJob, check_cancelled, report_progress
from tda_explorer.retraining.further_training import further_training_cosine, further_training_truth
from tda_explorer.retraining.own import FunctionRetrainer, RetrainFunction
from tda_explorer.retraining.retrainer import Retrainer

#: Above this many scores (test × train) an attribution is written to disk a block of test rows at a time and read
#: back a row at a time (``ScoreFile``); below it, it is held in memory.
DENSE_LIMIT = 2**25
#: Scores per block of test rows attributed at once on the way to disk.
BLOCK_SCORES = 2**23

#: The baseline ranking every session offers: training examples by the attributed model's loss at the given label
#: (``session.train_loss``), highest first. A mislabel method that does not beat it adds nothing.
TRAINING_LOSS = "training loss"
#: The ranking by out-of-fold confidence in the given label, least confident first (score 1 − p_oof(given label):
#: cleanlab's self-confidence), offered once the session has out-of-fold probabilities (``add_out_of_fold``).
OUT_OF_FOLD = "out-of-fold confidence"
#: A Spearman correlation with the training-loss ranking at or above this says the method adds little beyond it.
ADDS_LITTLE = 0.95


class Session:
    """Datasets, task, attributions and flags of one analysis.

    Parameters
    ----------
    train, test : AttributionDataset
    task : AttributionTask
    folder : str or Path
        Where the flag store and cached attributions live (created if missing).
    device : str
        Where methods run ('cpu', 'cuda', 'cuda:1', 'mps', 'xpu'); refused when this machine lacks it.
    resources : dict, optional
        What this session can supply for methods' needs (``compute.catalogue.NEEDS``): need name -> a function
        returning the options that satisfy it, e.g. ``{"recipe": lambda: {"model_factory": f, "train_config": c}}``.
        The task's checkpoints count without being listed.
    retrain : callable (train_ids: list, seed: int) -> nn.Module, optional
        Your own training function: makes "What if I remove the flagged?" and ``what_if_removed`` retrain your model
        without chosen examples, paired over ``retrain_seeds`` (``retraining.own``).
    retrain_seeds : sequence of int
        The paired seeds (at least two: their spread is shown beside every effect).
    """

    def __init__(self, train: AttributionDataset, test: AttributionDataset, task: AttributionTask,
                 folder: str | Path = "tda_session", device: str = "cpu", resources: Resources | None = None,
                 retrain: RetrainFunction | None = None, retrain_seeds: Sequence[int] = (0, 1)):
        for name, value in (("train", train), ("test", test)):
            if not isinstance(value, AttributionDataset):
                raise TDAError(f"{name} must be an AttributionDataset, got {type(value).__name__}")
            value.check_class_labels(f"Session's {name} (labels, predictions and flags per example)")
            if value.in_memory and isinstance(value.inputs, torch.Tensor):  # lazy data is checked batch by batch
                check_finite_rows(value.inputs, name, value.ids)
        if not isinstance(task, AttributionTask):
            raise TDAError(f"task must be an AttributionTask, got {type(task).__name__}")
        as_device(device)
        self.train, self.test, self.task, self.device = train, test, task, device
        self.folder = Path(folder)
        predictions = self._predictions_path()
        computed = self._predict(predictions)  # before anything is written: it also checks the labels against the
        self.folder.mkdir(parents=True, exist_ok=True)  # model's outputs
        if computed is not None:
            save_tensors(computed, predictions)
        self.flags = FlagStore(self.folder / "flags.sqlite", known_ids=train.ids)  # unknown ids are refused
        self.attributions: dict[str, Attribution] = {}
        self.self_influences: dict[str, torch.Tensor] = {}
        self.metrics: pd.DataFrame | None = None
        self.stability: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.values: dict[str, torch.Tensor] = {}  # per-example data values by name (add_values)
        self.selections: dict[str, pd.DataFrame] = {}  # chosen training ids with scores (add_selection)
        self.tracings: dict[str, pd.DataFrame] = {}  # traced documents per query (add_tracing)
        self.options: dict[str, dict] = {}  # the options each computed method ran with
        self.calibrations: dict[str, Calibration] = {}  # what calibrate chose per method, and against what
        self.trust: dict[str, float] = {}  # model-randomization correlation per method (lower is better)
        self.further_training: pd.DataFrame | None = None  # method, epochs, cosine (further_training_curve)
        self.provenance: dict[str, str] = {}
        self.oof_probabilities: torch.Tensor | None = None  # [n_train, n_classes] (add_out_of_fold, suspicion)
        self.flipped: torch.Tensor | None = None  # known flipped labels [n_train] (a built-in noisy experiment)
        self._embedding: torch.Tensor | None = None
        self.embedding_source = "inputs"  # what the mislabel scatter's PCA is of (embedding())
        # makes "what if I remove these?" answerable
        self.retrainer: Retrainer | FunctionRetrainer | None = None
        if retrain is not None:
            self.retrainer = FunctionRetrainer(retrain, train, test, task, retrain_seeds, device)
        self.recipe: TrainConfig | None = None  # the training recipe, when known (further training's defaults)
        self.resources: Resources = dict(resources or {})
        if task.checkpoints:
            self.resources.setdefault("checkpoints", dict)

    @classmethod
    def from_experiment(cls, experiment: Scenario, folder: str | Path = "tda_session", device: str = "cpu",
                        retrain_seeds: int = 2) -> Session:
        """A session over a built-in scenario (``tda_explorer.experiments``: ``build_experiment``, the backdoor, fact
        tracing), with what it supplies for methods' needs; one with a training recipe (``recipe()``) can also
        retrain without chosen examples (``what_if_removed``) with ``retrain_seeds`` paired seeds."""
        if not isinstance(experiment, Scenario):
            raise TDAError(f"experiment must be a built-in scenario (train, test, task(), resources()), got "
                           f"{type(experiment).__name__}")
        as_device(device)
        session = cls(experiment.train, experiment.test, experiment.task(), folder, device,
                      resources=experiment.resources(device))
        flipped = getattr(getattr(experiment, "split", None), "flipped", None)
        if isinstance(flipped, torch.Tensor) and flipped.shape == (len(session.train),) and flipped.any():
            session.flipped = flipped.bool()
        if hasattr(experiment, "recipe"):
            recipe = experiment.recipe()
            session.recipe = recipe.config
            seeds = [recipe.config.seed + i for i in range(retrain_seeds)]
            session.retrainer = Retrainer(recipe, seeds=seeds, cache_dir=session.folder / "retrain", device=device)
        return session

    def what_if_removed(self, train_ids: list) -> Any:
        """Retrain without ``train_ids`` (paired with full models of the same seeds) and return the
        ``RemovalEffect``: the change of every test measurement, and of test accuracy."""
        if self.retrainer is None:
            raise TDAError("this session cannot retrain: pass Session(..., retrain=fn) with your training function "
                           "fn(train_ids, seed) -> nn.Module, or build it with Session.from_experiment(...)")
        if not train_ids:
            raise TDAError("train_ids is empty: flag or select the training examples to remove first")
        return self.retrainer.remove([list(train_ids)])

    def method_availability(self) -> dict[str, list[str]]:
        """Every attributor with what this session lacks to run it (an empty list: it can run here): the needs its
        catalogue entry declares that the session's resources do not supply, else what the method refuses on this
        session, read without building it or calling a resource (each may train or replay a run): dict inputs where
        it needs one tensor (``Attributor.tensor_inputs``), a recipe whose optimizer it does not follow
        (``Attributor.refuses_recipe``)."""
        provided = set(self.resources)
        return {name: method_spec(name).missing(provided) or self._refusal(name) for name in available_methods()}

    def _refusal(self, name: str) -> list[str]:
        """What ``name`` refuses on this session's data and recipe (its sentence), or nothing."""
        method = method_spec(name).factory
        if method.tensor_inputs and self._dict_inputs():
            return ["needs the inputs as one tensor; this session's training inputs are dicts (a tokenizer's)"]
        reason = method.refuses_recipe(self.recipe) if isinstance(self.recipe, TrainConfig) else None
        return [reason] if reason else []

    def _dict_inputs(self) -> bool:
        """Whether the training inputs are dicts of tensors (a tokenizer's; read lazily, ``from_torch``)."""
        return getattr(self.train, "input_kind", "tensor") == "dict"

    # -- predictions ----------------------------------------------------------------------
    def _predictions_path(self) -> Path:
        key = config_fingerprint("predictions", self.task.config(), model_fingerprint(self.task.model),
                                 self.train.fingerprint(), self.test.fingerprint())
        return self.folder / "predictions" / f"{key}.pt"

    def _predict(self, cache: Path) -> dict[str, torch.Tensor] | None:
        """Predictions on both splits, batch by batch on the session's device (tensor or dict inputs, in memory or
        read lazily), or the same model's on the same data from ``cache``; the logits must be class scores
        ``[n, n_outputs]``. Returns the logits by split when they were computed (to be cached), else None."""
        cached = load_tensors(cache) if cache.exists() else None
        outputs = []
        for name, data in (("train", self.train), ("test", self.test)):
            out = cached[name] if cached is not None else predict(self.task, data, self.device, argument=name)
            if out.dim() != 2:
                raise TDAError(f"task.model must return class scores [n, n_outputs] for a Session; on {name} it "
                               f"returned {tuple(out.shape)}")
            _check_labels_fit(data, out.shape[1], name)
            outputs.append(out)
        out_tr, out_te = outputs
        self.train_probs = out_tr.softmax(1)
        self.train_predicted = out_tr.argmax(1)
        # the baseline beside every ranking: per-example loss at the given label, from the logits above
        self.train_loss = torch.nn.functional.cross_entropy(out_tr.float(), self.train.labels, reduction="none")
        self.test_predicted = out_te.argmax(1)
        self.test_loss = torch.nn.functional.cross_entropy(out_te, self.test.labels, reduction="none")
        return None if cached is not None else {"train": out_tr, "test": out_te}

    # -- attributions ---------------------------------------------------------------------
    @property
    def methods(self) -> list[str]:
        return list(self.attributions)

    def _cache_path(self, method: str, options: dict) -> Path:
        """Where ``method``'s result with ``options`` (the user's, filled from the resources) is cached: keyed by
        them (recordings, models and datasets by their contents), the task, the model, its checkpoints and the
        data, so another recording or checkpoints of the same count never load a stale result."""
        checkpoints = [(c.step, c.learning_rate, c.optimizer, model_fingerprint(c.state_dict))
                       for c in self.task.checkpoints]
        key = config_fingerprint(
            method, options, self.task.config(), model_fingerprint(self.task.model), checkpoints,
            self.train.fingerprint(), self.test.fingerprint(),
        )
        return self.folder / "attributions" / f"{method}-{key}.pt"

    def compute(self, method: str, progress: bool = False, **config: Any) -> Attribution:
        """Run ``method`` on the session's data (or load it from the cache) and keep the result.

        Above ``DENSE_LIMIT`` scores the attribution is computed a block of test points at a time and kept on disk
        (``ScoreFile``: each test point's top-k in memory, rows read on demand), so a session of 50,000 training
        and 10,000 test examples holds megabytes per method, not gigabytes."""
        options = method_spec(method).fill(config, self.resources)
        path = self._cache_path(method, options)
        large = len(self.test) * len(self.train) > DENSE_LIMIT
        stored = self._load_cached(path, large)
        self.options[method] = options
        if stored is not None:
            attribution = Attribution(stored[0], self.test.ids, self.train.ids, method, config)
            self.add(attribution, stored[1])
            self._keep_out_of_fold(path)
            return attribution
        attributor = get_method(method, self.task, device=self.device, **options).fit(self.train)
        scores = self._attribute_to_disk(attributor, path) if large else attributor.attribute(self.test).scores
        self_influence = attributor.self_influence()
        save_tensors({"scores": None if large else scores, "self_influence": self_influence}, path)
        attribution = Attribution(scores, self.test.ids, self.train.ids, method, config)
        self.add(attribution, self_influence)
        self._keep_out_of_fold(path, getattr(attributor, "oof_", None))
        return attribution

    def calibrate(self, method: str, budget_s: float | None = None, truth: str = "auto", **config: Any
                  ) -> Calibration:
        """Calibrate ``method`` on this session's model (``Attributor.calibrate``: damping, Fisher kind, projection
        dimension and step, as it declares them, chosen against a cheap truth within ``budget_s`` seconds), keep the
        result in ``calibrations[method]``, then ``compute`` the method with the chosen options (cached like any
        other configuration). ``config``: options given as to ``compute``, the starting point.

        ``truth``: "replay" (a ``RunRecorder`` under the ``recording`` resource: same-seed replays of a few small
        removals), "retraining" (the ``recipe`` resource's model factory and ``train_config``, retrained in lock-step
        without a few small groups; else the session's retrainer, ``Session(retrain=fn)``), "further-training" (the
        recipe's ``train_config`` or ``session.recipe`` alone: further training from the final model) or "auto": the
        first of those the session has."""
        if truth not in ("auto", *CALIBRATION_TRUTHS):
            raise TDAError(f"truth must be 'auto' or one of {', '.join(CALIBRATION_TRUTHS)}, got {truth!r}")
        options = method_spec(method).fill(config, self.resources)
        attributor = get_method(method, self.task, device=self.device, **options)
        result = attributor.calibrate(self.train, self.test, budget_s=budget_s, **self._calibration_truth(truth))
        self.calibrations[method] = result
        self.compute(method, **{**config, **result.options})
        return result

    def _calibration_truth(self, kind: str) -> dict[str, Any]:
        """What ``calibrate`` builds its truth from (``recording=``, ``recipe=`` or a prebuilt ``truth=``), by ``kind``
        ("auto": the first the session has, in the order of ``calibrate``'s doc), or a ``TDAError`` saying what the
        truth needs."""
        recording = None
        # a built-in experiment's recording resource trains a StepRecorder (dvemb's), never a RunRecorder: its recipe
        # is the truth there
        if (kind == "replay" or kind == "auto" and self.recipe is None) and "recording" in self.resources:
            from tda_explorer.compute.training.run_recorder import RunRecorder

            recording = self.resources["recording"]().get("recording")
            if isinstance(recording, RunRecorder):
                return {"recording": recording}
        if kind == "replay":
            raise TDAError("truth='replay' needs a RunRecorder of the training run: Session(..., resources="
                           "{'recording': lambda: {'recording': recorder}})"
                           + ("" if recording is None else f"; the recording resource gives a "
                              f"{type(recording).__name__}"))
        recipe = self.resources["recipe"]() if "recipe" in self.resources else {}
        if not isinstance(recipe.get("train_config"), TrainConfig):  # e.g. out-of-fold probabilities instead
            recipe = {"train_config": self.recipe} if self.recipe is not None else {}
        if kind in ("auto", "retraining") and callable(recipe.get("model_factory")):
            return {"recipe": recipe}
        if kind == "retraining" and self.retrainer is not None:
            return {"truth": self._retraining_truth()}
        if kind == "retraining":
            raise TDAError("truth='retraining' needs the recipe's model factory (resources={'recipe': lambda: "
                           "{'model_factory': f, 'train_config': config}}) or Session(..., retrain=fn)")
        if kind in ("auto", "further-training") and recipe:
            return {"recipe": recipe["train_config"], "retrain": False}
        if kind == "further-training":
            raise TDAError("truth='further-training' needs the final model's training recipe: Session(..., resources="
                           "{'recipe': lambda: {'model_factory': f, 'train_config': TrainConfig(...)}})")
        if self.retrainer is not None:
            return {"truth": self._retraining_truth()}
        raise TDAError("calibrate needs a recording or a final model with a training recipe: a RunRecorder of the "
                       "training run (resources={'recording': lambda: {'recording': recorder}}: same-seed replays), "
                       "the recipe (resources={'recipe': lambda: {'model_factory': f, 'train_config': config}}: "
                       "retraining, or further training from the final model with the config alone), or "
                       "Session(..., retrain=fn) (paired retraining)")

    def _retraining_truth(self, removals: int = 8) -> CalibrationTruth:
        """The removal truth of the session's retrainer: a few small groups retrained without (paired seeds)."""
        groups = removal_groups(self.train, removals)
        effect = self.retrainer.remove(groups)
        seeds = len(effect.seeds)
        return removal_truth("retraining", self.train, self.test, groups, effect.delta, effect.seconds,
                             f"{len(groups)} retrainings, each without {len(groups[0])} training examples, paired "
                             f"over {seeds} seed{'s' * (seeds > 1)}, {len(self.test)} test points")

    def _load_cached(self, path: Path, large: bool) -> tuple[torch.Tensor | ScoreFile, torch.Tensor] | None:
        """Cached scores (in memory, or the finished score file beside ``path``) and self-influence, or None."""
        data = load_tensors(path)
        if data is None:
            return None
        scores = ScoreFile.open(path.with_suffix(".npy")) if large else data["scores"]
        return None if scores is None else (scores, data["self_influence"])

    def _attribute_to_disk(self, attributor: Any, path: Path) -> ScoreFile:
        """The fitted ``attributor``'s scores on the test set, written a block of test rows at a time."""
        n_test, n_train = len(self.test), len(self.train)
        rows = max(1, BLOCK_SCORES // n_train)
        writer = ScoreFileWriter(path.with_suffix(".npy"), (n_test, n_train))
        try:
            for start in range(0, n_test, rows):
                check_cancelled()
                block = self.test.subset(list(range(start, min(start + rows, n_test))))
                writer.write(attributor.attribute(block).scores)
                report_progress(min(start + rows, n_test) / n_test, f"scored {min(start + rows, n_test)} of "
                                f"{n_test} test points")
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def _keep_out_of_fold(self, path: Path, probabilities: torch.Tensor | None = None) -> None:
        """Out-of-fold probabilities a method computed (suspicion's ``oof_``: a baseline of their own), saved beside
        its cached attribution at ``path``; without ``probabilities``, those saved there before (if any)."""
        oof_path = path.with_name(path.stem + ".oof.pt")
        if probabilities is not None:
            save_tensors(probabilities.detach().cpu(), oof_path)
        else:
            probabilities = load_tensors(oof_path)
        if probabilities is not None:
            self.add_out_of_fold(probabilities)

    def plan(self, method: str, **config: Any) -> Plan:
        """The estimated time and peak memory of ``compute(method, **config)`` on this session's data, measured by
        running it on a few batches (``Attributor.plan``)."""
        options = method_spec(method).fill(config, self.resources)
        return get_method(method, self.task, device=self.device, **options).plan(self.train, self.test)

    def is_cached(self, method: str, **config: Any) -> bool:
        """Whether ``compute(method, **config)`` would load a cached result instead of computing."""
        return self._cache_path(method, method_spec(method).fill(config, self.resources)).exists()

    def compute_async(self, method: str, on_update=None, **config: Any) -> BackgroundJob:
        """``compute`` in a background thread; returns the job (progress, cancel, error)."""
        return BackgroundJob([(f"computing {method}", lambda _: self.compute(method, **config))], on_update).start()

    def add(self, attribution: Attribution, self_influence: torch.Tensor | None = None) -> None:
        """Keep an attribution computed elsewhere (its ids must match the session's data)."""
        if list(attribution.train_ids) != list(self.train.ids) or list(attribution.test_ids) != list(self.test.ids):
            raise TDAError("attribution ids do not match the session's train / test ids")
        self.attributions[attribution.method] = attribution
        if self_influence is not None:
            self.self_influences[attribution.method] = self_influence

    def attribution(self, method: str) -> Attribution:
        if method not in self.attributions:
            raise TDAError(f"method {method!r} has not been computed; computed: {self.methods or 'none'}")
        return self.attributions[method]

    # -- tables ---------------------------------------------------------------------------
    def _train_columns(self, train_ids: list) -> dict[str, list]:
        pos = self.train.positions(train_ids, "train_id")
        flagged = set(self.flags.flagged_ids())
        return {
            "label": self.train.labels[pos].tolist(),
            "predicted": self.train_predicted[pos].tolist(),
            "flag": [t in flagged for t in train_ids],
            **self._baseline_columns(pos),
            **{f"value:{name}": values[pos].tolist() for name, values in self.values.items()},
        }

    def _baseline_columns(self, pos) -> dict[str, list]:
        """``training_loss`` (the model's loss at the given label) and, with out-of-fold probabilities,
        ``oof_confidence`` (their probability of the given label) at training positions ``pos``."""
        columns = {"training_loss": self.train_loss[pos].double().tolist()}
        if self.oof_probabilities is not None:
            columns["oof_confidence"] = self._oof_confidence()[pos].double().tolist()
        return columns

    def _oof_confidence(self) -> torch.Tensor:
        labels = self.train.labels
        return self.oof_probabilities[torch.arange(len(labels)), labels]

    def add_out_of_fold(self, probabilities: torch.Tensor) -> None:
        """Out-of-fold class probabilities ``[n_train, n_classes]`` (from models that never saw each example; kept
        by ``compute("suspicion")``): an ``oof_confidence`` column in every training table and the ranking
        ``OUT_OF_FOLD`` (least confident in the given label first: cleanlab's self-confidence)."""
        probabilities = torch.as_tensor(probabilities).detach().cpu()
        expected = (len(self.train), self.train_probs.shape[1])
        if tuple(probabilities.shape) != expected:
            raise TDAError(f"out-of-fold probabilities must be [n_train, n_classes] = {list(expected)}, got "
                           f"{list(probabilities.shape)}")
        if not torch.isfinite(probabilities).all() or (probabilities < 0).any():
            raise TDAError("out-of-fold probabilities must be finite and non-negative")
        self.oof_probabilities = probabilities.double()

    @property
    def mislabel_rankings(self) -> list[str]:
        """Every ranking ``mislabel_ranking`` accepts: each method's self-influence (and added values), then the
        baselines — ``TRAINING_LOSS`` always, ``OUT_OF_FOLD`` when the session has out-of-fold probabilities."""
        return [*self.self_influences, TRAINING_LOSS, *([OUT_OF_FOLD] if self.oof_probabilities is not None else [])]

    def ranking_score(self, method: str) -> torch.Tensor:
        """The score ``[n_train]`` a mislabel ranking sorts by (higher = more suspicious)."""
        if method in self.self_influences:
            return self.self_influences[method]
        if method == TRAINING_LOSS:
            return self.train_loss
        if method == OUT_OF_FOLD and self.oof_probabilities is not None:
            return 1 - self._oof_confidence()
        raise TDAError(f"no self-influence for method {method!r}; rankings: {self.mislabel_rankings}")

    def baseline_comparison(self, method: str) -> dict[str, float]:
        """``method``'s ranking against the training-loss baseline: ``spearman`` (rank correlation of the two scores
        over the training set) and, when the flipped labels are known (``session.flipped``), ``auc``,
        ``loss_auc``, ``auc_minus_loss``, ``recall_at_10``, ``loss_recall_at_10`` and ``recall_at_10_minus_loss``."""
        score, loss = self.ranking_score(method), self.train_loss
        result = {"spearman": rank_correlation(score, loss)}
        flipped = self.flipped
        if flipped is not None and flipped.any() and not flipped.all():
            result.update(auc=mislabel_auc(score, flipped), loss_auc=mislabel_auc(loss, flipped),
                          recall_at_10=recall_at(score, flipped, 0.1), loss_recall_at_10=recall_at(loss, flipped, 0.1))
            result.update(auc_minus_loss=result["auc"] - result["loss_auc"],
                          recall_at_10_minus_loss=result["recall_at_10"] - result["loss_recall_at_10"])
        return result

    def ranking(self, test_id: Any, method: str, k: int = 10) -> pd.DataFrame:
        """The top-k proponents (positive scores, rank 1..k) and top-k opponents (negative scores, rank -1..-k) of
        ``test_id`` with labels and flags; fewer on a side when fewer training examples have that sign."""
        k = check_positive_int(k, "k")
        self.test.positions([test_id], "test_id")
        df = self.attribution(method).to_dataframe(k=k, test_ids=[test_id])
        for col, values in self._train_columns(df["train_id"].tolist()).items():
            df[col] = values
        return df

    def mislabel_ranking(self, method: str) -> pd.DataFrame:
        """Training examples ranked by self-influence of ``method`` (most suspicious first), or by a baseline
        (``TRAINING_LOSS``, ``OUT_OF_FOLD``: ``mislabel_rankings`` lists them all).

        Columns: ``train_id, rank, score, method, label, predicted, suggested, flag, training_loss`` (the model's
        loss at the given label), ``oof_confidence`` (with out-of-fold probabilities) and ``value:<name>`` per added
        value; ``suggested`` is the model's most probable class other than the given label.
        """
        score = self.ranking_score(method)
        order = torch.argsort(score, descending=True)
        ids = [self.train.ids[i] for i in order.tolist()]
        probs = self.train_probs[order].clone()
        probs.scatter_(1, self.train.labels[order].unsqueeze(1), -1.0)
        df = pd.DataFrame({
            "train_id": ids,
            "rank": range(1, len(ids) + 1),
            "score": score[order].double().numpy(),
            "method": method,
        })
        for col, values in self._train_columns(ids).items():
            df[col] = values
        df.insert(6, "suggested", probs.argmax(1).tolist())
        return df

    def influenced_tests(self, train_id: Any, method: str, k: int = 5) -> pd.DataFrame:
        """The ``k`` test examples ``train_id`` supports (or opposes) most, by |score|: ``test_id, score, label,
        predicted`` (the score's sign says which)."""
        k = check_positive_int(k, "k")
        pos = self.train.positions([train_id], "train_id")[0]
        order, scores = self.attribution(method).influenced(pos, k)
        return pd.DataFrame({
            "test_id": [self.test.ids[i] for i in order.tolist()],
            "score": scores.double().numpy(),
            "label": self.test.labels[order].tolist(),
            "predicted": self.test_predicted[order].tolist(),
        })

    def relabel(self, train_id: Any, label: int | None) -> None:
        """Record a corrected label (saved immediately; ``None`` clears it)."""
        self.train.positions([train_id], "train_id")
        if label is not None and not 0 <= int(label) < self.train.n_classes:
            raise TDAError(f"label must be a class index in 0..{self.train.n_classes - 1}, got {label}")
        self.flags.relabel(train_id, None if label is None else int(label))

    def corrected_labels(self) -> torch.Tensor:
        """Training labels with every recorded relabel applied."""
        labels = self.train.labels.clone()
        for train_id, label in self.flags.relabels().items():
            if train_id in self.train._index:
                labels[self.train._index[train_id]] = label
        return labels

    def embedding(self) -> torch.Tensor:
        """A 2-D embedding ``[n_train, 2]`` for the mislabel scatter: PCA of the training inputs when they are an
        in-memory tensor, else (inputs read lazily or as dicts, e.g. token ids) PCA of the model's predicted class
        probabilities — ``embedding_source`` says which."""
        if self._embedding is None:
            from sklearn.decomposition import PCA

            if self.train.in_memory and isinstance(self.train.inputs, torch.Tensor):
                flat, self.embedding_source = self.train.inputs.reshape(len(self.train), -1).double().numpy(), "inputs"
            else:
                flat, self.embedding_source = self.train_probs.double().numpy(), "predicted probabilities"
            if min(flat.shape) >= 2:
                flat = PCA(n_components=2, random_state=0).fit_transform(flat)
            padded = torch.zeros(len(flat), 2, dtype=torch.float64)
            padded[:, : min(2, flat.shape[1])] = torch.as_tensor(flat[:, :2])
            self._embedding = padded.float()
        return self._embedding

    def further_training_curve(self, epochs: Sequence[int] = (1, 2, 5, 10), n_examples: int = 50, seeds: int = 3,
                               lr: float | None = None, batch_size: int | None = None) -> pd.DataFrame:
        """Each computed method's cosine with the further-training truth (final model only) after each number of
        further epochs; tidy ``method, epochs, cosine``, kept in ``session.further_training`` for the compare panel.
        ``lr`` defaults to a tenth of the experiment's recipe (give it for other sessions)."""
        if lr is None:
            if self.recipe is None:
                raise TDAError("lr: give the further-training learning rate (no recipe is known for this session)")
            lr = 0.1 * self.recipe.lr
        batch_size = batch_size or (self.recipe.batch_size if self.recipe is not None else 64)
        if not self.methods:
            raise TDAError("no attribution yet: compute a method first")
        gen = torch.Generator().manual_seed(0)
        ids = [self.train.ids[i] for i in torch.randperm(len(self.train), generator=gen)[:n_examples].tolist()]
        rows = []
        for e in epochs:
            truth = further_training_truth(self.task, self.train, self.test, ids, e, lr, batch_size, range(seeds),
                                           device=self.device)
            rows += [{"method": m, "epochs": e, "cosine": further_training_cosine(self.attribution(m).matrix(),
                                                                                  self.train, truth)}
                     for m in self.methods]
        self.further_training = pd.DataFrame(rows)
        return self.further_training

    def check_trust(self, method: str, seed: int = 0) -> float:
        """Model randomization for ``method``: its scores against the same method on a re-initialised model (mean
        Spearman over test points; lower is better). Kept in ``session.trust`` and shown in the compare panel."""
        attribution = self.attribution(method)
        options = self.options.get(method)
        if options is None:  # loaded from the cache: its config is what compute() was given
            if "task" in attribution.config:
                raise TDAError(f"{method!r} was added from elsewhere; check_trust reruns methods computed here "
                               "(session.compute)")
            options = method_spec(method).fill(dict(attribution.config), self.resources)
        self.trust[method] = model_randomization(attribution.matrix(), method, self.task, self.train, self.test,
                                                 seed=seed, device=self.device, **options)
        return self.trust[method]

    def add_values(self, name: str, values: torch.Tensor, higher_is_better: bool = True) -> None:
        """Per-example data values ``[n_train]`` (In-Run Data Shapley, LAVA, …): a ``value:<name>`` column in every
        training table, and a ranking ``name`` in the mislabel panel with the least valuable examples first."""
        values = torch.as_tensor(values).detach().cpu()
        if values.shape != (len(self.train),):
            raise TDAError(f"values must have one entry per training example ({len(self.train)}), got shape "
                           f"{tuple(values.shape)}")
        if not torch.isfinite(values).all():
            raise TDAError(f"values for {name!r} contain NaN or inf")
        if name in self.attributions:
            raise TDAError(f"{name!r} is already an attribution method's name; choose another name for the values")
        if name in (TRAINING_LOSS, OUT_OF_FOLD):
            raise TDAError(f"{name!r} is a baseline ranking's name; choose another name for the values")
        self.values[name] = values.double()
        self.self_influences[name] = (-values if higher_is_better else values).float()

    def add_selection(self, name: str, table: pd.DataFrame) -> None:
        """A selection of training examples (``tda_explorer.select``'s DataFrame: ``train_id`` and ``score``), shown
        and exported by the explorer's Selection tab."""
        missing = {"train_id", "score"} - set(getattr(table, "columns", []))
        if missing:
            raise TDAError(f"table must be a DataFrame with columns train_id and score; missing {sorted(missing)}")
        self.train.positions(table["train_id"].tolist(), "table.train_id")
        self.selections[name] = table.reset_index(drop=True)

    def selection_frame(self, name: str) -> pd.DataFrame:
        """The selection ``name`` with each example's label, prediction, flag and values."""
        if name not in self.selections:
            raise TDAError(f"no selection named {name!r}; selections: {sorted(self.selections) or 'none'}")
        frame = self.selections[name].copy()
        for column, values in self._train_columns(frame["train_id"].tolist()).items():
            frame[column if column not in frame else f"session_{column}"] = values
        return frame

    def add_tracing(self, name: str, table: pd.DataFrame) -> None:
        """Fact-tracing results (``TwoStageTracer.trace``'s DataFrame: ``query_id, query, train_id, verifier_score,
        supported, verifier``), shown by the explorer's Tracing tab."""
        required = {"query_id", "query", "train_id", "verifier_score", "supported", "verifier"}
        missing = required - set(getattr(table, "columns", []))
        if missing:
            raise TDAError(f"table must be a DataFrame with columns {sorted(required)}; missing {sorted(missing)}")
        self.train.positions(table["train_id"].tolist(), "table.train_id")
        self.tracings[name] = table.reset_index(drop=True)

    def add_stability(self, method: str, mean: torch.Tensor | Stability, std: torch.Tensor | None = None) -> None:
        """Scores' mean and std across seeds ``[n_test, n_train]`` for ``method`` (shown as ± marks with
        p-values), or a ``Stability`` from ``score_stability``."""
        if isinstance(mean, Stability):
            mean, std = mean.mean, mean.std
        expected = (len(self.test), len(self.train))
        if tuple(mean.shape) != expected or tuple(std.shape) != expected:
            raise TDAError(f"mean and std must be [n_test, n_train] = {list(expected)}, got "
                           f"{list(mean.shape)} and {list(std.shape)}")
        self.stability[method] = (mean, std)

    def stability_frame(self, method: str, test_id: Any, alpha: float = 0.05) -> pd.DataFrame:
        """Tidy ``train_id, mean, std, z, p_value, stable`` of ``method`` for one test point, by |z| descending."""
        if method not in self.stability:
            raise TDAError(f"no stability data for {method!r}; add it with add_stability (have: "
                           f"{sorted(self.stability) or 'none'})")
        pos = self.test.positions([test_id], "test_id")[0]
        mean, std = (t[pos].double() for t in self.stability[method])
        z, p = z_and_p(mean, std)
        frame = pd.DataFrame({"train_id": self.train.ids, "mean": mean.numpy(), "std": std.numpy(), "z": z.numpy(),
                              "p_value": p.numpy(), "stable": (p < alpha).numpy()})
        return frame.reindex(frame["z"].abs().sort_values(ascending=False).index).reset_index(drop=True)

    def export_csv(self, table: pd.DataFrame, name: str) -> Path:
        """Save ``table`` under ``<folder>/exports/`` with a timestamp; returns the path."""
        import re
        import time

        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "table"
        path = self.folder / "exports" / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
        return path

    def flags_dataframe(self) -> pd.DataFrame:
        """The flag store as a DataFrame (``train_id, flag, relabel, note, updated_at``) with each example's
        ``training_loss`` and, with out-of-fold probabilities, ``oof_confidence``."""
        df = self.flags.to_dataframe()
        index = self.train._index
        known = [t in index for t in df["train_id"]]  # a store kept from other data may hold ids not in it
        columns = self._baseline_columns([index[t] for t, k in zip(df["train_id"], known) if k])
        for column, values in columns.items():
            it = iter(values)
            df[column] = [next(it) if k else float("nan") for k in known]
        return df

    def test_table(self) -> pd.DataFrame:
        """Every test example with its label, prediction and loss."""
        return pd.DataFrame({
            "test_id": self.test.ids,
            "label": self.test.labels.tolist(),
            "predicted": self.test_predicted.tolist(),
            "loss": self.test_loss.double().numpy(),
        })


def _check_labels_fit(data: AttributionDataset, width: int, argument: str) -> None:
    """Refuse labels outside [0, the model's number of outputs ``width``)."""
    bad = torch.nonzero(data.labels >= width).flatten().tolist()
    if bad:
        ids = [data.ids[i] for i in bad[:10]]
        more = f" and {len(bad) - len(ids)} more" if len(bad) > len(ids) else ""
        raise TDAError(f"{argument}: labels must be class indices in [0, {width}) — the model has {width} outputs — "
                       f"but ids {ids}{more} have labels up to {int(data.labels.max())}")
