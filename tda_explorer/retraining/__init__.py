"""Retraining as ground truth: one ``Retrainer`` over a recipe (model factory, training config, data) with one cache,
and the truths built on it — subset LDS truth, leave-one-out, further training from the final model."""

from tda_explorer.retraining.ground_truth import (
    SubsetGroundTruth,
    removal_ground_truth,
    subset_ground_truth,
    truth_ceiling,
)
from tda_explorer.retraining.removal import LOOGroundTruth, brittleness, loo_correlation, loo_ground_truth
from tda_explorer.retraining.retrainer import RemovalEffect, Retrainer

__all__ = [
    "SubsetGroundTruth", "subset_ground_truth", "removal_ground_truth", "truth_ceiling", "LOOGroundTruth",
    "brittleness", "loo_correlation", "loo_ground_truth", "RemovalEffect", "Retrainer",
]
