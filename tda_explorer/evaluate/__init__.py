"""Evaluation: retraining ground truth (subsets, leave-one-out), LDS, LOO correlation, mislabel
detection, brittleness, and ``compare_methods``."""

from tda_explorer.evaluate.experiment import TRAIN_CONFIGS, Experiment, build_experiment
from tda_explorer.evaluate.ground_truth import SubsetGroundTruth, subset_ground_truth
from tda_explorer.evaluate.harness import compare_methods, evaluate_method, run_method
from tda_explorer.evaluate.metrics import lds, mislabel_auc, recall_at
from tda_explorer.evaluate.removal import LOOGroundTruth, brittleness, loo_correlation, loo_ground_truth

__all__ = [
    "TRAIN_CONFIGS", "Experiment", "build_experiment", "SubsetGroundTruth", "subset_ground_truth",
    "compare_methods", "evaluate_method", "run_method", "lds", "mislabel_auc", "recall_at",
    "LOOGroundTruth", "brittleness", "loo_correlation", "loo_ground_truth",
]
