"""The built-in scenarios behind one ``Experiment`` protocol: digits and generated reviews (``digits``), the planted
backdoor, fact tracing, and the planted pool for selection."""

from tda_explorer.experiments.digits import EXPERIMENT_MODELS, TEXT_MODELS, TRAIN_CONFIGS, Experiment, build_experiment
from tda_explorer.experiments.scenario import Scenario

__all__ = ["EXPERIMENT_MODELS", "TEXT_MODELS", "TRAIN_CONFIGS", "Experiment", "Scenario", "build_experiment"]
