"""UnTrac / UnTrac-Inv and group evaluation against leave-group-out retraining."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.valuation.untrac import UnlearnConfig, UnTrac
from tda_explorer.errors import TDAError
from tda_explorer.evaluate.groups import class_pearson, dirichlet_groups, evaluate_groups


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)
    model = torch.nn.Linear(5, 3).double()
    return AttributionDataset(x, y, name="tiny"), AttributionDataset(x[:9], y[:9], name="tiny-test"), model


def test_one_small_sgd_step_of_untrac_is_grad_dot_with_the_group_mean(tiny):
    train, test, model = tiny
    task = AttributionTask(model)
    groups = [list(range(0, 20)), list(range(20, 60))]
    lr = 1e-5
    untrac = UnTrac(task, UnlearnConfig(lr=lr, optimizer="sgd", batch_size=60, epochs=1))
    effects = untrac.group_effects(train, groups, test)
    names = task.tracked_names()
    g_train = per_sample_gradients(model, names, train.inputs, train.labels, task.train_loss)
    g_test = per_sample_gradients(model, names, test.inputs, test.labels, task.test_measurement)
    expected = torch.stack([lr * g_test @ g_train[g].mean(0) for g in groups])  # first order of one ascent step
    torch.testing.assert_close(effects, expected, rtol=1e-3, atol=1e-12)
    before = model.weight.detach().clone()
    untrac.inverse_group_effects(train, groups, test)
    assert torch.equal(model.weight, before)  # ascent runs on a copy


def test_dirichlet_groups_partition_the_training_set(tiny):
    train, _, _ = tiny
    groups = dirichlet_groups(train, 4, seed=1)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == sorted(train.ids) and all(groups)
    mixtures = torch.stack([torch.bincount(train.labels[train.positions(g)], minlength=3).double() / len(g)
                            for g in groups])
    assert mixtures.std(0).max() > 0.1  # the groups lean on different classes
    with pytest.raises(TDAError, match="groups must be between 2"):
        dirichlet_groups(train, 1)


def test_class_pearson_reads_each_class_as_a_test_set(tiny):
    _, test, _ = tiny
    actual = torch.randn(5, len(test), generator=torch.Generator().manual_seed(2))
    assert class_pearson(actual, actual, test)[0] == pytest.approx(1.0)
    assert class_pearson(-actual, actual, test)[0] == pytest.approx(-1.0)


def test_untrac_tracks_leave_group_out_retraining_on_digits_lr(tmp_path):
    from tda_explorer.experiments import build_experiment

    exp = build_experiment("lr", n_train=300, n_test=100, epochs=100)
    result = evaluate_groups(exp, "untrac", 6, seeds=2, cache_dir=tmp_path)
    assert result["group_pearson"] > 0.6 and sum(result["group_sizes"]) == 300
    assert evaluate_groups(exp, "if-explicit", 6, seeds=2, cache_dir=tmp_path)["group_pearson"] > 0.8


def test_cli_asks_for_groups():
    from tda_explorer.cli import main

    assert main(["evaluate", "--model", "lr", "--method", "untrac"]) == 2


def test_given_groups_must_partition_the_training_set(tmp_path):
    from tda_explorer.experiments import build_experiment

    exp = build_experiment("lr", n_train=60, n_test=20, epochs=5)
    ids = exp.split.train.ids
    with pytest.raises(TDAError, match="must partition the training set.*more than one group: \\[5, 6, 7, 8, 9\\]"):
        evaluate_groups(exp, "untrac", groups=[ids[:10], ids[5:]], cache_dir=tmp_path)
    with pytest.raises(TDAError, match="10 ids in no group"):
        evaluate_groups(exp, "untrac", groups=[ids[:25], ids[25:50]], cache_dir=tmp_path)
