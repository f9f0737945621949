"""Synset leave-one-out against actual retraining on a small convex task."""

import pytest
import torch
from scipy.stats import spearmanr

from tda_explorer import TDAError, get_method
from tda_explorer.compute.methods.synset import Trajectory
from tda_explorer.compute.training.train import TrainConfig, train_model
from tda_explorer.data.digits import load_digits_split
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.retrainer import Retrainer


@pytest.fixture(scope="module")
def convex():
    split = load_digits_split(n_train=200, n_test=40, seed=1)
    config = TrainConfig(epochs=15, batch_size=40, lr=0.2, weight_decay=1e-2, optimizer="sgd", n_checkpoints=5)
    exp = Experiment(split, "lr", config, record=None)  # type: ignore[arg-type]
    exp.record = train_model(exp.factory, split.train.inputs, split.train.labels, config)
    method = get_method("synset-loo", exp.task(), trajectory=exp.trajectory(), per_class=3, distill_steps=60)
    return exp, method.fit(split.train)


def test_group_removals_track_retraining(convex):
    exp, method = convex
    ids, cluster_of = exp.split.train.ids, method.synset_.cluster_of
    assert method.synset_.matching_cosine > 0.9
    groups = [[ids[i] for i in torch.nonzero(cluster_of == k).flatten().tolist()]
              for k in range(len(cluster_of.unique()))]
    gen = torch.Generator().manual_seed(0)
    groups += [[ids[i] for i in torch.randperm(200, generator=gen)[:30].tolist()] for _ in range(6)]
    predicted = method.estimate_removals(groups, exp.split.test).mean(1)
    actual = Retrainer(exp).remove(groups).delta.mean(1)
    assert spearmanr(predicted, actual).statistic > 0.8
    one = method.estimate_removal(groups[0], exp.split.test)
    torch.testing.assert_close(one, method.estimate_removals(groups[:1], exp.split.test)[0])


def test_scores_self_influence_and_refusals(convex):
    exp, method = convex
    train = exp.split.train
    full = method.attribute(train).scores
    torch.testing.assert_close(method.self_influence(), full.diagonal(), rtol=1e-4, atol=1e-6)
    plain = get_method("synset-loo", exp.task(), trajectory=exp.trajectory(), per_class=3, distill_steps=60,
                       within_cluster=None).fit(train)
    scores = plain.attribute(exp.split.test).scores
    cluster_of = plain.synset_.cluster_of
    first = scores[:, cluster_of == 0]
    assert torch.equal(first, first[:, :1].expand_as(first))  # without the first-order spread: one score per cluster
    with pytest.raises(TDAError, match=r"groups\[0\]: \['nope'\] not in dataset"):
        method.estimate_removals([["nope"]], exp.split.test)
    with pytest.raises(TDAError, match="removes the whole training set"):
        method.estimate_removal(list(train.ids), exp.split.test)
    with pytest.raises(TDAError, match="needs the recorded training trajectory: pass trajectory=Trajectory"):
        get_method("synset-loo", exp.task())
    with pytest.raises(TDAError, match="within_cluster must be one of .*'if-ekfac'.*, got 'synset-loo'"):
        get_method("synset-loo", exp.task(), trajectory=exp.trajectory(), within_cluster="synset-loo")
    empty = Trajectory(exp.trajectory().init_state, exp.config, [])
    with pytest.raises(TDAError, match="the trajectory has no checkpoints: record some"):
        get_method("synset-loo", exp.task(), trajectory=empty).fit(train)
