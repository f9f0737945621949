"""model_fingerprint over every kind of state a model holds."""

import torch
from torch import nn

from tda_explorer.compute.engine.fingerprint import model_fingerprint


def test_model_fingerprint_takes_batchnorm_and_zero_dim_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # num_batches_tracked: a 0-dim int64 buffer
    before = model_fingerprint(model)
    assert before == model_fingerprint(model)
    model.train()(torch.randn(2, 3, 5, 5))  # one training pass moves the running statistics and the step count
    assert model_fingerprint(model) != before
    step_only = {"step": torch.tensor(3)}
    assert model_fingerprint(step_only) != model_fingerprint({"step": torch.tensor(4)})
    assert model_fingerprint(step_only) == model_fingerprint({"step": torch.tensor(3)})
