"""Proxy models for limited access: distillation against a hand-built loss, refusals, and attribution through a
proxy scored against the target's truth."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionTask
from tda_explorer.compute.models.proxy import build_proxy, distill, query_outputs, smaller_architecture
from tda_explorer.compute.training.train import TrainConfig
from tda_explorer.errors import TDAError


def test_query_outputs_take_logits_or_probabilities_and_refuse_the_wrong_shape():
    x = torch.randn(5, 3)
    logits = torch.randn(5, 4)
    assert torch.equal(query_outputs(lambda _: logits, x, 4), logits)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(torch.softmax(query_outputs(lambda _: probs, x, 4), 1), probs)
    with pytest.raises(TDAError, match="query returned shape \\(5, 3\\); expected .* = \\[5, 4\\]"):
        query_outputs(lambda _: torch.zeros(5, 3), x, 4)
    with pytest.raises(TDAError, match="query must be a callable"):
        query_outputs(None, x, 4)


def test_distillation_follows_the_teacher_beyond_the_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    labels = torch.zeros(200, dtype=torch.long)  # uninformative labels: only the teacher carries signal
    teacher = torch.nn.Linear(5, 3)
    with torch.no_grad():
        logits = 3 * teacher(x)
    torch.manual_seed(1)
    student = torch.nn.Linear(5, 3)
    config = TrainConfig(epochs=60, batch_size=50, lr=0.05, weight_decay=0.0, optimizer="adam", n_checkpoints=3)
    record = distill(student, x, labels, logits, config, beta=1.0)
    with torch.no_grad():
        agree = (student(x).argmax(1) == logits.argmax(1)).float().mean()
    assert agree > 0.9 and len(record.checkpoints) == 3
    with pytest.raises(TDAError, match="beta must be in \\[0, 1\\]"):
        distill(student, x, labels, logits, config, beta=2.0)


def test_every_proxy_kind_builds_and_a_distilled_proxy_keeps_the_targets_lds(digits_experiment, tmp_path):
    from tda_explorer.evaluate.proxies import evaluate_proxy
    from tda_explorer.retraining import subset_ground_truth

    exp = digits_experiment
    train = exp.split.train
    for kind in ("hparams", "distill", "small", "init"):
        record = build_proxy(kind, exp.factory, train.inputs, train.labels, exp.config,
                             query=lambda q: exp.record.model(q))
        assert record.checkpoints and isinstance(record.model, torch.nn.Module)
    assert len(smaller_architecture(exp.factory(0), 0)) == 5
    with pytest.raises(TDAError, match="proxy 'small' knows how to shrink a one-hidden-layer MLP"):
        smaller_architecture(torch.nn.Linear(3, 2), 0)
    truth = subset_ground_truth(exp, n_subsets=30, cache_dir=tmp_path)
    result = evaluate_proxy(exp, "grad-dot", "distill", truth)
    assert result["access"] == "query" and result["target_lds"] > 0.2
    assert result["lds"] >= 0.8 * result["target_lds"] and result["proxy_score_spearman"] > 0.8
    assert "mislabel_auc" in result and "target_mislabel_auc" in result
    with pytest.raises(TDAError, match="access must be one of|unknown access"):
        AttributionTask(exp.record.model, access="partial")


def test_the_compare_panel_names_the_access_level_behind_each_method(digits_experiment, tmp_path):
    from tda_explorer.compute.models.proxy import PROXY_ACCESS
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    exp = digits_experiment
    session = Session.from_experiment(exp, folder=tmp_path)
    session.compute("grad-dot")
    train = exp.split.train
    record = build_proxy("distill", exp.factory, train.inputs, train.labels, exp.config,
                         query=lambda q: exp.record.model(q))
    proxy_task = AttributionTask(record.model, access=PROXY_ACCESS["distill"])
    from tda_explorer import get_method

    attribution = get_method("grad-cos", proxy_task).fit(train).attribute(exp.split.test)
    session.add(attribution)
    explorer = Explorer(session, k=3)
    explorer.compare.a.value, explorer.compare.b.value = "grad-dot", "grad-cos"
    assert "grad-dot: full access" in explorer.compare.summary.value
    assert "grad-cos: query access" in explorer.compare.summary.value


def test_model_randomization_separates_model_dependent_methods(digits_experiment, tmp_path):
    from tda_explorer.evaluate.trust import model_randomization, randomized_task
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    exp = digits_experiment
    task = exp.task()
    random = randomized_task(task, seed=3)
    assert not torch.equal(random.model[0].weight, task.model[0].weight)
    assert torch.equal(random.checkpoints[0].state_dict["0.weight"], random.model[0].weight)
    session = Session.from_experiment(exp, folder=tmp_path)
    session.compute("grad-dot")
    rho = session.check_trust("grad-dot")
    assert -1 <= rho < 0.9  # the scores depend on the trained model
    same = model_randomization(session.attribution("grad-dot").scores, "grad-dot", task, exp.split.train,
                               exp.split.test, seed=3)
    assert same == pytest.approx(rho, abs=0.2)
    session.compute("tracin")
    explorer = Explorer(session, k=3)
    explorer.compare.a.value, explorer.compare.b.value = "grad-dot", "tracin"
    assert f"grad-dot: full access, model-randomization ρ {rho:.2f}" in explorer.compare.summary.value
    assert "tracin: full access<" in explorer.compare.summary.value  # not checked: nothing claimed
