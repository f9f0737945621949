"""Cross-check: our quanda-compatible metrics against quanda 0.5.0 itself, on the same score matrices.

quanda's installation pulls lightning, torchvision, datasets, captum, traker and a CUDA torch; the metrics need
none of them. So quanda goes into a folder of its own, never into the project's environment, with the light
packages its metric code runs on, and the unused heavy imports are stubbed:

    .venv/bin/pip install --no-deps --target .quanda quanda==0.5.0 torchmetrics lightning-utilities torcheval
    PYTHONPATH=.quanda .venv/bin/python benchmarks/crosscheck_quanda.py --json benchmarks/results/quanda_crosscheck.json
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch

STUBS = ("datasets", "lightning", "captum", "trak", "annoy", "torchvision", "kronfluence", "dattri", "tiktoken",
         "transformers", "omegaconf", "hydra", "yaml", "huggingface_hub", "safetensors", "peft", "wandb")

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(name)


def _make(name):
    return _Meta(name, (), {"__init__": lambda self, *a, **k: None})


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _make(name)
        setattr(self, name, value)
        return value

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None
    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    from tda_explorer import AttributionTask
    from tda_explorer.evaluate import quanda_metrics as ours  # first: pandas must see the real (absent) pyarrow

    sys.meta_path.insert(0, _Finder())
    from quanda.metrics.downstream_eval import (
        ClassDetectionMetric,
        MislabelingDetectionMetric,
        MRRMetric,
        RecallAtKMetric,
        ShortcutDetectionMetric,
    )
    from quanda.metrics.heuristics import MixedDatasetsMetric, TopKCardinalityMetric

    gen = torch.Generator().manual_seed(0)
    n_train, n_test, n_classes = 400, 60, 5
    x = torch.randn(n_train, 4, generator=gen)
    train_labels = torch.randint(0, n_classes, (n_train,), generator=gen)
    train = torch.utils.data.TensorDataset(x, train_labels)
    model = torch.nn.Linear(4, n_classes)
    scores = torch.randn(n_test, n_train, generator=gen)
    test_labels = torch.randint(0, n_classes, (n_test,), generator=gen)
    mislabeled = torch.randperm(n_train, generator=gen)[:40]
    self_influence = 1000 * torch.randn(n_train, generator=gen)  # far apart: quanda's index·1e-4 tie-break is moot
    shortcut = (train_labels == 1) & (torch.rand(n_train, generator=gen) < 0.6)  # a shortcut lives in one class
    entailment = torch.rand(n_test, n_train, generator=gen) < 0.01
    adversarial = torch.zeros(n_train, dtype=torch.long)
    adversarial[train_labels == 2] = 1  # all adversarial examples share one label
    rows = []

    def compare(name, theirs, mine):
        row = {"metric": name, "quanda": float(theirs), "ours": float(mine), "difference": abs(float(theirs) - mine)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    m = TopKCardinalityMetric(model, train, top_k=5)
    m.update(scores)
    compare("top_k_cardinality", m.compute()["score"], ours.top_k_cardinality(scores, 5))
    m = ClassDetectionMetric(model, train, s=5)
    m.update(scores, test_targets=test_labels)
    compare("class_detection", m.compute()["score"], ours.class_detection(scores, train_labels, test_labels, 5))
    m = MislabelingDetectionMetric(model, train, mislabeling_indices=mislabeled.tolist(),
                                   precomputed_self_influence=self_influence)
    compare("mislabeling_detection", m.compute()["score"],
            ours.mislabeling_detection_area(self_influence, mislabeled))
    m = ShortcutDetectionMetric(model, train, shortcut_indices=torch.nonzero(shortcut).flatten().tolist(),
                                shortcut_cls=1, filter_by_non_shortcut=False, filter_by_shortcut_pred=False)
    m.update(scores)
    compare("shortcut_detection", m.compute()["score"], ours.shortcut_detection(scores, shortcut))
    m = MixedDatasetsMetric(model, train, adversarial_indices=adversarial, filter_by_prediction=False)
    m.update(scores)
    compare("mixed_datasets", m.compute()["score"], ours.mixed_datasets(scores, adversarial.bool()))
    m = MRRMetric(model, train)
    m.update(scores, entailment_labels=entailment)
    compare("mrr", m.compute()["score"], ours.mean_reciprocal_rank(scores, entailment))
    m = RecallAtKMetric(model, train, k=10)
    m.update(scores, entailment_labels=entailment)
    compare("recall_at_k", m.compute()["score"], ours.recall_at_k(scores, entailment, 10))
    # our attributor as a quanda Explainer, evaluated by quanda's own metric
    from tda_explorer import AttributionDataset, get_method
    from tda_explorer.integrations.quanda import quanda_explainer

    explainer = quanda_explainer("grad-dot")(model, train)
    test_x, test_y = torch.randn(n_test, 4, generator=gen), test_labels
    explanations = explainer.explain(test_x, test_y)
    direct = get_method("grad-dot", AttributionTask(model)).fit(AttributionDataset(x, train_labels)).attribute(
        AttributionDataset(test_x, test_y)).scores
    m = ClassDetectionMetric(model, train, s=5)
    m.update(explanations, test_targets=test_y)
    compare("explainer_adapter_class_detection", m.compute()["score"],
            ours.class_detection(direct, train_labels, test_y, 5))
    Path(args.json).write_text(json.dumps({"quanda": "0.5.0", "rows": rows}, indent=2))
    worst = max(r["difference"] for r in rows)
    print(f"largest difference {worst:.2e}")
    if worst > 1e-6:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
