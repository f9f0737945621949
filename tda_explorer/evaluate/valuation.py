"""Evaluate a data-valuation method (LAVA) on a built-in experiment: mislabel detection from its values."""

from __future__ import annotations

import time
from typing import Any

from tda_explorer.compute.valuation.lava import LAVA
from tda_explorer.evaluate.harness import mislabel_baselines
from tda_explorer.evaluate.metrics import mislabel_auc, recall_at
from tda_explorer.experiments.digits import Experiment


def _detection(values, flipped, prefix: str = "") -> dict[str, float]:
    suspicion = -values  # the least valuable first
    return {f"{prefix}mislabel_auc": mislabel_auc(suspicion, flipped),
            f"{prefix}recall_at_10": recall_at(suspicion, flipped, 0.1),
            f"{prefix}recall_at_20": recall_at(suspicion, flipped, 0.2)}


def evaluate_lava(experiment: Experiment, device: str = "cpu", lambda_label: float = 1.0,
                  epsilon: float = 0.1) -> dict[str, Any]:
    """LAVA values of the training set against the experiment's clean test split as the validation set.

    Reports ``seconds`` (embedding + transport), and with label noise ``mislabel_auc``, ``recall_at_10`` and
    ``recall_at_20`` beside the training-loss baseline's (``mislabel_baselines``), plus the same figures for the
    no-label-term ablation (``no_label_term_*``, λ = 0).
    """
    train, validation = experiment.split.train, experiment.split.test
    t0 = time.perf_counter()
    lava = LAVA(model=experiment.record.model, lambda_label=lambda_label, epsilon=epsilon, device=device)
    lava.fit(train, validation)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"method": "lava", "seconds": seconds, "converged": lava.converged_,
                              "options": {"lambda_label": lambda_label, "epsilon": epsilon,
                                          "embedding": "penultimate layer", "validation": "clean test split"}}
    flipped = experiment.split.flipped
    if flipped.any():
        result.update(_detection(lava.values_, flipped))
        result.update(mislabel_baselines(experiment, -lava.values_, device=device))
        ablation = LAVA(model=experiment.record.model, lambda_label=0.0, epsilon=epsilon, device=device)
        result.update(_detection(ablation.fit(train, validation).values_, flipped, "no_label_term_"))
    return result
