"""The project's own training records what its optimizer was, so TracIn never reads an Adam run as SGD."""

from dataclasses import replace

import torch
from torch import nn

from tda_explorer.compute.methods import get_method
from tda_explorer.compute.training.train import EnsembleTrainer, TrainConfig, train_model
from tda_explorer.experiments import build_experiment


def _factory(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_adam_checkpoints_carry_the_moments_a_plain_adam_loop_has():
    x, y = _data()
    config = TrainConfig(epochs=4, batch_size=48, lr=0.05, weight_decay=0.0, optimizer="adam", n_checkpoints=2)
    record = train_model(_factory, x, y, config)
    model = _factory(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(4):  # one full batch per epoch: the batch order cannot differ
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    last = record.checkpoints[-1]
    assert last.optimizer == "adam" and last.optimizer_state["step"] == 4
    for name, p in model.named_parameters():
        assert torch.allclose(last.optimizer_state["exp_avg"][name], opt.state[p]["exp_avg"], atol=1e-6)
        assert torch.allclose(last.optimizer_state["exp_avg_sq"][name], opt.state[p]["exp_avg_sq"], atol=1e-8)
        assert torch.allclose(last.state_dict[name], p.detach(), atol=1e-5)


def test_sgd_checkpoints_say_sgd_and_carry_no_moments():
    x, y = _data()
    record = train_model(_factory, x, y, TrainConfig(epochs=2, batch_size=16, lr=0.1, optimizer="sgd",
                                                     n_checkpoints=2))
    assert all(c.optimizer == "sgd" and c.optimizer_state is None for c in record.checkpoints)
    trainer = EnsembleTrainer(_factory, x, y, torch.arange(48).unsqueeze(0), TrainConfig(optimizer="sgd"))
    assert trainer.optimizer_state(0) is None


def test_tracin_on_a_built_in_adam_recipe_uses_the_adam_direction():
    exp = build_experiment("lr", n_train=120, n_test=10, epochs=20)
    assert exp.config.optimizer == "adam"
    adam = get_method("tracin", exp.task()).fit(exp.split.train)
    assert adam.config()["training_direction"].startswith("adam-preconditioned")
    sgd_view = [replace(c, optimizer="sgd", optimizer_state=None) for c in exp.record.checkpoints]
    plain = get_method("tracin", exp.task(), checkpoints=[c.state_dict for c in sgd_view],
                       learning_rates=[c.learning_rate for c in sgd_view]).fit(exp.split.train)
    assert not torch.allclose(adam.attribute(exp.split.test).scores, plain.attribute(exp.split.test).scores)


def test_a_replayed_adam_run_says_adam_so_tracin_refuses_rather_than_read_it_as_sgd():
    import pytest

    from tda_explorer._validation import TDAError
    from tda_explorer.compute.training.train import replay_record

    x, y = _data()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, optimizer="adam", n_checkpoints=2)
    record = replay_record(_factory, x, y, config)
    assert [c.optimizer for c in record.checkpoints] == ["adam", "adam"]
    sgd = replay_record(_factory, x, y, replace(config, optimizer="sgd"))
    assert all(c.optimizer == "sgd" for c in sgd.checkpoints)
    from tda_explorer import AttributionDataset, AttributionTask

    with pytest.raises(TDAError, match="moments"):
        get_method("tracin", AttributionTask(record.model, checkpoints=record.checkpoints)).fit(
            AttributionDataset(x, y))
