"""Run and score methods on a built-in experiment: what the CLI's ``evaluate`` and the benchmarks use."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.catalogue import method_spec
from tda_explorer.compute.engine.task import predict
from tda_explorer.compute.methods import Attributor, get_method
from tda_explorer.compute.training.train import train_ensemble, unstack
from tda_explorer.evaluate.metrics import baseline_metrics, lds, mislabel_auc, recall_at
from tda_explorer.evaluate.quanda_metrics import class_detection, mislabeling_detection_area, top_k_cardinality
from tda_explorer.evaluate.removal_validation import single_removal_spearman, validate_removals
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.ground_truth import SubsetGroundTruth
from tda_explorer.retraining.retrainer import Retrainer


def method_options(experiment: Experiment, method: str, ensemble: int | None = None,
                   device: str = "cpu", **options: Any) -> tuple[dict, float]:
    """``options`` with what the experiment supplies for the method's declared needs (checkpoints, recipe,
    trajectory, recording: ``Experiment.resources``); returns (options, seconds spent training for them).

    ``ensemble=K`` (TRAK) trains K−1 more models with fresh seeds beside the experiment's own, in lock-step.
    """
    config = {k: v for k, v in options.items() if v is not None}
    t0 = time.perf_counter()
    if ensemble is not None and check_positive_int(ensemble, "ensemble") > 1:
        if "models" not in {a.name for a in method_spec(method).argument_info()}:
            raise TDAError(f"ensemble: {method} takes no models= option to ensemble over (trak does)")
        train = experiment.split.train
        rows = torch.arange(len(train)).expand(ensemble - 1, -1)
        seeds = [experiment.config.seed + 1 + i for i in range(ensemble - 1)]
        stacked = train_ensemble(experiment.factory, train.inputs, train.labels, rows, experiment.config, seeds,
                                 device=device)
        config["models"] = [experiment.record.model.state_dict()] + [unstack(stacked, i) for i in range(ensemble - 1)]
    config = method_spec(method).fill(config, experiment.resources(device))
    return config, time.perf_counter() - t0


def run_method(experiment: Experiment, method: str, device: str = "cpu", **options: Any):
    """Fit ``method`` and attribute the test set; returns (attributor, attribution, seconds, info)."""
    config, training_seconds = method_options(experiment, method, device=device, **options)
    attributor: Attributor = get_method(method, experiment.task(), device=device, **config)
    t0 = time.perf_counter()
    attributor.fit(experiment.split.train)
    attribution = attributor.attribute(experiment.split.test)
    seconds = time.perf_counter() - t0
    return attributor, attribution, seconds, {"extra_training_seconds": training_seconds}


def training_loss(experiment: Experiment, device: str = "cpu") -> torch.Tensor:
    """The attributed model's loss at each training example's given label ``[n_train]``: the baseline ranking."""
    train = experiment.split.train
    logits = predict(experiment.task(), train, device, argument="train").double()
    return torch.nn.functional.cross_entropy(logits, train.labels, reduction="none")


def mislabel_baselines(experiment: Experiment, suspicion: torch.Tensor, attributor: Any = None,
                       device: str = "cpu") -> dict[str, float]:
    """``suspicion`` beside the training-loss baseline and, when ``attributor`` kept out-of-fold probabilities
    (``suspicion``'s ``oof_``), beside cleanlab's self-confidence on them (``metrics.baseline_metrics``)."""
    train, flipped = experiment.split.train, experiment.split.flipped
    oof = getattr(attributor, "oof_", None)
    confidence = None if oof is None else oof.detach().cpu().double()[torch.arange(len(train)), train.labels]
    return baseline_metrics(suspicion, flipped, training_loss(experiment, device), confidence)


def evaluate_method(experiment: Experiment, method: str, truth: SubsetGroundTruth | None = None,
                    device: str = "cpu", validate_removal: bool = False, cache_dir: str | None = None,
                    other_truths: dict[str, SubsetGroundTruth] | None = None, **options: Any) -> dict[str, Any]:
    """Metrics of one method: ``lds`` (with ``truth``; ``lds_<name>`` for each of ``other_truths``), mislabel
    figures (when the data has noise) beside the training-loss baseline's (``mislabel_baselines``), times,
    ``metasmoothness`` where the method measures it, and with ``validate_removal`` its removal predictions against
    retraining (``validate_removals``)."""
    attributor, attribution, seconds, info = run_method(experiment, method, device=device, **options)
    result: dict[str, Any] = {"method": method, "seconds": seconds, **info,
                              "options": {k: v for k, v in options.items() if v is not None}}
    if truth is not None:
        result["lds"] = lds(attribution.scores, truth.masks, truth.measurements)[0]
    for name, other in (other_truths or {}).items():
        result[f"lds_{name}"] = lds(attribution.scores, other.masks, other.measurements)[0]
    if hasattr(attributor, "metasmoothness_"):
        result["metasmoothness"] = attributor.metasmoothness_
        result["seconds_vs_training_run"] = seconds / attributor.training_seconds_
    train, test = experiment.split.train, experiment.split.test
    if not train.is_sequence:  # quanda's ground-truth-free heuristics, comparable with its benchmarks
        result["class_detection"] = class_detection(attribution.scores, train.labels, test.labels)
        result["top_k_cardinality"] = top_k_cardinality(attribution.scores)
    flipped = experiment.split.flipped
    if flipped.any():
        t0 = time.perf_counter()
        suspicion = attributor.self_influence()
        result["self_influence_seconds"] = time.perf_counter() - t0
        result.update(mislabel_auc=mislabel_auc(suspicion, flipped), recall_at_10=recall_at(suspicion, flipped, 0.1),
                      recall_at_20=recall_at(suspicion, flipped, 0.2),
                      mislabeling_detection_area=mislabeling_detection_area(suspicion, flipped))
        result.update(mislabel_baselines(experiment, suspicion, attributor, device))
    if validate_removal:
        result.update(validate_removals(experiment, attributor, attribution, cache_dir=cache_dir, device=device))
    if method == "dvemb":  # the same-batch single removals are the trajectory-specific leave-one-out it estimates
        if "loo_spearman" not in result:
            retrainer = Retrainer(experiment, cache_dir=cache_dir, device=device)
            result["loo_spearman"] = single_removal_spearman(experiment, attribution, retrainer)[0]
        result["tsloo_spearman"] = result["loo_spearman"]
    return result


def compare_methods(experiment: Experiment, methods: Sequence[str | tuple[str, dict]],
                    truth: SubsetGroundTruth | None = None, device: str = "cpu") -> pd.DataFrame:
    """One tidy row per method: ``method, options, lds, mislabel_auc, recall_at_10, recall_at_20``, the training-loss
    baseline's AUC and recall@10% with each method's difference from them, ``seconds``.

    Parameters
    ----------
    methods : list of names or (name, options) pairs, e.g. ``["grad-dot", ("trak", {"ensemble": 5})]``.
    truth : SubsetGroundTruth, optional
        Retraining ground truth for LDS (see ``subset_ground_truth``).
    """
    rows = []
    for entry in methods:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        row = evaluate_method(experiment, name, truth, device=device, **options)
        row["options"] = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        rows.append(row)
    columns = ["method", "options", "lds", "mislabel_auc", "recall_at_10", "recall_at_20", "loss_baseline_mislabel_auc",
               "mislabel_auc_minus_loss", "loss_baseline_recall_at_10", "recall_at_10_minus_loss", "spearman_with_loss",
               "mislabeling_detection_area", "class_detection", "top_k_cardinality", "seconds",
               "self_influence_seconds", "extra_training_seconds"]
    df = pd.DataFrame(rows)
    return df[[c for c in columns if c in df.columns]]
