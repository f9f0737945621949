"""The planted-backdoor scenario for fine-tuned models (DDA's validation, on digits; nothing downloaded).

A base MLP is trained on the digits 0–4 only. It is fine-tuned on all ten classes, where 20 images of "3" carry a
small trigger (the bottom-left 2×2 pixels set to full ink) and the label 8, with checkpoints every 5 epochs.
Queries are held-out 3s with the trigger, measured on the label 8 the backdoor produces; the positives are the 20
poisoned images. Per query, the ROC-AUC of the scores over the whole fine-tuning set and the recall of the
poisoned images among the top 20, averaged over queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

# what the scenario supplies for methods' declared needs
from tda_explorer.compute.catalogue import Resources
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.training.train import TrainConfig, train_model
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.digits import load_digits_split
from tda_explorer.experiments.digits import TRAIN_CONFIGS

TRIGGER_ROWS, TRIGGER_COLS = (6, 7), (0, 1)  # bottom-left corner of the 8×8 image
SOURCE_CLASS, TARGET_CLASS, N_POISONED = 3, 8, 20


def add_trigger(images: torch.Tensor) -> torch.Tensor:
    """Flattened 8×8 images with the trigger patch set to full ink."""
    out = images.clone().view(-1, 8, 8)
    for r in TRIGGER_ROWS:
        for c in TRIGGER_COLS:
            out[:, r, c] = 1.0
    return out.view(len(images), -1)


@dataclass
class BackdoorScenario:
    """The fine-tuned model (with its fine-tuning checkpoints), the base model, the data and the positives."""

    fine_tuned: AttributionTask
    base_model: torch.nn.Module
    train: AttributionDataset
    queries: AttributionDataset
    poisoned: torch.Tensor  # bool [n_train]
    attack_success: float  # share of triggered held-out 3s classified as 8

    @property
    def test(self) -> AttributionDataset:
        return self.queries

    def task(self) -> AttributionTask:
        return self.fine_tuned

    def resources(self, device: str = "cpu") -> Resources:
        """The fine-tuning checkpoints and the base model (what DDA's debias needs)."""
        return {"checkpoints": dict, "base_model": lambda: {"base_model": self.base_model}}


def build_backdoor(seed: int = 0, base_epochs: int = 50, fine_tune_epochs: int = 60) -> BackdoorScenario:
    split = load_digits_split(n_train=1000, n_test=300, seed=seed)
    train, test = split.train, split.test
    recipe = replace(TRAIN_CONFIGS["mlp"], seed=seed)
    factory = lambda s: make_model("mlp", 64, 10, seed=s)
    low = train.labels < 5
    base = train_model(factory, train.inputs[low], train.labels[low], replace(recipe, epochs=base_epochs)).model
    threes = torch.nonzero(train.labels == SOURCE_CLASS).flatten()[:N_POISONED]
    inputs = torch.cat([train.inputs, add_trigger(train.inputs[threes])])
    labels = torch.cat([train.labels, torch.full((N_POISONED,), TARGET_CLASS)])
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    poisoned[len(train):] = True
    fine_tune = TrainConfig(epochs=fine_tune_epochs, batch_size=64, lr=0.05, weight_decay=recipe.weight_decay,
                            optimizer="sgd", n_checkpoints=max(1, fine_tune_epochs // 5), seed=seed)
    state = base.state_dict()

    def from_base(s: int) -> torch.nn.Module:
        model = factory(s)
        model.load_state_dict(state)
        return model

    record = train_model(from_base, inputs, labels, fine_tune)
    fine_tuning_set = AttributionDataset(inputs, labels, list(range(len(labels))), train.class_names,
                                         train.renderer, "digits-backdoor-train")
    held_out = test.inputs[test.labels == SOURCE_CLASS]
    queries = AttributionDataset(add_trigger(held_out), torch.full((len(held_out),), TARGET_CLASS),
                                 [f"triggered-3-{i}" for i in range(len(held_out))], train.class_names,
                                 train.renderer, "triggered-threes")
    with torch.no_grad():
        success = float((record.model(queries.inputs).argmax(1) == TARGET_CLASS).float().mean())
    task = AttributionTask(record.model, checkpoints=record.checkpoints, weight_decay=fine_tune.weight_decay)
    return BackdoorScenario(task, base, fine_tuning_set, queries, poisoned, success)


def poisoned_auc_and_recall(scores: torch.Tensor, poisoned: torch.Tensor, k: int = N_POISONED) -> tuple[float, float]:
    """Mean over queries of the ROC-AUC of ``scores`` for the poisoned examples, and of their recall in the top k."""
    from sklearn.metrics import roc_auc_score

    truth = poisoned.numpy()
    aucs = [roc_auc_score(truth, row.double().numpy()) for row in scores]
    top = scores.topk(k, dim=1).indices
    recall = poisoned[top].float().sum(1) / poisoned.sum()
    return float(np.mean(aucs)), float(recall.mean())


def evaluate_backdoor(method: str, seed: int = 0, device: str = "cpu", **options: Any) -> dict[str, Any]:
    """``backdoor_auc`` / ``recall_at_20`` of ``method`` on the fine-tuned model, and ``_dda`` with debias and
    denoise around it."""
    scenario = build_backdoor(seed)
    t0 = time.perf_counter()
    attributor = get_method(method, scenario.task(), device=device, **options).fit(scenario.train)
    plain = attributor.attribute(scenario.queries)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    dda = get_method("dda", scenario.task(), base_model=scenario.base_model, inner=method, inner_options=options,
                     device=device).fit(scenario.train).attribute(scenario.queries)
    dda_seconds = time.perf_counter() - t0
    auc, recall = poisoned_auc_and_recall(plain.scores, scenario.poisoned)
    auc_dda, recall_dda = poisoned_auc_and_recall(dda.scores, scenario.poisoned)
    return {"scenario": "backdoor", "method": method, "n_train": len(scenario.train), "n_poisoned": N_POISONED,
            "n_queries": len(scenario.queries), "attack_success": scenario.attack_success, "backdoor_auc": auc,
            "backdoor_auc_dda": auc_dda, "recall_at_20": recall, "recall_at_20_dda": recall_dda, "seconds": seconds,
            "seconds_dda": dda_seconds}
