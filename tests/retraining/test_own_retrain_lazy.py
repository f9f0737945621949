"""What-if for your own model on data as it is: a test set read lazily from a torch Dataset with dict inputs, and a
model that returns a dict, measured by the retrained models as a hand loop measures them."""

from __future__ import annotations

import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.session import Session


class DictModel(nn.Module):
    """A linear classifier called as ``model(features=...)`` that returns ``{"logits": ...}``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> dict:
        return {"logits": self.linear(features)}


class DictItems(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.x[i], "labels": self.y[i]}


def test_what_if_removed_measures_lazy_dict_test_data_as_a_hand_loop(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen)
    y = (x[:, :3].argmax(1)).long()
    y[:3] = (y[:3] + 1) % 3  # a few wrong labels, so removals change something
    train = AttributionDataset.from_torch(DictItems(x[:30], y[:30]), name="lazy-train")
    test = AttributionDataset.from_torch(DictItems(x[30:], y[30:]), batch_size=7, name="lazy-test")  # uneven batches

    def retrain(train_ids: list, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = DictModel()
        rows = torch.tensor(train_ids)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(40):
            opt.zero_grad()
            nn.functional.cross_entropy(model(features=x[rows])["logits"], y[rows]).backward()
            opt.step()
        return model

    session = Session(train, test, AttributionTask(retrain(list(range(30)), 0)), tmp_path, retrain=retrain)
    removed = [0, 1, 2]
    effect = session.what_if_removed(removed)

    x_test, y_test = x[30:], y[30:]
    deltas, accuracy_deltas = [], []
    for seed in (0, 1):
        full, without = retrain(list(range(30)), seed), retrain(list(range(3, 30)), seed)
        with torch.no_grad():
            out_full, out_without = full(features=x_test)["logits"], without(features=x_test)["logits"]
        loss = lambda out: nn.functional.cross_entropy(out, y_test, reduction="none").double()
        deltas.append(loss(out_without) - loss(out_full))
        accuracy = lambda out: (out.argmax(1) == y_test).double().mean()
        accuracy_deltas.append(accuracy(out_without) - accuracy(out_full))
    assert torch.allclose(effect.delta[0], torch.stack(deltas).mean(0), atol=1e-6)
    assert float(effect.accuracy_delta[0]) == float(torch.stack(accuracy_deltas).mean())
    assert float(effect.delta[0].abs().max()) > 0
