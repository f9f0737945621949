"""The training loss's curvature in the outputs for a loss of the user's own (losses.py), and the
Gauss-Newton solvers and the Kronecker family that take it, against an explicit Hessian of that loss."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.engine.curvature import Curvature
from tda_explorer.compute.engine.losses import Batch, cross_entropy, loss_curvature, softmax_curvature
from tda_explorer.compute.training.train import Checkpoint

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


def _flat(model: nn.Module):
    """The model's parameters as one vector θ, and its logits on one example as a function of θ."""
    names, shapes = [k for k, _ in model.named_parameters()], [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def logits(flat, x):
        params, start = {}, 0
        for k, shape in zip(names, shapes):
            params[k] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(model, params, (x.unsqueeze(0),))[0]

    return theta, logits


def _hand_ggn(model: nn.Module, loss_of, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ Jᵢᵀ Hᵢ Jᵢ / n, example by example: the logits' Jacobian (flattened) and the Hessian in them of
    ``loss_of(logits [1, ...], label)``."""
    theta, logits = _flat(model)
    total = 0
    for x, y in zip(inputs, labels):
        z = logits(theta, x).detach()
        jac = torch.autograd.functional.jacobian(lambda f, x=x: logits(f, x), theta).reshape(z.numel(), -1)
        hess = torch.autograd.functional.hessian(lambda flat, y=y, z=z: loss_of(flat.view(1, *z.shape), y)[0],
                                                 z.flatten())
        total = total + jac.T @ hess @ jac / len(labels)
    return total


def _hand_influence(model: nn.Module, loss_fn, train: AttributionDataset, test: AttributionDataset, lam: float):
    """g_testᵀ (G + λI)⁻¹ g_train / n with G the hand-built Gauss-Newton matrix of ``loss_fn``."""
    theta, logits = _flat(model)

    def gradient(x, y):
        return torch.autograd.functional.jacobian(lambda f: loss_fn(logits(f, x).unsqueeze(0), y.view(1))[0], theta)

    ggn = _hand_ggn(model, lambda z, y: loss_fn(z, y.view(1)), train.inputs, train.labels)
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


def test_the_true_fisher_under_another_loss_is_its_expected_fisher_and_source_runs_there():
    """Sampled labels are the cross-entropy's: under another loss fisher='true' (SOURCE's default, the if-cg
    preconditioner's) takes the loss's curvature, the expected Fisher."""
    torch.manual_seed(0)
    train, test = _data()
    task = AttributionTask(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), loss_fn=squared_error)
    true, expected = (get_method("if-ekfac", task, fisher=kind, damping=0.1).fit(train).attribute(test).scores
                      for kind in ("true", "expected"))
    torch.testing.assert_close(true, expected)
    checkpoints = [Checkpoint(task.model.state_dict(), 0.1, 1)]
    source = AttributionTask(task.model, checkpoints=checkpoints, loss_fn=squared_error)
    assert torch.isfinite(get_method("source", source).fit(train).attribute(test).scores).all()
    assert torch.isfinite(get_method("if-cg", task, preconditioner="ekfac").fit(train).attribute(test).scores).all()
    assert AttributionTask(nn.Linear(4, 3), loss_fn=cross_entropy).cross_entropy_loss


def test_a_sequence_models_gauss_newton_is_that_of_its_token_mean_loss():
    """Default cross-entropy over sequence logits [n, T, V]: each example's loss is the mean over its scored tokens
    (ignored positions left out), and the GGN products are that loss's (the closed form per token was not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 5)).double()
    x, y = torch.randint(0, 5, (6, 4)), torch.randint(0, 5, (6, 4))
    y[0, :2], y[3, 1] = -100, -100
    curvature = Curvature(AttributionTask(model), AttributionDataset(x, y), "ggn")
    exact = _hand_ggn(model, lambda z, yi: cross_entropy(z, yi.view(1, -1)), x, y)
    v = torch.randn(3, curvature.dim, dtype=torch.float64)
    torch.testing.assert_close(curvature.matvec(v), v @ exact)


def test_a_loss_without_forward_mode_and_a_non_convex_one_keep_one_positive_gauss_newton():
    """The Huber loss (no forward-mode derivative) through the products; a focal loss, whose curvature in the
    outputs is indefinite for some examples: its negative part dropped alike through the factor and without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    train, _ = _data(30)

    def huber(logits, labels):
        return nn.functional.huber_loss(logits, nn.functional.one_hot(labels, 3).to(logits), reduction="none",
                                        delta=0.5).sum(-1)

    def focal(logits, labels):
        p = logits.softmax(-1).gather(1, labels[:, None])[:, 0]
        return -((1 - p) ** 2) * p.log()

    huber_task = AttributionTask(model, loss_fn=huber)
    v = torch.randn(4, Curvature(huber_task, train, "ggn").dim, dtype=torch.float64)
    exact = _hand_ggn(model, huber, train.inputs, train.labels)
    torch.testing.assert_close(Curvature(huber_task, train, "ggn")._vectorised(v), v @ exact)
    with torch.no_grad():
        model[2].weight.mul_(4)  # confident predictions, where the focal loss bends the wrong way
    task = AttributionTask(model, loss_fn=focal)
    hessians = loss_curvature(task, model(train.inputs).detach(), Batch(None, train.labels))
    assert (torch.linalg.eigvalsh(hessians)[:, 0] < -1e-6).any()  # indefinite somewhere
    curvature = Curvature(task, train, "ggn")
    a = curvature.ggn_factor()
    torch.testing.assert_close(curvature._vectorised(v), (v @ a.T) @ a)


def test_the_kronecker_methods_say_when_another_loss_gets_its_empirical_fisher():
    """Sequence outputs are not expanded over their classes: under a loss of the user's own (no labels to sample)
    the Kronecker methods' expected Fisher is its empirical Fisher, and they say so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 5))
    x, y = torch.randint(0, 5, (8, 4)), torch.randint(0, 5, (8, 4))

    def token_loss(logits, batch):
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none").mean(1)

    task = AttributionTask(model, parameters=["2"], batch_loss_fn=token_loss)
    with pytest.warns(UserWarning, match=r"over outputs \(4, 5\) per example its empirical Fisher"):
        get_method("if-ekfac", task, damping=0.1).fit(AttributionDataset(x, y))
