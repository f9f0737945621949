"""Capturing an optimizer's kind and Adam state by parameter name, and the Adam direction against torch's own step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tda_explorer import TDAError
from tda_explorer.compute.training.optimizer_state import (
    adam_direction,
    capture_checkpoint,
    capture_optimizer_state,
    optimizer_kind,
    unwrap_optimizer,
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def steps(net: nn.Module, optimizer: torch.optim.Optimizer, n: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        optimizer.zero_grad()
        net(torch.randn(5, 3, generator=gen)).square().mean().backward()
        optimizer.step()


class Wrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer that keeps the real one as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state


def test_kinds_come_from_the_class_through_wrappers():
    params = list(model().parameters())
    assert optimizer_kind(torch.optim.SGD(params, lr=0.1)) == "sgd"
    assert optimizer_kind(torch.optim.Adam(params)) == "adam"
    inner = torch.optim.AdamW(params)
    assert optimizer_kind(Wrapper(inner)) == "adamw" and unwrap_optimizer(Wrapper(inner)) is inner
    assert capture_optimizer_state(model(), torch.optim.SGD(params, lr=0.1)) is None
    with pytest.raises(TDAError, match="optimizer must be a torch.optim.Optimizer, got dict"):
        optimizer_kind({})


def test_moments_are_matched_to_names_whatever_the_group_order():
    net = model()
    named = dict(net.named_parameters())
    # groups in another order than the model's, with their own betas
    optimizer = torch.optim.Adam([{"params": [named["2.bias"], named["0.weight"]], "betas": (0.8, 0.99)},
                                  {"params": [named["2.weight"], named["0.bias"]]}], lr=0.01, eps=1e-6)
    fresh = capture_optimizer_state(net, optimizer)
    assert fresh["step"] == 0 and all(float(m.abs().sum()) == 0 for m in fresh["exp_avg"].values())
    steps(net, optimizer)
    state = capture_optimizer_state(net, optimizer)
    assert list(state["exp_avg"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, p in named.items():
        assert state["exp_avg"][name] is not optimizer.state[p]["exp_avg"]
        torch.testing.assert_close(state["exp_avg"][name], optimizer.state[p]["exp_avg"])
        torch.testing.assert_close(state["exp_avg_sq"][name], optimizer.state[p]["exp_avg_sq"])
    assert state["step"] == 3 and state["eps"] == 1e-6
    assert state["betas"] == {"0.weight": (0.8, 0.99), "0.bias": (0.9, 0.999), "2.weight": (0.9, 0.999),
                              "2.bias": (0.8, 0.99)}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_direction_is_torchs_next_step_per_unit_lr(amsgrad):
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.7, 0.9), eps=1e-4, amsgrad=amsgrad)
    steps(net, optimizer, 4)
    state = capture_optimizer_state(net, optimizer)
    assert ("max_exp_avg_sq" in state) == amsgrad
    names = [n for n, _ in net.named_parameters()]
    shapes = {n: p.shape for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(2, sum(p.numel() for p in net.parameters()), generator=gen)
    got = adam_direction(grads, names, shapes, state)
    for row in range(2):
        params = [p.detach().clone() for p in net.parameters()]
        one = torch.optim.Adam(params, lr=1.0, betas=(0.7, 0.9), eps=1e-4, amsgrad=amsgrad)
        offset = 0
        for p, original in zip(params, net.parameters()):
            one.state[p] = {k: v.clone() for k, v in optimizer.state[original].items()}
            p.grad = grads[row, offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        before = torch.cat([p.flatten() for p in params])
        one.step()
        torch.testing.assert_close(got[row], before - torch.cat([p.flatten() for p in params]), rtol=1e-5,
                                   atol=1e-6)


def test_capture_checkpoint_from_your_own_loop():
    net = model()
    net[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01)
    steps(net, optimizer, 2)
    checkpoint = capture_checkpoint(net, optimizer, 0.01, 2)
    assert checkpoint.optimizer == "adamw" and checkpoint.step == 2 and checkpoint.learning_rate == 0.01
    assert list(checkpoint.state_dict) == ["0.bias", "2.weight", "2.bias"]
    assert list(checkpoint.optimizer_state["exp_avg"]) == ["0.bias", "2.weight", "2.bias"]
    full = capture_checkpoint(net, optimizer, 0.01, 2, trainable_only=False)
    assert list(full.state_dict) == list(net.state_dict())
    with pytest.raises(TDAError, match="names: parameter '0.weight' is not in the optimizer"):
        capture_optimizer_state(net, optimizer, names=["0.weight"])
    with pytest.raises(TDAError, match="names: 'nope' is not a parameter"):
        capture_optimizer_state(net, optimizer, names=["nope"])
