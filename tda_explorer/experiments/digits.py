"""The built-in experiments, trained with recorded checkpoints: digits with a linear model or an MLP, and generated
reviews with a small transformer classifier."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch

from tda_explorer._validation import check_choice
from tda_explorer.compute.catalogue import Resources
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.dvemb import record_experiment_run
from tda_explorer.compute.methods.synset import Trajectory
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.models.transformer import make_transformer
from tda_explorer.compute.training.train import TrainConfig, TrainingRecord, replay_record, train_model
from tda_explorer.data.dataset import DataSplit
from tda_explorer.data.digits import load_digits_split
from tda_explorer.data.text import load_reviews_split
from tda_explorer.retraining.retrainer import Recipe

#: Training recipes of the built-in models (full objective: mean CE + wd/2 ‖θ‖²).
TRAIN_CONFIGS = {
    "lr": TrainConfig(epochs=300, batch_size=1000, lr=5e-2, weight_decay=1e-2, n_checkpoints=6),
    "mlp": TrainConfig(epochs=50, batch_size=64, lr=0.1, weight_decay=1e-2, optimizer="sgd", n_checkpoints=10),
    "mlp-gelu": TrainConfig(epochs=50, batch_size=64, lr=0.1, weight_decay=1e-2, optimizer="sgd", n_checkpoints=10),
    "mlp-dropout": TrainConfig(epochs=50, batch_size=64, lr=0.1, weight_decay=1e-2, optimizer="sgd", n_checkpoints=10),
    "transformer": TrainConfig(epochs=15, batch_size=32, lr=3e-3, weight_decay=1e-3, n_checkpoints=5),
}
EXPERIMENT_MODELS = tuple(TRAIN_CONFIGS)
TEXT_MODELS = ("transformer",)


@dataclass
class Experiment:
    """Data, model kind, training recipe and the trained model of one built-in task."""

    split: DataSplit
    model_kind: str
    config: TrainConfig
    record: TrainingRecord

    train = property(lambda self: self.split.train, doc="The training set (``Scenario.train``).")
    test = property(lambda self: self.split.test, doc="The test set (``Scenario.test``).")

    def factory(self, seed: int) -> torch.nn.Module:
        x = self.split.train.inputs
        if self.model_kind in TEXT_MODELS:
            return make_transformer("classifier", self.split.tokenizer.vocab_size, self.split.train.n_classes,
                                    seed=seed, max_len=x.shape[1])
        return make_model(self.model_kind, x.shape[1], self.split.train.n_classes, seed=seed)

    def task(self, measurement: str = "loss", parameters: None | str | list[str] = None) -> AttributionTask:
        return AttributionTask(self.record.model, checkpoints=self.record.checkpoints, measurement=measurement,
                               parameters=parameters, weight_decay=self.config.weight_decay)

    def trajectory(self) -> Trajectory:
        """The recorded run for synset methods: initial parameters (re-created from the seed), recipe, checkpoints."""
        return Trajectory(self.factory(self.config.seed).state_dict(), self.config,
                          [c.state_dict for c in self.record.checkpoints])

    def recipe(self) -> Recipe:
        """How this experiment's model is trained: what the retraining engine needs."""
        return Recipe(self.model_kind, self.factory, self.config, self.split.train, self.split.test,
                      convex=self.model_kind == "lr")

    def resources(self, device: str = "cpu") -> Resources:
        """What this experiment supplies for methods' needs (``compute.catalogue.NEEDS``), each made when used."""
        return {
            "checkpoints": dict,
            "recipe": lambda: {"model_factory": self.factory, "train_config": self.config},
            "trajectory": lambda: {"trajectory": self.trajectory()},
            "recording": lambda: {"recording": record_experiment_run(self.task(), self.split.train, self.factory,
                                                                     self.config, self.config.seed, device=device)},
        }

    def replayed(self) -> Experiment:
        """This experiment with the model trained by the retraining engine's deterministic run (same recipe and
        seed; see ``replay_record``): what same-seed ground truth perturbs, so every method attributes that run."""
        record = replay_record(self.factory, self.split.train.inputs, self.split.train.labels, self.config,
                               device=next(self.record.model.parameters()).device)
        return replace(self, record=record)

    def fingerprint(self) -> str:
        """Hash of the data, the model kind and the recipe (not of the trained weights)."""
        h = hashlib.sha256()
        h.update(self.split.train.fingerprint().encode())
        h.update(self.split.test.fingerprint().encode())
        h.update(json.dumps({"model": self.model_kind, **self.config.to_dict()}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def test_accuracy(self) -> float:
        with torch.no_grad():
            pred = self.record.model(self.split.test.inputs).argmax(1)
        return float((pred == self.split.test.labels).float().mean())


def build_experiment(model: str = "mlp", noise: float = 0.0, seed: int = 0, n_train: int = 1000,
                     n_test: int = 300, epochs: int | None = None, device: str = "cpu",
                     progress: bool = False) -> Experiment:
    """Load the data (digits, or generated reviews for a text model; optionally with label noise), train the
    model, keep its checkpoints."""
    check_choice(model, "model", EXPERIMENT_MODELS)
    load = load_reviews_split if model in TEXT_MODELS else load_digits_split
    split = load(n_train=n_train, n_test=n_test, noise=noise, seed=seed)
    config = replace(TRAIN_CONFIGS[model], seed=seed, **({"epochs": epochs} if epochs else {}))
    exp = Experiment(split, model, config, record=None)  # type: ignore[arg-type]
    exp.record = train_model(exp.factory, split.train.inputs, split.train.labels, config, device=device,
                             progress=progress)
    return exp
