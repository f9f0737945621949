"""Influence functions against independent computations on tiny float64 models."""

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.curvature import Curvature


def _flat_objective(model, x, y, wd):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(flat):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y) + 0.5 * wd * (flat**2).sum()

    return f, torch.cat([p.detach().flatten() for p in model.parameters()])


def _grads(model, x, y):
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_explicit_hessian_if_equals_closed_form(tiny_mlp, tiny_data):
    train, test = tiny_data
    wd, lam = 0.05, 1.0
    task = AttributionTask(tiny_mlp, weight_decay=wd)
    got = get_method("if-explicit", task, curvature="hessian", damping=lam).fit(train).attribute(test).scores.double()
    f, theta = _flat_objective(tiny_mlp, train.inputs, train.labels, wd)
    hess = torch.autograd.functional.hessian(f, theta)
    g_tr, g_te = _grads(tiny_mlp, train.inputs, train.labels), _grads(tiny_mlp, test.inputs, test.labels)
    want = g_te @ torch.linalg.solve(hess + lam * torch.eye(len(theta), dtype=torch.float64), g_tr.T) / len(train)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_ggn_products_equal_explicit_jacobians(tiny_mlp, tiny_data):
    train, _ = tiny_data
    wd = 0.01
    curvature = Curvature(AttributionTask(tiny_mlp, weight_decay=wd), train, "ggn")
    dense = curvature.dense()
    p = curvature.dim
    ggn = torch.zeros(p, p, dtype=torch.float64)
    for i in range(len(train)):
        x_i = train.inputs[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda flat, x_i=x_i: torch.func.functional_call(tiny_mlp, curvature._unflatten(flat), (x_i,))[0],
            curvature.theta)
        prob = tiny_mlp(train.inputs[i : i + 1]).softmax(-1)[0].detach()
        ggn += jac.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ jac
    ggn = ggn / len(train) + wd * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(dense, ggn, rtol=1e-6, atol=1e-9)
    assert torch.linalg.eigvalsh(dense)[0] > 0  # PSD + wd·I


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_converges_to_explicit_and_self_influence_is_diagonal(tiny_mlp, tiny_data, curvature):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.05)
    options = {"curvature": curvature, "damping": 1.0}
    explicit = get_method("if-explicit", task, **options).fit(train)
    cg = get_method("if-cg", task, tol=1e-10, **options).fit(train)
    a, b = explicit.attribute(test).scores, cg.attribute(test).scores
    assert ((a - b).abs().max() / a.abs().max()) < 1e-5
    for method in (explicit, cg):
        full = method.attribute(train).scores
        torch.testing.assert_close(method.self_influence(), full.diagonal(), rtol=1e-4, atol=1e-8)


def test_refusals_name_the_problem(tiny_data):
    train, _ = tiny_data
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(20)  # far from a minimum: the exact Hessian is indefinite
    task = AttributionTask(model)
    with pytest.raises(TDAError, match="not positive definite.*curvature='ggn' or raise damping"):
        get_method("if-explicit", task, curvature="hessian", damping=0.0).fit(train)
    with pytest.raises(TDAError, match="CG did not converge in max_iter=1 iterations: relative residual"):
        get_method("if-cg", task, max_iter=1, tol=1e-12).fit(train).attribute(train)
    with pytest.raises(TDAError, match="damping must be >= 0"):
        get_method("if-cg", task, damping=-1.0)
    with pytest.raises(TDAError, match="unknown curvature 'fisher'"):
        get_method("if-explicit", task, curvature="fisher").fit(train)
