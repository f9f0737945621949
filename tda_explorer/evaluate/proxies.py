"""Attribution through a proxy model, scored against the *target's* ground truth (limited access)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.models.proxy import PROXY_ACCESS, build_proxy
from tda_explorer.evaluate.harness import run_method
from tda_explorer.evaluate.metrics import _spearman_columns, lds, mislabel_auc
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.ground_truth import SubsetGroundTruth


def score_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over test points of the Spearman correlation between two score matrices' rows."""
    return float(np.nanmean(_spearman_columns(a.double().numpy().T, b.double().numpy().T)))


def evaluate_proxy(experiment: Experiment, method: str, kind: str, truth: SubsetGroundTruth | None = None,
                   device: str = "cpu", **options: Any) -> dict[str, Any]:
    """``method`` on a ``kind`` proxy of the experiment's model (query access simulated by the target's logits)
    beside the same method on the target: ``lds`` / ``target_lds`` against the target's truth, their score
    agreement, mislabel AUCs when the data has noise, and the proxy's test accuracy."""
    train, test = experiment.split.train, experiment.split.test
    target_model = experiment.record.model.eval()
    query = lambda x: target_model(x.to(next(target_model.parameters()).device))
    t0 = time.perf_counter()
    record = build_proxy(kind, experiment.factory, train.inputs, train.labels, experiment.config, query=query)
    proxy_seconds = time.perf_counter() - t0
    task = AttributionTask(record.model, checkpoints=record.checkpoints, weight_decay=experiment.config.weight_decay,
                           access=PROXY_ACCESS[kind])
    options = {k: v for k, v in options.items() if v is not None}
    t0 = time.perf_counter()
    proxied = get_method(method, task, device=device, **options).fit(train)
    scores = proxied.attribute(test).scores
    seconds = time.perf_counter() - t0
    target, target_attribution, _, _ = run_method(experiment, method, device=device, **options)
    with torch.no_grad():
        accuracy = float((record.model(test.inputs).argmax(1) == test.labels).float().mean())
    result = {"method": method, "proxy": kind, "access": PROXY_ACCESS[kind], "proxy_test_accuracy": accuracy,
              "target_test_accuracy": experiment.test_accuracy(), "proxy_seconds": proxy_seconds, "seconds": seconds,
              "proxy_score_spearman": score_agreement(scores, target_attribution.scores)}
    if truth is not None:
        result["lds"] = lds(scores, truth.masks, truth.measurements)[0]
        result["target_lds"] = lds(target_attribution.scores, truth.masks, truth.measurements)[0]
    if experiment.split.flipped.any():
        result["mislabel_auc"] = mislabel_auc(proxied.self_influence(), experiment.split.flipped)
        result["target_mislabel_auc"] = mislabel_auc(target.self_influence(), experiment.split.flipped)
    return result
