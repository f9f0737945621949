"""A plan before long work: estimates measured on a few batches track the real run, and chunks fit max_memory."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer._validation import TDAError
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.methods.plan import fitted_bytes


def _data(n: int, n_test: int = 40):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + n_test, 20, generator=gen)
    y = (x[:, :3].sum(1) > 0).long()
    return AttributionDataset(x[:n], y[:n], name=f"plan-train-{n}"), AttributionDataset(x[n:], y[n:], name="plan-test")


@pytest.fixture
def task():
    torch.manual_seed(0)
    return AttributionTask(nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2)))


# grad-dot keeps features linear in n; TRAK solves in the dual below k examples and in the primal above, so a plan
# measured below k over-estimates (within a small factor), never under-estimates.
@pytest.mark.parametrize("method,options,factor", [("grad-dot", {}, 1.05), ("trak", {"projection_dim": 64}, 3.0)])
def test_plan_memory_is_what_the_fit_keeps(task, method, options, factor):
    train, test = _data(1200)
    attributor = get_method(method, task, **options)
    plan = attributor.plan(train, test)
    attributor.fit(train)
    attributor.attribute(test)
    assert plan.n_train == 1200 and plan.n_test == 40 and plan.measured_on == (32, 96, 8)
    kept = fitted_bytes(attributor)
    assert kept / 1.05 <= plan.fitted_bytes <= kept * factor
    assert plan.scores_bytes == 4 * 1200 * 40
    assert "estimated from runs on 32 and 96 training and 8 test examples" in str(plan)


def test_plan_time_extrapolates_a_fit_linear_in_n_and_scores_linear_in_pairs_exactly(task, monkeypatch):
    """On a clock that charges a known cost (fit: 0.5 s + 10 ms per training example; attribute: 0.1 ms per pair), the
    plan's time from its two small runs is that cost at the full size: the extrapolation, without timing a real run."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    attributor = get_method("grad-dot", task)
    cls = type(attributor)
    fit, attribute = cls.fit, cls.attribute

    def charged_fit(self, train, *args, **kwargs):
        clock[0] += 0.5 + 0.01 * len(train)
        return fit(self, train, *args, **kwargs)

    def charged_attribute(self, test, *args, **kwargs):
        clock[0] += 1e-4 * len(self.train_) * len(test)
        return attribute(self, test, *args, **kwargs)

    monkeypatch.setattr(cls, "fit", charged_fit)
    monkeypatch.setattr(cls, "attribute", charged_attribute)
    train, test = _data(1200)
    plan = attributor.plan(train, test)
    assert plan.seconds == pytest.approx(0.5 + 0.01 * 1200 + 1e-4 * 1200 * 40)


def test_gradient_chunks_fit_max_memory(task):
    train, test = _data(500)
    n_params = sum(p.numel() for p in task.model.parameters())
    plan = get_method("grad-dot", task, max_memory=100 * 4 * n_params).plan(train, test)
    assert plan.chunk_rows == 100 and plan.chunk_bytes <= 100 * 4 * n_params
    assert plan.peak_bytes == plan.fitted_bytes + plan.scores_bytes + plan.chunk_bytes


def test_plan_refuses_what_is_not_a_dataset(task):
    with pytest.raises(TDAError, match="train must be an AttributionDataset"):
        get_method("grad-dot", task).plan(torch.zeros(3, 20), _data(10)[1])


def test_the_compute_bar_plans_before_it_computes(digits_experiment, tmp_path):
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("tracin")
    bar = Explorer(session).compute_bar
    seen = []
    job = bar.start("grad-cos")
    job.join(120)
    assert job.state == "done" and [label for label, _ in job.stages] == ["planning grad-cos", "computing grad-cos"]
    assert bar.plan_ is not None and bar.plan_.n_train == len(session.train)
    assert "planned: grad-cos on" in bar.message.value
    again = bar.start("grad-cos")  # cached now: nothing to plan
    again.join(60)
    seen = [label for label, _ in again.stages]
    assert seen == ["computing grad-cos"]
