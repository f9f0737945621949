"""TracIn evaluates each gradient at the checkpoint's model: its untracked parameters and its buffers (BatchNorm
running statistics) too, not the final model's with only the tracked parameters swapped in."""

import copy

import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.training.optimizer_state import capture_checkpoint


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-example gradients of the cross-entropy w.r.t. ``names``, one backward per example, in eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [params[n] for n in names])]))
    return torch.stack(rows)


def test_tracin_uses_each_checkpoints_untracked_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    x, y = torch.randn(24, 1, 6, 6), torch.randint(0, 2, (24,))
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = []
    for step in range(1, 4):  # three steps, a checkpoint after each: weights and running statistics all move
        model.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
        optimizer.step()
        checkpoints.append(capture_checkpoint(model, optimizer, 0.1 * step, step, trainable_only=False))
    model.eval()
    train, test = AttributionDataset(x[:16], y[:16]), AttributionDataset(x[16:], y[16:])
    task = AttributionTask(model, checkpoints=checkpoints, parameters="last_layer")
    tracin = get_method("tracin", task).fit(train)
    scores, self_influence = tracin.attribute(test).scores, tracin.self_influence()

    names = ["4.weight", "4.bias"]
    expected, expected_self = torch.zeros(8, 16), torch.zeros(16)
    for c in checkpoints:
        at = copy.deepcopy(model)
        at.load_state_dict(c.state_dict)  # the whole model as it was at the checkpoint
        g_train, g_test = _grads(at, x[:16], y[:16], names), _grads(at, x[16:], y[16:], names)
        expected += c.learning_rate * g_test @ g_train.T
        expected_self += c.learning_rate * (g_train * g_train).sum(1)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(self_influence, expected_self, rtol=1e-4, atol=1e-6)
