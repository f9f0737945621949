"""LiSSA's iterates in the row space of the GGN's factor: the same series as in parameter space, cheaper."""

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.methods.influence import lissa


def _wide_task() -> AttributionTask:
    """p = 131 parameters over n·C = 60 factor rows: the row space is the cheaper."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return AttributionTask(model, weight_decay=0.05)


def _in_parameter_space(monkeypatch) -> None:
    monkeypatch.setattr(lissa.LiSSAInfluence, "_series", lambda self, b: lissa.ParameterSeries(self.products_, b))


@pytest.mark.parametrize("precision, tolerance", [("float64", 1e-9), ("float32", 1e-4)])
def test_row_space_iterates_are_the_parameter_space_ones(tiny_data, monkeypatch, precision, tolerance):
    train, test = tiny_data
    options = dict(damping=0.1, depth=200, minibatch=5, precision=precision)
    rows = get_method("if-lissa", _wide_task(), **options).fit(train)
    got, got_self = rows.attribute(test).scores.double(), rows.self_influence().double()
    assert rows._gram is not None  # the run took the row space
    with monkeypatch.context() as patch:
        _in_parameter_space(patch)
        params = get_method("if-lissa", _wide_task(), **options).fit(train)
        want, want_self = params.attribute(test).scores.double(), params.self_influence().double()
        assert params._gram is None
    assert float((got - want).norm() / want.norm()) < tolerance
    assert float((got_self - want_self).norm() / want_self.norm()) < tolerance
    assert rows.residual_ == pytest.approx(params.residual_, rel=10 * tolerance)


def test_row_space_norms_are_the_iterates_norms(tiny_data):
    train, test = tiny_data
    method = get_method("if-lissa", _wide_task(), damping=0.1, depth=1, precision="float64").fit(train)
    factor = method.products_.factor()
    gen = torch.Generator().manual_seed(3)
    b = torch.randn(4, factor.shape[1], dtype=torch.float64, generator=gen)
    series = lissa.RowSpaceSeries(factor, factor @ factor.T, b, per_example=3, wd=0.05)
    reference = lissa.ParameterSeries(method.products_, b)
    for _ in range(5):
        rows = torch.randperm(len(train), generator=gen)[:6]
        series.step(rows, 0.9, 0.2)
        reference.step(rows, 0.9, 0.2)
        series.accumulate()
        reference.accumulate()
    torch.testing.assert_close(series.current(), reference.current())
    torch.testing.assert_close(series.norms(), reference.current().norm(dim=1))
    torch.testing.assert_close(series.total(), reference.total())


def test_a_diverging_row_space_run_is_refused(tiny_data):
    train, test = tiny_data
    method = get_method("if-lissa", _wide_task(), damping=1.0, depth=200, scale=0.01).fit(train)
    with pytest.raises(TDAError, match=r"if-lissa diverged: .*when its iterates began to grow .*raise scale"):
        method.attribute(test)
    assert method._gram is not None
