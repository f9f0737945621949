"""LoRA adapters, dropout insertion and the LoRA ensemble: exact at initialisation, validated, averaged."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.training.lora import adapter_names, add_dropout, add_lora, train_adapters
from tda_explorer.errors import TDAError


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))


def test_adapters_start_as_the_base_model_and_only_they_train():
    model, x = _mlp(), torch.randn(20, 6)
    adapted = add_lora(model, rank=2, seed=1)
    torch.testing.assert_close(adapted(x), model(x))  # B = 0: the adapted model starts equal to the base
    assert adapter_names(adapted) == ["0.lora_a", "0.lora_b", "2.lora_a", "2.lora_b"]
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    train_adapters(adapted, x, torch.randint(0, 3, (20,)), epochs=3, lr=0.05, batch_size=5, seed=0,
                   loss_fn=cross_entropy)
    after = adapted.state_dict()
    assert torch.equal(after["0.base.weight"], before["0.base.weight"])  # frozen
    assert not torch.equal(after["0.lora_b"], before["0.lora_b"])
    w = after["0.base.weight"] + (after["0.lora_b"] @ after["0.lora_a"]) * 0.5  # alpha / rank = 1 / 2
    torch.testing.assert_close(adapted[0](x), x @ w.T + after["0.base.bias"])


def test_lora_rank_and_dropout_refusals():
    with pytest.raises(TDAError, match="rank must be an integer in 1..3 for '2' \\(12 → 3\\), got 4"):
        add_lora(_mlp(), rank=4)
    with pytest.raises(TDAError, match="rank must be an integer in 1..6"):
        add_lora(_mlp(), rank=0)
    with pytest.raises(TDAError, match="p must be in \\(0, 1\\)"):
        add_dropout(_mlp(), p=1.5)
    dropped = add_dropout(_mlp(), 0.3).eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(dropped(x), _mlp()(x))  # eval mode: the same model
    assert any(isinstance(m, torch.nn.Dropout) for m in dropped)


def test_lora_ensemble_averages_its_members():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    train, test = AttributionDataset(x, y), AttributionDataset(x[:5], y[:5])
    task = AttributionTask(_mlp())
    ensemble = get_method("lora-ensemble", task, members=3, rank=2, epochs=2, inner="grad-dot").fit(train)
    members = torch.stack([a.attribute(test).scores for a in ensemble.attributors_])
    torch.testing.assert_close(ensemble.attribute(test).scores, members.mean(0))
    assert all(a.task.tracked_names() == adapter_names(a.task.model) for a in ensemble.attributors_)
    assert ensemble.stored_bytes_ > 0 and ensemble.training_seconds_ > 0
    with pytest.raises(TDAError, match="rank must be an integer"):
        get_method("lora-ensemble", task, rank=7)
    with pytest.raises(TDAError, match="inner must be one of .*'trak'.*, got 'lora-ensemble'"):
        get_method("lora-ensemble", task, inner="lora-ensemble")


def test_the_default_rank_is_capped_at_each_layer_s_narrower_side():
    adapted = add_lora(_mlp(), rank=None)  # 6 → 12 takes 4, 12 → 3 takes 3 (a chosen rank=4 is refused above)
    assert adapted[0].lora_a.shape == (4, 6) and adapted[2].lora_a.shape == (3, 12)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    ensemble = get_method("lora-ensemble", AttributionTask(_mlp()), members=1, epochs=1, inner="grad-dot")
    assert torch.isfinite(ensemble.fit(AttributionDataset(x[:20], y[:20])).attribute(
        AttributionDataset(x[20:], y[20:])).scores).all()
