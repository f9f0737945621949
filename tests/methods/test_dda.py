"""Debias-and-denoise attribution: its parts against hand computations, refusals, and the planted backdoor."""

from __future__ import annotations

import copy

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.errors import TDAError


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(1)
    base = torch.nn.Linear(4, 3).double()
    states = []
    for step in (10, 20):
        state = {k: v + 0.1 * step * torch.randn_like(v) for k, v in base.state_dict().items()}
        states.append(Checkpoint(state, 0.1, step))
    tuned = copy.deepcopy(base)
    tuned.load_state_dict(states[-1].state_dict)
    return AttributionDataset(x, y), AttributionDataset(x[:5], y[:5]), base, AttributionTask(tuned, checkpoints=states)


def _z(s):
    c = s - s.mean(1, keepdim=True)
    return c / c.std(1, keepdim=True)


def _scores(state, train, test):
    m = torch.nn.Linear(4, 3).double()
    m.load_state_dict(state)
    return get_method("grad-dot", AttributionTask(m)).fit(train).attribute(test).scores


def test_denoise_and_debias_equal_their_hand_computation(tiny):
    train, test, base, task = tiny
    per_checkpoint = [_scores(c.state_dict, train, test) for c in task.checkpoints]
    denoised = torch.stack([_z(s) for s in per_checkpoint]).mean(0)
    only = get_method("dda", task, inner="grad-dot", debias=False).fit(train).attribute(test).scores
    torch.testing.assert_close(only, denoised.float(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        confidence = torch.exp(-torch.nn.functional.cross_entropy(base(test.inputs), test.labels, reduction="none"))
    expected = _z(denoised) - confidence[:, None] * _z(_scores(base.state_dict(), train, test))
    both = get_method("dda", task, base_model=base, inner="grad-dot").fit(train).attribute(test).scores
    torch.testing.assert_close(both, expected.float(), rtol=1e-4, atol=1e-5)
    unweighted = get_method("dda", task, base_model=base, inner="grad-dot", debias_weight="one").fit(train)
    torch.testing.assert_close(unweighted.attribute(test).scores,
                               (_z(denoised) - _z(_scores(base.state_dict(), train, test))).float(), rtol=1e-4,
                               atol=1e-5)
    assert unweighted.self_influence().shape == (30,)


def test_dda_refusals_name_the_problem(tiny):
    _, _, base, task = tiny
    with pytest.raises(TDAError, match="debias needs base_model="):
        get_method("dda", task)
    wider = torch.nn.Linear(5, 3).double()
    with pytest.raises(TDAError, match="base_model: 'weight' is \\(3, 5\\) in the base model but \\(3, 4\\)"):
        get_method("dda", task, base_model=wider)
    with pytest.raises(TDAError, match="base_model: the base model has '0.weight'"):
        get_method("dda", task, base_model={"0.weight": torch.zeros(3, 4), **base.state_dict()})
    with pytest.raises(TDAError, match="inner must be one of .*'grad-dot'.*, got 'dda'"):
        get_method("dda", task, base_model=base, inner="dda")
    with pytest.raises(TDAError, match="grad-dot has no option 'nope'"):  # refused when built, not at fit
        get_method("dda", task, base_model=base, inner_options={"nope": 1})


@pytest.mark.slow  # trains models
def test_backdoor_dda_beats_plain_and_the_explorer_shows_the_poisoned_images(tmp_path):
    from tda_explorer.experiments.backdoor import build_backdoor, poisoned_auc_and_recall
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    scenario = build_backdoor(seed=0)
    assert scenario.attack_success > 0.9 and int(scenario.poisoned.sum()) == 20
    plain = get_method("grad-dot", scenario.task()).fit(scenario.train).attribute(scenario.queries).scores
    dda = get_method("dda", scenario.task(), base_model=scenario.base_model, inner="grad-dot").fit(scenario.train)
    scores = dda.attribute(scenario.queries).scores
    (auc, recall), (auc_dda, recall_dda) = (poisoned_auc_and_recall(s, scenario.poisoned) for s in (plain, scores))
    assert auc_dda > auc and recall_dda > recall
    session = Session(scenario.train, scenario.queries, scenario.task(), folder=tmp_path)
    session.compute("dda", base_model=scenario.base_model, inner="if-ekfac")
    explorer = Explorer(session, k=5)
    explorer.state.test_id = scenario.queries.ids[0]
    shown = [c.example_id for c in explorer.browser.proponents if c.example_id is not None]
    poisoned_ids = {scenario.train.ids[i] for i in torch.nonzero(scenario.poisoned).flatten().tolist()}
    assert len(shown) == 5 and set(shown) <= poisoned_ids  # a triggered query's top proponents are the poisoned
