"""The task zoo: enough tasks, descriptive names, every axis of the issue covered (checked on the specs as data), and
every task builds and trains to a finite loss on a tiny budget."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from tda_explorer.compute.training.train import TrainConfig, train_model
from tda_explorer.data.noise import confuse_pairs
from tda_explorer.experiments import Scenario
from tda_explorer.experiments.zoo import (
    ZOO,
    BatchNorm2d,
    build_zoo_task,
    make_zoo_model,
    zoo_data,
    zoo_ground_truth,
    zoo_task,
)

NAMES = [t.name for t in ZOO]


def test_the_zoo_has_at_least_twelve_tasks_with_unique_descriptive_names():
    assert len(ZOO) >= 12
    assert len(set(NAMES)) == len(NAMES)
    for t in ZOO:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)+", t.name), t.name
        parts = t.name.split("-")
        assert parts[0] == t.data, t.name  # data first
        assert parts[-1] == t.optimizer, t.name  # optimizer last
        assert t.architecture.split("-")[0] in parts, t.name  # the architecture in between


def test_the_zoo_spans_every_axis():
    data = {t.data for t in ZOO}
    assert {"digits", "wine", "reviews"} <= data
    assert len({d for d in data if d.startswith("synth")}) >= 2  # make_classification at two widths
    assert any(d.startswith("shapes") and 16 <= int(d[6:]) <= 32 for d in data)
    assert {"logreg", "mlp-relu", "mlp-gelu", "mlp-tanh", "cnn-bn", "mlp-dropout", "transformer"} <= {
        t.architecture for t in ZOO}
    assert {"sgd", "sgdm", "adam", "adamw"} <= {t.optimizer for t in ZOO}
    assert {0.0, 1e-4, 1e-2} <= {t.weight_decay for t in ZOO}
    assert {"under-trained", "fitted"} <= {t.regime for t in ZOO}
    batches = [t.batch_size for t in ZOO]
    assert min(b for b in batches if b) == 16 and any(t.full_batch for t in ZOO)
    assert {"none", "uniform10", "pairs"} <= {t.noise for t in ZOO}
    classes = {t.n_classes for t in ZOO}
    assert min(classes) == 2 and max(classes) == 10
    sizes = [t.n_train for t in ZOO if t.data != "wine"]  # wine has 178 examples in all
    assert min(sizes) <= 500 and max(sizes) >= 2000


def test_a_cnn_whose_first_fully_connected_layer_reads_4096_inputs():
    wide = [t for t in ZOO if t.architecture == "cnn-wide"]
    assert wide
    side = int(wide[0].data[len("shapes"):])
    model = make_zoo_model("cnn-wide", side * side, 6)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first.in_features >= 4096


def test_data_is_deterministic_and_noise_is_recorded():
    for name in ("wine-logreg-sgdm", "synth20-logreg-adam", "shapes16-mlp-adam"):
        a, b = zoo_data(zoo_task(name)), zoo_data(zoo_task(name))
        assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.labels, b.train.labels)
        spec = zoo_task(name)
        assert bool(a.flipped.any()) == (spec.noise != "none")
        assert torch.equal(a.flipped, a.train.labels != a.clean_train_labels)


def test_pair_confusions_stay_within_pairs():
    labels = torch.arange(10).repeat(20)
    noisy, flipped = confuse_pairs(labels, 0.2, 10, seed=0)
    assert int(flipped.sum()) == 40
    assert torch.equal(noisy[flipped], labels[flipped] ^ 1)  # 0<->1, 2<->3, ...


def test_batchnorm_uses_exact_statistics_in_evaluation():
    norm = BatchNorm2d(3)
    x = torch.randn(50, 3, 4, 4) * 2 + 1
    norm.collect = True
    norm(x)
    norm.collect = False
    norm.eval()
    out = norm(x)
    assert out.mean((0, 2, 3)).abs().max() < 1e-5
    assert "running_mean" not in norm.state_dict()  # checkpoints are parameters only


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adamw", 0.0)])
def test_train_config_momentum_and_adamw(optimizer, momentum):
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05, weight_decay=1e-2, optimizer=optimizer,
                         momentum=momentum, n_checkpoints=1)
    assert "momentum" in config.to_dict() if momentum else "momentum" not in config.to_dict()
    assert config.loss_weight_decay == (0.0 if optimizer == "adamw" else 1e-2)
    record = train_model(lambda s: make_zoo_model("logreg", 5, 3, seed=s), x, y, config)
    assert all(torch.isfinite(p).all() for p in record.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_task_builds_and_trains_to_a_finite_loss(name):
    exp = build_zoo_task(name, epochs=1)
    assert isinstance(exp, Scenario)
    assert exp.recipe().config.epochs == 1
    with torch.no_grad():
        loss = nn.functional.cross_entropy(exp.record.model(exp.test.inputs), exp.test.labels)
    assert math.isfinite(float(loss))
    assert exp.task() is not None and len(exp.split.flipped) == len(exp.train)


@pytest.mark.slow
def test_ground_truth_is_cached(tmp_path):
    exp = build_zoo_task("wine-logreg-sgdm", epochs=2)
    a = zoo_ground_truth(exp, n_subsets=4, cache_dir=tmp_path)
    b = zoo_ground_truth(exp, n_subsets=4, cache_dir=tmp_path)
    assert torch.equal(a.measurements, b.measurements) and a.masks.shape == (4, 130)
    assert len(list((tmp_path / "zoo").glob("wine-logreg-sgdm-*.pt"))) == 1


def test_the_readme_documents_every_task():
    from pathlib import Path

    from tda_explorer.experiments.zoo import zoo_markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert zoo_markdown_table() in readme, "regenerate the README's zoo table from zoo_markdown_table()"
