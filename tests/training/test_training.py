import pytest
import torch

from tda_explorer import TDAError
from tda_explorer.compute import TrainConfig, make_model, train_ensemble, train_model
from tda_explorer.experiments import build_experiment
from tda_explorer.retraining import subset_ground_truth


def factory(seed):
    return make_model("mlp", 4, 3, hidden=8, seed=seed)


def test_ensemble_row_equals_single_training_with_same_seed(tiny_data):
    train, _ = tiny_data
    x, y = train.inputs.float(), train.labels
    config = TrainConfig(epochs=5, batch_size=8, lr=1e-2, n_checkpoints=2, seed=3)
    record = train_model(factory, x, y, config)
    stacked = train_ensemble(factory, x, y, torch.arange(len(y)).unsqueeze(0), config, seeds=[3])
    for name, value in record.model.state_dict().items():
        torch.testing.assert_close(value, stacked[name][0])
    assert len(record.checkpoints) == 2
    torch.testing.assert_close(record.checkpoints[-1].state_dict["0.weight"], record.model.state_dict()["0.weight"])
    assert record.checkpoints[0].step < record.checkpoints[1].step


def test_training_lowers_the_loss(tiny_data):
    train, _ = tiny_data
    x, y = train.inputs.float(), train.labels
    config = TrainConfig(epochs=50, batch_size=20, lr=5e-2, n_checkpoints=1)
    before = torch.nn.functional.cross_entropy(factory(0)(x), y)
    after = torch.nn.functional.cross_entropy(train_model(factory, x, y, config).model(x), y)
    assert after < 0.5 * before


def test_lock_stepped_adam_rows_equal_plain_torch_optim_loops(tiny_data):
    """Each of K lock-stepped models takes the step a plain ``torch.optim.Adam`` loop on that one model takes, and
    the returned parameters carry no gradients."""
    from tda_explorer.compute.training.train import train_weighted

    train, _ = tiny_data
    x, y = train.inputs, train.labels
    config = TrainConfig(epochs=4, batch_size=6, lr=3e-2, weight_decay=1e-2, optimizer="adam")
    factory64 = lambda s: factory(s).double()  # noqa: E731
    params = train_weighted(factory64, x, y, torch.ones(2, len(y), dtype=torch.float64), config, seeds=[5, 9])
    assert all(p.grad is None for p in params.values())
    for row, seed in enumerate((5, 9)):
        model = factory64(seed)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
        for _ in range(config.epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), config.batch_size):
                idx = order[start : start + config.batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum") / config.batch_size
                (loss + 0.5 * config.weight_decay * sum((p**2).sum() for p in model.parameters())).backward()
                opt.step()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(params[name][row], value)


def test_bad_config_names_argument():
    with pytest.raises(TDAError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(TDAError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)


def test_ground_truth_is_cached_and_keyed_by_recipe(tmp_path):
    exp = build_experiment("lr", n_train=60, n_test=10, epochs=20)
    truth = subset_ground_truth(exp, n_subsets=6, cache_dir=tmp_path)
    assert truth.masks.shape == (6, 60) and truth.measurements.shape == (6, 10)
    assert (truth.masks.sum(1) == 30).all()
    files = list((tmp_path / "ground_truth").glob("*.pt"))
    assert len(files) == 1
    again = subset_ground_truth(exp, n_subsets=6, cache_dir=tmp_path)
    assert torch.equal(again.measurements, truth.measurements)
    other = build_experiment("lr", n_train=60, n_test=10, epochs=21)
    subset_ground_truth(other, n_subsets=6, cache_dir=tmp_path)
    assert len(list((tmp_path / "ground_truth").glob("*.pt"))) == 2


def dropout_factory(seed):
    return make_model("mlp-dropout", 4, 3, hidden=8, seed=seed)


def test_dropout_training_is_seeded_per_model_and_leaves_the_global_rng(tiny_data):
    """A model with Dropout trains with it (masks from a stream seeded by the run), reproducibly, without touching
    the caller's RNG; lock-stepped members draw their own masks, so two rows with the same seed and data still
    drift apart only through their masks when the seeds differ — and a single run equals its ensemble row."""
    train, _ = tiny_data
    x, y = train.inputs.float(), train.labels
    config = TrainConfig(epochs=3, batch_size=8, lr=5e-2, n_checkpoints=1, seed=2)
    rows = torch.arange(len(y)).unsqueeze(0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train_ensemble(dropout_factory, x, y, rows, config, seeds=[2])
    assert torch.equal(torch.get_rng_state(), before)
    b = train_ensemble(dropout_factory, x, y, rows, config, seeds=[2])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # without its Dropout (the same weights: the factories share the seed) the run ends elsewhere
    plain = train_ensemble(lambda s: make_model("mlp", 4, 3, hidden=8, seed=s), x, y, rows, config, seeds=[2])
    assert not torch.allclose(a["3.weight"], plain["2.weight"])
    # two members with the same seed in one lock-stepped run: same initialisation, different masks
    pair = train_ensemble(dropout_factory, x, y, rows.expand(2, -1), config, seeds=[2, 2])
    assert not torch.allclose(pair["3.weight"][0], pair["3.weight"][1])
    record = train_model(dropout_factory, x, y, config)
    assert not record.model.training  # attributed in eval mode: Dropout off
    torch.testing.assert_close(record.model.state_dict()["3.weight"], a["3.weight"][0], rtol=0, atol=0)
