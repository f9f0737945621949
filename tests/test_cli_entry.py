"""The command line on your own model and data: ``--entry module:function`` for evaluate, featurize and score.

A tiny entry module is written into tmp_path (a small MLP trained a few steps on generated data, returned with a
torch Dataset of (x, y) tuples, a (inputs, labels) pair, a retrain function, or dict inputs); what the CLI prints is
compared with the same computation in-process."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.cli import main

ENTRY = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset


    class Pairs(Dataset):
        """(x, y) tuples, read one by one."""

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]


    class Dicts(Dataset):
        """dict items: two input tensors and the label."""

        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"a": self.x[i, :3], "b": self.x[i, 3:], "labels": self.y[i]}


    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

        def forward(self, a, b):
            return {"logits": self.net(torch.cat([a, b], dim=1))}


    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 6, generator=g)
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
        y[:4] = 1 - y[:4]  # four flipped training labels
        return x, y


    def train(x, y, seed, model=None):
        torch.manual_seed(seed)
        model = model or nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        two = isinstance(model, TwoInputs)
        forward = (lambda: model(x[:, :3], x[:, 3:])["logits"]) if two else (lambda: model(x))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(), y).backward()
            opt.step()
        return model


    def build():
        x, y = data()
        return train(x[:60], y[:60], 0), Pairs(x[:60], y[:60]), (x[60:], y[60:])


    def build_with_retrain():
        x, y = data()

        def retrain(train_ids, seed):
            ids = torch.tensor(train_ids)
            return train(x[ids], y[ids], seed)

        return train(x[:60], y[:60], 0), Pairs(x[:60], y[:60]), (x[60:], y[60:]), retrain


    def build_dict():
        x, y = data()
        torch.manual_seed(0)
        model = train(x[:60], y[:60], 0, TwoInputs())
        return {"model": model, "train": Dicts(x[:60], y[:60]), "test": Dicts(x[60:], y[60:]),
                "task": {"output": "logits"}}


    def build_checkpoints():
        import copy

        from tda_explorer.compute.training.train import Checkpoint

        model, train_set, test_set = build()
        checkpoints = [Checkpoint(copy.deepcopy(model.state_dict()), 0.5, 30)]
        return {"model": model, "train": train_set, "test": test_set, "task": {"checkpoints": checkpoints}}


    def returns_two():
        model, train_set, _ = build()
        return model, train_set

    def returns_text():
        return "model"

    def not_a_module():
        _, train_set, test_set = build()
        return {"model": "weights.pt", "train": train_set, "test": test_set}

    def raises():
        raise ValueError("the data folder is missing")

    def bad_train():
        model, _, test_set = build()
        return model, 5, test_set

    def unknown_key():
        model, train_set, test_set = build()
        return {"model": model, "train": train_set, "test": test_set, "labels": None}

    def bad_task():
        model, train_set, test_set = build()
        return {"model": model, "train": train_set, "test": test_set, "task": {"outputs": "logits"}}

    def bad_retrain():
        model, train_set, test_set = build()
        return model, train_set, test_set, "retrain.py"

    NOT_CALLABLE = 3
''')
MODULE = "tda_cli_entry_case"


@pytest.fixture
def entry_dir(tmp_path, monkeypatch):
    """tmp_path holding the entry module, importable in this process and (through PYTHONPATH) in a child."""
    (tmp_path / f"{MODULE}.py").write_text(ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(MODULE, None)
    yield tmp_path
    sys.modules.pop(MODULE, None)


def _module(folder):
    spec = importlib.util.spec_from_file_location("entry_by_hand", folder / f"{MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "tda_explorer", *args], capture_output=True, text=True, env=env,
                          cwd=folder, timeout=300)


@pytest.mark.slow  # trains models (a few milliseconds each, in a child process)
def test_evaluate_on_an_entry_lists_the_methods_topk_and_checks_it_by_retraining(entry_dir):
    out = entry_dir / "result.json"
    done = _run(entry_dir, "evaluate", "--entry", f"{MODULE}:build_with_retrain", "--method", "grad-dot", "--k", "4",
                "--n-test-points", "6", "--n-mislabeled", "5", "--what-if", "2", "--what-if-k", "10", "--json",
                str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result
    assert "tda-explorer: computing grad-dot attributions (6 test × 60 train)" in done.stderr

    # the same in-process, by hand: the lazy torch Dataset and the (inputs, labels) pair
    m = _module(entry_dir)
    model, pairs, (x_test, y_test), retrain = m.build_with_retrain()
    train = AttributionDataset.from_torch(pairs)
    test = AttributionDataset(x_test[:6], y_test[:6])
    task = AttributionTask(model)
    attributor = get_method("grad-dot", task).fit(train)
    attribution = attributor.attribute(test)
    assert result["n_train"] == 60 and result["n_test"] == 6 and result["k"] == 4
    for test_id in range(6):
        got = result["top"][str(test_id)]
        assert got["label"] == int(y_test[test_id])
        for side in ("proponents", "opponents"):
            ids, scores = attribution.topk(test_id, 4, side, signed=True)
            assert [row[0] for row in got[side]] == list(ids)
            torch.testing.assert_close(torch.tensor([row[1] for row in got[side]], dtype=torch.float64),
                                       scores.double(), rtol=1e-5, atol=1e-6)
    self_influence = attributor.self_influence()
    ranking = result["mislabel_ranking"]
    assert [row["train_id"] for row in ranking] == torch.argsort(self_influence, descending=True)[:5].tolist()
    assert {row["train_id"] for row in ranking[:4]} & {0, 1, 2, 3}  # a flipped label among the most surprising

    what_if = result["what_if"]
    assert what_if["test_points"] == 2 and what_if["k"] == 10 and what_if["seeds"] == [0, 1]
    assert what_if["retrains"] == 2 * (1 + 3 * 2)
    first = what_if["points"][0]
    removed = first["remove_proponents"]["train_ids"]
    assert removed == attribution.topk(0, 10, "proponents")[0]
    # the reported change, retrained by hand: without the proponents minus the full model, per paired seed
    keep = [i for i in range(60) if i not in set(removed)]
    loss = lambda net: float(torch.nn.functional.cross_entropy(net(x_test[:1]), y_test[:1]).detach())  # noqa: E731
    by_hand = [loss(retrain(keep, seed)) - loss(retrain(list(range(60)), seed)) for seed in (0, 1)]
    assert first["remove_proponents"]["loss_delta_per_seed"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert first["remove_proponents"]["loss_delta"] == pytest.approx(sum(by_hand) / 2, rel=1e-4, abs=1e-6)
    # the method's top proponents matter more than random examples, and its opponents the other way
    means = what_if["mean_loss_delta"]
    assert means["proponents"] > 0 and means["proponents"] > means["random"] > means["opponents"]


@pytest.mark.slow  # trains models
def test_featurize_and_score_on_an_entry_with_dict_inputs_equal_grad_dot(entry_dir, capsys):
    store = entry_dir / "store"
    assert main(["featurize", "--entry", f"{MODULE}:build_dict", "--out", str(store), "--projection-dim", "16",
                 "--shard-rows", "25"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_shards"] == 3 and summary["rows_written"] == 60
    assert main(["score", "--entry", f"{MODULE}:build_dict", "--store", str(store), "--k", "3",
                 "--n-test-points", "4"]) == 0
    result = json.loads(capsys.readouterr().out)

    m = _module(entry_dir)
    built = m.build_dict()
    train, test = AttributionDataset.from_torch(built["train"]), AttributionDataset.from_torch(built["test"])
    attribution = get_method("grad-dot", AttributionTask(built["model"], output="logits"), projection_dim=16).fit(
        train).attribute(test.subset([0, 1, 2, 3]))
    assert list(result) == ["0", "1", "2", "3"]
    for test_id in range(4):
        for side in ("proponents", "opponents"):
            ids, scores = attribution.topk(test_id, 3, side)
            assert [row[0] for row in result[str(test_id)][side]] == list(ids)
            torch.testing.assert_close(torch.tensor([row[1] for row in result[str(test_id)][side]],
                                                    dtype=torch.float64), scores.double(), rtol=1e-4, atol=1e-5)
    # a store featurised from another model or data is refused
    assert main(["score", "--entry", f"{MODULE}:build", "--store", str(store)]) == 2
    assert "was featurised from another model or data" in capsys.readouterr().err


@pytest.mark.slow  # trains models
def test_checkpoints_from_the_entry_supply_tracin(entry_dir, capsys):
    assert main(["evaluate", "--entry", f"{MODULE}:build_checkpoints", "--method", "tracin", "--k", "3",
                 "--n-test-points", "3", "--n-mislabeled", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    built = _module(entry_dir).build_checkpoints()
    task = AttributionTask(built["model"], checkpoints=built["task"]["checkpoints"])
    x_test, y_test = built["test"]
    attribution = get_method("tracin", task).fit(AttributionDataset.from_torch(built["train"])).attribute(
        AttributionDataset(x_test[:3], y_test[:3]))
    for test_id in range(3):
        assert [row[0] for row in result["top"][str(test_id)]["proponents"]] == list(
            attribution.topk(test_id, 3, signed=True)[0])
    assert result["mislabel_ranking"] is None and result["mislabel_ranking_skipped"] == "--n-mislabeled 0"


BAD_ENTRIES = [
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz' on sys.path"),
    (f"{MODULE}:nothing", f"{MODULE} has no 'nothing'; functions defined there: "),
    (f"{MODULE}", "expected package.module:function or path/to/file.py:function"),
    (f"{MODULE}:NOT_CALLABLE", "NOT_CALLABLE is not callable (int 3); expected a function returning"),
    (f"{MODULE}:raises", "raises() raised ValueError: the data folder is missing (at "),
    (f"{MODULE}:returns_two", "the function must return (model, train, test), (model, train, test, retrain) or a "
                              "dict with keys model, train, test and optionally retrain, task, resources, "
                              "class_names; it returned a tuple of 2"),
    (f"{MODULE}:returns_text", "it returned str"),
    (f"{MODULE}:not_a_module", "model must be a torch.nn.Module (the trained model), got str"),
    (f"{MODULE}:bad_train", "train: expected an AttributionDataset, a map-style torch.utils.data.Dataset"),
    (f"{MODULE}:unknown_key", "the returned dict has unknown keys ['labels']"),
    (f"{MODULE}:bad_task", "task: AttributionTask.__init__() got an unexpected keyword argument 'outputs'"),
    (f"{MODULE}:bad_retrain", "retrain must be a function (train_ids, seed) -> nn.Module, got str"),
    ("missing/file.py:build", "no such file missing/file.py"),
]


@pytest.mark.parametrize("spec, message", BAD_ENTRIES, ids=[spec.split(":")[-1] for spec, _ in BAD_ENTRIES])
def test_a_bad_entry_exits_2_naming_entry_and_what_was_expected(entry_dir, capsys, spec, message):
    assert main(["evaluate", "--entry", spec, "--method", "grad-dot"]) == 2
    err = capsys.readouterr().err
    assert f"tda-explorer: error: --entry {spec}: " in err and message in err, err


def test_an_entry_given_as_a_file_path_loads_and_featurize_names_entry_end_to_end(entry_dir):
    from tda_explorer.cli.entry import load_entry

    entry = load_entry(f"{entry_dir / MODULE}.py:build")
    assert len(entry.train) == 60 and len(entry.test) == 20 and entry.retrain is None
    assert not entry.train.in_memory and entry.test.in_memory  # the Dataset stays lazy, the pair is in memory
    done = _run(entry_dir, "featurize", "--entry", "no_such_module_xyz:build", "--out", "store")
    assert done.returncode == 2 and "error: --entry no_such_module_xyz:build: no module named" in done.stderr
    assert not (entry_dir / "store").exists()


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--entry", "m:f", "--method", "grad-dot", "--model", "lr", "--noise", "0.1"],
     "--entry m:f attributes the model and data your function returns; --model, --noise choose a built-in task"),
    (["evaluate", "--entry", "m:f", "--method", "grad-dot", "--no-lds"], "--no-lds chooses a built-in task"),
    (["featurize", "--entry", "m:f", "--out", "x", "--n-train", "50"], "--n-train chooses a built-in task"),
    (["score", "--entry", "m:f", "--store", "x", "--seed", "1"], "--seed chooses a built-in task"),
    (["evaluate", "--method", "grad-dot", "--k", "5", "--what-if", "2"],
     "--k, --what-if are for evaluate --entry (your own model and data)"),
])
def test_entry_and_the_built_in_task_flags_exclude_each_other(tmp_path, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method, message", [
    ("tracin", "tracin needs checkpoints of the training run"),
    ("lava", "lava is a data values method; evaluate --entry runs attributors"),
    ("dda", "dda needs the base model before fine-tuning"),
])
def test_a_method_needing_what_the_entry_lacks_is_refused_by_name(entry_dir, capsys, method, message):
    assert main(["evaluate", "--entry", f"{MODULE}:build", "--method", method]) == 2
    err = capsys.readouterr().err
    assert f"error: --entry {MODULE}:build: {message}" in err, err
    if method != "lava":
        assert "from the entry" in err.lower()


@pytest.mark.slow  # trains models (the documented example: an MLP on scikit-learn's digits)
def test_the_documented_entry_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    section = page.split("## Your own model and data: --entry", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and "my_tda_entry:build" in section
    (tmp_path / "my_tda_entry.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_tda_entry", None)
    try:
        assert main(["evaluate", "--entry", "my_tda_entry:build", "--method", "grad-dot", "--k", "5",
                     "--n-test-points", "4", "--what-if", "1", "--what-if-k", "50"]) == 0
    finally:
        sys.modules.pop("my_tda_entry", None)
    result = json.loads(capsys.readouterr().out)
    assert result["n_train"] == 1000 and result["n_test"] == 4 and result["test_accuracy"] > 0.5
    assert len(result["top"]["0"]["proponents"]) == 5 and len(result["mislabel_ranking"]) == 20
    point = result["what_if"]["points"][0]
    assert result["what_if"]["retrains"] == 8 and len(point["remove_proponents"]["loss_delta_per_seed"]) == 2
    for group in ("proponents", "opponents", "random"):  # the seed average of the paired per-seed changes
        removal = point[f"remove_{group}"]
        assert removal["loss_delta"] == pytest.approx(sum(removal["loss_delta_per_seed"]) / 2, rel=1e-6, abs=1e-9)
        assert len(removal["train_ids"]) == 50
