"""The retraining engine against hand-written training loops."""

from pathlib import Path

import pytest
import torch
from torch import nn

from tda_explorer import TDAError
from tda_explorer.compute.training.train import TrainConfig, train_weighted
from tda_explorer.data.digits import load_digits_split
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.retrainer import Retrainer


def _by_hand(x, y, config, seed, dropped=(), n_classes=None):
    """Plain SGD on the seed's batch order, each batch's summed loss of kept examples divided by the batch size."""
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], n_classes or int(y.max()) + 1).double()
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    for _ in range(config.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), config.batch_size):
            idx = [int(i) for i in order[start : start + config.batch_size] if int(i) not in dropped]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum") / config.batch_size
            loss = loss + 0.5 * config.weight_decay * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            opt.step()
    return model


def test_weighted_training_drops_exactly_the_removed_terms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (24,), generator=gen)
    config = TrainConfig(epochs=3, batch_size=5, lr=0.3, weight_decay=0.01, optimizer="sgd")
    factory = lambda s: (torch.manual_seed(s), nn.Linear(4, 3).double())[1]  # noqa: E731
    weights = torch.ones(2, 24, dtype=torch.float64)
    weights[1, [3, 11]] = 0
    params = train_weighted(factory, x, y, weights, config, seeds=[7, 7])
    for row, dropped in ((0, ()), (1, (3, 11))):
        want = _by_hand(x, y, config, 7, dropped, n_classes=3)
        torch.testing.assert_close(params["weight"][row], want.weight.detach())
        torch.testing.assert_close(params["bias"][row], want.bias.detach())
    with pytest.raises(TDAError, match="seeds must have one entry per row of weights"):
        train_weighted(factory, x, y, weights, config, seeds=[1])


@pytest.fixture(scope="module")
def small_experiment():
    split = load_digits_split(n_train=120, n_test=30, seed=0)
    config = TrainConfig(epochs=8, batch_size=32, lr=0.1, weight_decay=1e-2, optimizer="sgd")
    return Experiment(split, "lr", config, record=None)  # type: ignore[arg-type]


def test_retrainer_pairs_each_removal_with_its_full_model_and_caches(small_experiment, tmp_path):
    exp = small_experiment
    ids = exp.split.train.ids
    retrainer = Retrainer(exp, seeds=[0, 1], cache_dir=tmp_path)
    effect = retrainer.remove([[ids[0]], [ids[5], ids[9]], list(ids[:60])])
    assert effect.delta.shape == (3, 30)
    # independent: per seed, a full model and a model without the group, both trained by hand
    x, y = exp.split.train.inputs.double(), exp.split.train.labels
    xt, yt = exp.split.test.inputs.double(), exp.split.test.labels
    config = exp.config
    want = torch.zeros(30, dtype=torch.float64)
    for seed in (0, 1):
        full, without = _by_hand(x, y, config, seed, n_classes=10), _by_hand(x, y, config, seed, (5, 9), 10)
        with torch.no_grad():
            want += (nn.functional.cross_entropy(without(xt), yt, reduction="none")
                     - nn.functional.cross_entropy(full(xt), yt, reduction="none")) / 2
    torch.testing.assert_close(effect.delta[1], want, rtol=1e-3, atol=1e-5)
    assert effect.delta[2].abs().mean() > effect.delta[0].abs().mean()  # half the data moves more than one example
    frame = effect.to_frame()
    assert list(frame.columns) == ["group", "group_size", "test_id", "delta"] and len(frame) == 90
    again = Retrainer(exp, seeds=[0, 1], cache_dir=tmp_path).remove([[ids[0]], [ids[5], ids[9]], list(ids[:60])])
    assert again.seconds == effect.seconds and torch.equal(again.delta, effect.delta)  # read from the cache
    half = retrainer.remove([[ids[5], ids[9]]], fractions=[[0.5, 0.5]])
    assert 0 < float(half.delta[0].norm()) < float(effect.delta[1].norm())


def test_retrainer_refuses_bad_removals(small_experiment):
    retrainer = Retrainer(small_experiment)
    ids = small_experiment.split.train.ids
    with pytest.raises(TDAError, match=r"groups\[1\]: \['nope'\] not in dataset"):
        retrainer.remove([[ids[0]], ["nope"]])
    with pytest.raises(TDAError, match=r"groups\[0\] removes the whole training set \(120 examples\)"):
        retrainer.remove([list(ids)])
    with pytest.raises(TDAError, match="groups must be a non-empty list"):
        retrainer.remove([])
    with pytest.raises(TDAError, match=r"fractions\[0\] must be in \[0, 1\]"):
        retrainer.remove([[ids[0]]], fractions=[[1.5]])


@pytest.mark.slow  # trains models
def test_warm_starts_on_a_convex_model_and_worker_processes_give_the_same_answer():
    from dataclasses import replace

    split = load_digits_split(n_train=100, n_test=20, seed=3)
    config = TrainConfig(epochs=400, batch_size=100, lr=0.5, weight_decay=5e-2, optimizer="sgd")  # converges
    exp = Experiment(split, "lr", config, record=None)  # type: ignore[arg-type]
    ids = split.train.ids
    groups = [[ids[0]], [ids[1], ids[2], ids[3]], list(ids[10:40])]
    cold = Retrainer(exp).remove(groups).delta
    # a warm start begins next to the new optimum, so it needs fewer epochs to the same tolerance (the rate is
    # set by the weight decay, the head start by how little a removal moves the optimum)
    warm = Retrainer(exp, warm_start_epochs=250).remove(groups).delta
    torch.testing.assert_close(warm, cold, rtol=1e-2, atol=1e-4)
    parallel = Retrainer(exp, chunk=1, processes=2).remove(groups).delta
    torch.testing.assert_close(parallel, cold, rtol=1e-4, atol=1e-6)  # float32 sums in another order
    mlp = Experiment(split, "mlp", replace(config, epochs=2), record=None)  # type: ignore[arg-type]
    with pytest.raises(TDAError, match="warm_start_epochs is only valid for convex models"):
        Retrainer(mlp, warm_start_epochs=10)


def test_training_on_a_subset_is_removing_its_complement(small_experiment):
    ids = small_experiment.split.train.ids
    retrainer = Retrainer(small_experiment)
    on = retrainer.train_on([list(ids[:100])])
    torch.testing.assert_close(on.delta, retrainer.remove([list(ids[100:])]).delta)
    with pytest.raises(TDAError, match="removes the whole training set"):
        retrainer.train_on([[]])


def test_the_default_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    from tda_explorer.retraining.ground_truth import default_cache_dir

    monkeypatch.delenv("TDA_EXPLORER_CACHE", raising=False)
    assert default_cache_dir() == Path(".tda_cache")
    monkeypatch.setenv("TDA_EXPLORER_CACHE", str(tmp_path / "truths"))
    assert default_cache_dir() == tmp_path / "truths"
