"""The curvature-based influence functions stream a training set read lazily (a torch ``Dataset``) in batches and
equal the same data held in memory; dict inputs (a tokenizer's) go through the same products."""

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tda_explorer import AttributionDataset, AttributionTask, get_method

# LiSSA in float64: its default float32 products sum the streamed batches in another order than the held ones, which
# moves scores at float32's precision; streaming, not precision, is under test here
SOLVERS = [("if-explicit", {}), ("if-explicit", {"curvature": "hessian", "damping": 1.0}), ("if-cg", {}),
           ("if-lissa", {"precision": "float64"}), ("if-arnoldi", {}), ("if-astra", {})]


def _data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize(("method", "options"), SOLVERS, ids=lambda v: str(v))
def test_a_lazy_training_set_streams_to_the_scores_held_in_memory(method, options):
    x, y = _data()
    task = AttributionTask(_model(), weight_decay=1e-2)
    test = AttributionDataset(x[50:], y[50:])
    memory = get_method(method, task, **options).fit(AttributionDataset(x[:50], y[:50]))
    lazy = get_method(method, task, **options).fit(
        AttributionDataset.from_torch(TensorDataset(x[:50], y[:50]), batch_size=16))  # 4 batches per product
    torch.testing.assert_close(lazy.attribute(test).scores, memory.attribute(test).scores, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(lazy.self_influence(), memory.self_influence(), rtol=1e-5, atol=1e-8)


class Features(Dataset):
    """Items as a tokenizer gives them: a dict of inputs and the label."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class DictModel(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, features):
        return {"logits": self.body(features)}


def test_dict_inputs_and_outputs_go_through_the_curvature_as_they_are():
    x, y = _data()
    body = _model()
    plain = get_method("if-explicit", AttributionTask(body, weight_decay=1e-2)).fit(
        AttributionDataset(x[:50], y[:50])).attribute(AttributionDataset(x[50:], y[50:])).scores
    as_dicts = get_method("if-explicit", AttributionTask(DictModel(body), weight_decay=1e-2)).fit(
        AttributionDataset.from_torch(Features(x[:50], y[:50]), batch_size=20)).attribute(
        AttributionDataset.from_torch(Features(x[50:], y[50:]))).scores
    torch.testing.assert_close(as_dicts, plain, rtol=1e-5, atol=1e-8)
