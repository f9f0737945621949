"""Evaluation: ground truth by retraining, LDS, mislabel detection."""

from tda_explorer.evaluate.experiment import TRAIN_CONFIGS, Experiment, build_experiment
from tda_explorer.evaluate.ground_truth import SubsetGroundTruth, subset_ground_truth
from tda_explorer.evaluate.metrics import lds, mislabel_auc, recall_at

__all__ = [
    "TRAIN_CONFIGS", "Experiment", "build_experiment", "SubsetGroundTruth", "subset_ground_truth",
    "lds", "mislabel_auc", "recall_at",
]
