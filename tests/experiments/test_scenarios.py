"""Every built-in scenario satisfies the one ``Scenario`` protocol, and a session over it can run exactly the methods
its declared resources allow (needs read from the catalogue, not guessed)."""

from __future__ import annotations

import pytest

from tda_explorer.errors import TDAError
from tda_explorer.experiments import Scenario, build_experiment
from tda_explorer.experiments.backdoor import build_backdoor
from tda_explorer.session import Session


def test_digits_experiment_is_a_scenario_whose_session_runs_recipe_and_trajectory_methods(tmp_path):
    exp = build_experiment("lr", n_train=120, n_test=20, epochs=20)
    assert isinstance(exp, Scenario)
    session = Session.from_experiment(exp, folder=tmp_path)
    lacks = session.method_availability()
    for runnable in ("tracin", "suspicion", "synset-loo", "source", "grad-dot"):
        assert lacks[runnable] == [], (runnable, lacks[runnable])
    # the recipe trains with Adam: what follows SGD steps says so, so it is not offered as runnable
    assert lacks["magic"] == ["magic differentiates SGD steps; this session's recipe trains with 'adam'"]
    assert lacks["dvemb"] == ["dvemb follows plain SGD steps; this session's recipe trains with adam"]
    assert lacks["dda"] and "base model" in lacks["dda"][0]
    assert session.retrainer is not None and session.recipe is exp.config
    with pytest.raises(TDAError, match="dda needs the base model"):
        session.compute("dda")


def test_backdoor_is_a_scenario_that_supplies_its_base_model(tmp_path):
    scenario = build_backdoor(seed=0, base_epochs=2, fine_tune_epochs=5)
    assert isinstance(scenario, Scenario)
    session = Session.from_experiment(scenario, folder=tmp_path)
    lacks = session.method_availability()
    assert lacks["dda"] == [] and lacks["tracin"] == []
    assert lacks["suspicion"] and "training recipe" in lacks["suspicion"][0]  # no recipe: no out-of-fold models
    assert session.retrainer is None
    session.compute("dda", inner="grad-dot")
    assert session.attribution("dda").scores.shape == (len(scenario.queries), len(scenario.train))


def test_a_session_refuses_what_is_not_a_scenario(tmp_path):
    with pytest.raises(TDAError, match="experiment must be a built-in scenario"):
        Session.from_experiment(object(), folder=tmp_path)


def test_availability_says_what_a_method_refuses_on_this_sessions_run_and_data(tmp_path):
    """Beyond the catalogue's needs, read without building a method or calling a resource: a recipe of another
    optimizer than the method follows (dvemb and AdamW), and dict inputs where it needs one tensor; plain SGD over
    tensors leaves them runnable."""
    import torch
    from torch import nn

    from tda_explorer import AttributionDataset, AttributionTask
    from tda_explorer.compute.training.run_recorder import RunRecorder
    from tda_explorer.compute.training.train import TrainConfig

    class Items(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"x": self.x[i], "mask": torch.ones_like(self.x[i]), "labels": self.y[i]}

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.net(x * mask)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    lacks = {}
    for case in ("dicts, AdamW", "tensors, SGD"):
        dicts = case.startswith("dicts")
        if dicts:
            train = AttributionDataset.from_torch(Items(x[:30], y[:30]), name="train")
            test = AttributionDataset.from_torch(Items(x[30:], y[30:]), name="test")
            model, optimizer = Masked(), torch.optim.AdamW
        else:
            train, test = AttributionDataset(x[:30], y[:30], name="train"), AttributionDataset(x[30:], y[30:])
            model, optimizer = nn.Sequential(nn.Linear(4, 3)), torch.optim.SGD
        recorder = RunRecorder(model, optimizer(model.parameters(), lr=0.05), train, batch_size=10)
        for start in range(0, 30, 10):
            rows = torch.arange(start, start + 10)
            recorder.optimizer.zero_grad()
            recorder.loss(model(**recorder.inputs(rows)) if dicts else model(recorder.inputs(rows)), rows).backward()
            recorder.step(rows)
        recorder.finish()
        calls = []
        session = Session(train, test, AttributionTask(model), folder=tmp_path / case.split(", ")[1],
                          resources={"recording": lambda r=recorder, c=calls: c.append(1) or {"recording": r}})
        session.recipe = TrainConfig(optimizer="adamw" if dicts else "sgd")
        lacks[case] = session.method_availability()
        assert calls == []  # no resource was made (a built-in one may train or replay a run)
    dicts, tensors = lacks["dicts, AdamW"], lacks["tensors, SGD"]
    assert dicts["dvemb"] == ["dvemb follows plain SGD steps; this session's recipe trains with adamw"]
    for name in ("magic", "synset-loo"):
        assert dicts[name] == ["needs the inputs as one tensor; this session's training inputs are dicts (a "
                               "tokenizer's)"], name
    assert dicts["tracin"] == [] and dicts["grad-dot"] == []
    assert tensors["magic"] == [] and tensors["dvemb"] == [] and tensors["synset-loo"] == []
