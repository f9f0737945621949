"""Final-model-only gold standard (Wei et al., NeurIPS 2025): further training from the final model with and without
each chosen example. Pure training code, so it lives in ``compute.training.further_training`` (where calibration
builds on it); re-exported here, beside the other truths built by retraining."""

from tda_explorer.compute.training.further_training import (
    FurtherTrainingTruth,
    further_training_cosine,
    further_training_cosines,
    further_training_truth,
)

__all__ = ["FurtherTrainingTruth", "further_training_truth", "further_training_cosine", "further_training_cosines"]
