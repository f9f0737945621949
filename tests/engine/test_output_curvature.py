"""The training loss's curvature in the outputs for a loss of the user's own (output_curvature.py), and the
Gauss-Newton solvers and the Kronecker family that take it, against an explicit Hessian of that loss."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tda_explorer import AttributionDataset, AttributionTask, TDAError, get_method
from tda_explorer.compute.engine.curvature import Curvature
from tda_explorer.compute.engine.losses import Batch, cross_entropy
from tda_explorer.compute.engine.output_curvature import loss_curvature, softmax_curvature

WEIGHTS = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, weight=WEIGHTS.to(logits), reduction="none")


def squared_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = nn.functional.one_hot(labels, logits.shape[-1]).to(logits)
    return ((logits - target) ** 2).sum(-1)


def _data(n: int = 14):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n + 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n + 4,), generator=gen)
    return AttributionDataset(x[:n], y[:n]), AttributionDataset(x[n:], y[n:])


def _hand_influence(model: nn.Module, loss_fn, train: AttributionDataset, test: AttributionDataset, lam: float):
    """g_testᵀ (G + λI)⁻¹ g_train / n with G = Σ Jᵢᵀ Hᵢ Jᵢ / n: the logits' Jacobians and the loss's Hessian in them,
    each example by itself."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def logits(flat, x):
        params, start = {}, 0
        for k, shape in zip(names, shapes):
            params[k] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(model, params, (x.unsqueeze(0),))[0]

    def gradient(x, y):
        return torch.autograd.functional.jacobian(lambda f: loss_fn(logits(f, x).unsqueeze(0), y.view(1))[0], theta)

    ggn = 0
    for x, y in zip(train.inputs, train.labels):
        jac = torch.autograd.functional.jacobian(lambda f, x=x: logits(f, x), theta)
        hess = torch.autograd.functional.hessian(lambda z, y=y: loss_fn(z.unsqueeze(0), y.view(1))[0],
                                                 logits(theta, x).detach())
        ggn = ggn + jac.T @ hess @ jac / len(train)
    g_train = torch.stack([gradient(x, y) for x, y in zip(train.inputs, train.labels)])
    g_test = torch.stack([gradient(x, y) for x, y in zip(test.inputs, test.labels)])
    damped = ggn + lam * torch.eye(len(theta), dtype=torch.float64)
    return torch.linalg.solve(damped, g_test.T).T @ g_train.T / len(train)


@pytest.mark.parametrize("loss_fn", [weighted_cross_entropy, squared_error])
def test_the_loss_curvature_is_each_examples_hessian_in_the_outputs(loss_fn):
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    task = AttributionTask(nn.Linear(2, 3), loss_fn=loss_fn)
    expected = torch.stack([torch.autograd.functional.hessian(lambda z, y=y: loss_fn(z.unsqueeze(0), y.view(1))[0], z)
                            for z, y in zip(logits, labels)])
    torch.testing.assert_close(loss_curvature(task, logits, Batch(None, labels)), expected)
    plain = AttributionTask(nn.Linear(2, 3))
    assert plain.cross_entropy_loss and not task.cross_entropy_loss
    torch.testing.assert_close(loss_curvature(plain, logits, Batch(None, labels)), softmax_curvature(logits))


@pytest.mark.parametrize("loss_fn", [weighted_cross_entropy, squared_error])
def test_the_gauss_newton_solvers_take_the_users_loss(loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    train, test = _data()
    task = AttributionTask(model, loss_fn=loss_fn)
    expected = _hand_influence(model, loss_fn, train, test, 0.1)
    for name in ("if-explicit", "if-cg"):
        scores = get_method(name, task, damping=0.1).fit(train).attribute(test).scores
        torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-8)
    curvature = Curvature(task, train, "ggn")  # the factor A (AᵀA the GGN) and the vectorised products agree
    a = curvature.ggn_factor()
    v = torch.randn(3, curvature.dim, dtype=torch.float64)
    torch.testing.assert_close((v @ a.T) @ a, curvature._vectorised(v))


def test_kfac_on_one_example_is_the_exact_gauss_newton_of_the_users_loss():
    """One example through one Linear layer: its Fisher is A ⊗ S exactly, so K-FAC's expected Fisher (the roots of the
    loss's Hessian in the outputs) at an absolute damping is the exact damped Gauss-Newton solve."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    train, test = _data(1)
    task = AttributionTask(model, loss_fn=weighted_cross_entropy)
    expected = _hand_influence(model, weighted_cross_entropy, train, test, 0.05)
    for name in ("if-kfac", "if-ekfac"):
        scores = get_method(name, task, damping=0.05, damping_kind="absolute").fit(train).attribute(test).scores
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-9)


def test_the_true_fisher_is_the_cross_entropys_and_refused_under_another_loss():
    train, _ = _data()
    task = AttributionTask(nn.Linear(4, 3).double(), loss_fn=squared_error)
    with pytest.raises(TDAError, match="fisher='true'.*use fisher='expected'"):
        get_method("if-ekfac", task, fisher="true", damping=0.1).fit(train)
    assert AttributionTask(nn.Linear(4, 3), loss_fn=cross_entropy).cross_entropy_loss
