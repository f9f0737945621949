"""Evaluation: the retraining engine and ground truth (subsets, leave-one-out, groups), LDS, LOO correlation,
removal validation, mislabel detection, brittleness, stability across seeds, and ``compare_methods``."""

from tda_explorer.evaluate.experiment import TRAIN_CONFIGS, Experiment, build_experiment
from tda_explorer.evaluate.ground_truth import (
    SubsetGroundTruth,
    removal_ground_truth,
    subset_ground_truth,
    truth_ceiling,
)
from tda_explorer.evaluate.harness import compare_methods, evaluate_method, run_method
from tda_explorer.evaluate.metrics import lds, mislabel_auc, recall_at
from tda_explorer.evaluate.removal import LOOGroundTruth, brittleness, loo_correlation, loo_ground_truth
from tda_explorer.evaluate.removal_validation import validate_removals
from tda_explorer.evaluate.retrain import RemovalEffect, Retrainer
from tda_explorer.evaluate.stability import model_variants, score_stability

__all__ = [
    "TRAIN_CONFIGS", "Experiment", "build_experiment", "SubsetGroundTruth", "subset_ground_truth",
    "removal_ground_truth", "truth_ceiling",
    "compare_methods", "evaluate_method", "run_method", "lds", "mislabel_auc", "recall_at",
    "LOOGroundTruth", "brittleness", "loo_correlation", "loo_ground_truth", "validate_removals", "RemovalEffect",
    "Retrainer", "model_variants", "score_stability",
]
