"""SOURCE against its closed forms: one segment with an endless step is EK-FAC influence; identical segments
compose into one."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.errors import TDAError


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (80,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).double()
    return AttributionDataset(x, y), AttributionDataset(x[:7], y[:7]), model


def _task(model, checkpoints, weight_decay=1e-2):
    return AttributionTask(model, checkpoints=checkpoints, weight_decay=weight_decay)


def test_one_segment_with_an_endless_step_is_ekfac_influence(setup):
    train, test, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = _task(model, [Checkpoint(state, learning_rate=1e9, step=10)])
    source = get_method("source", task).fit(train).attribute(test).scores
    # SOURCE's factors sample one label (fisher="true", its default): the same Fisher for EK-FAC
    ekfac = get_method("if-ekfac", task, damping=0.0, weight_decay_term=True, fisher="true")
    ekfac = ekfac.fit(train).attribute(test).scores
    torch.testing.assert_close(source, ekfac, rtol=1e-4, atol=1e-7)


def test_identical_segments_compose_into_one(setup):
    train, test, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    two = _task(model, [Checkpoint(state, 0.05, step=40), Checkpoint(state, 0.05, step=100)])
    one = _task(model, [Checkpoint(state, 0.05, step=100)])
    split = get_method("source", two, segments=2).fit(train).attribute(test).scores
    whole = get_method("source", one, segments=1).fit(train).attribute(test).scores
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-8)
    # and a short run (small c) differs from the endless one: the unrolling is not an influence function
    endless = get_method("source", _task(model, [Checkpoint(state, 1e9, step=100)])).fit(train).attribute(test)
    assert not torch.allclose(whole, endless.scores, rtol=1e-2)


def test_source_self_influence_is_its_own_diagonal(setup):
    train, _, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    method = get_method("source", _task(model, [Checkpoint(state, 0.05, step=50)])).fit(train)
    full = method.attribute(train).scores
    torch.testing.assert_close(method.self_influence(), torch.diagonal(full), rtol=1e-5, atol=1e-8)


def test_source_refusals(setup):
    _, _, model = setup
    with pytest.raises(TDAError, match="source needs the task's checkpoints"):
        get_method("source", _task(model, []))
    state = model.state_dict()
    with pytest.raises(TDAError, match="segments=3 exceeds the 1 recorded checkpoints"):
        get_method("source", _task(model, [Checkpoint(state, 0.1, step=5)]), segments=3)


def test_momentum_is_folded_into_the_effective_step(setup):
    train, test, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    slow = _task(model, [Checkpoint(state, 0.01, step=100)])
    fast = _task(model, [Checkpoint(state, 0.1, step=100)])
    with_momentum = get_method("source", slow, momentum=0.9).fit(train).attribute(test).scores
    torch.testing.assert_close(with_momentum, get_method("source", fast).fit(train).attribute(test).scores,
                               rtol=1e-5, atol=1e-8)  # Σ η / (1 − β) = 1 either way
    with pytest.raises(TDAError, match="momentum must be a number in \\[0, 1\\)"):
        get_method("source", slow, momentum=1.0)


def test_an_adam_run_s_checkpoints_are_read_as_sgd_only_with_a_warning(setup):
    train, _, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"checkpoints were taken under adam, whose preconditioned steps"):
        get_method("source", _task(model, [Checkpoint(state, 1e-3, step=10, optimizer="adam")]))


def test_modules_it_cannot_factor_are_skipped_by_default_as_ekfac_skips_them(setup):
    """A LayerNorm between the Linear layers: at the default parameters SOURCE tracks the Linear layers and says
    what it skipped (as EK-FAC does), and then equals EK-FAC on the same layers; parameters chosen with the LayerNorm
    in them are refused by name."""
    from tda_explorer.compute.methods.influence.ekfac import UntrackedModulesWarning

    train, test, _ = setup
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.LayerNorm(10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3)).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task = _task(model, [Checkpoint(state, learning_rate=1e9, step=10)])
    with pytest.warns(UntrackedModulesWarning, match=r"source: .* skips 1 \(LayerNorm\) and tracks 2 layers"):
        source = get_method("source", task)
    assert source.skipped_modules_ == ["1 (LayerNorm)"] and source.task.parameters == ["0", "3"]
    scores = source.fit(train).attribute(test).scores
    with pytest.warns(UntrackedModulesWarning):
        ekfac = get_method("if-ekfac", task, damping=0.0, weight_decay_term=True, fisher="true")
    torch.testing.assert_close(scores, ekfac.fit(train).attribute(test).scores, rtol=1e-4, atol=1e-7)
    with pytest.raises(TDAError, match="LayerNorm"):
        get_method("source", AttributionTask(model, parameters=["0", "1"], checkpoints=task.checkpoints))
