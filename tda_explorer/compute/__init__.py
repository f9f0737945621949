"""Compute layer: numbers only (no UI imports)."""

from tda_explorer.compute.engine.attribution import Attribution
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients, per_sample_gradients
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import (
    METHODS,
    TRAK,
    Attributor,
    GradCos,
    GradDot,
    Suspicion,
    TracIn,
    available_methods,
    get_method,
)
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.training.train import Checkpoint, TrainConfig, TrainingRecord, train_ensemble, train_model

__all__ = [
    "Attribution", "AttributionTask", "Attributor", "METHODS", "TRAK", "Suspicion", "GradDot", "GradCos", "TracIn",
    "available_methods", "get_method", "iter_per_sample_gradients", "per_sample_gradients", "make_model", "Checkpoint",
    "TrainConfig", "TrainingRecord", "train_ensemble", "train_model",
]
