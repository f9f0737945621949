"""The direct influence solvers' default damping: DAMPING_LEVEL × the largest eigenvalue of the curvature
(benchmarks/README.md, "Influence-function damping across the zoo"), checked against a GGN built independently."""

import pytest
import torch

from tda_explorer import AttributionTask, get_method
from tda_explorer.compute.methods.influence.direct import DAMPING_LEVEL


def _ggn(model, train, wd):
    """Σ Jᵀ (diag p − ppᵀ) J / n + wd I from explicit Jacobians of the logits."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def logits(flat, x):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[start : start + s.numel()].view(s)
            start += s.numel()
        return torch.func.functional_call(model, params, (x,))[0]

    p = len(theta)
    ggn = torch.zeros(p, p, dtype=torch.float64)
    for i in range(len(train)):
        x_i = train.inputs[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda flat, x_i=x_i: logits(flat, x_i), theta)
        prob = model(x_i).softmax(-1)[0].detach()
        ggn += jac.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ jac
    return ggn / len(train) + wd * torch.eye(p, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["explicit", "cg", "arnoldi", "lissa"])
def test_default_damping_is_the_documented_fraction_of_the_largest_eigenvalue(tiny_mlp, tiny_data, solver):
    train, _ = tiny_data
    wd = 0.01
    top = float(torch.linalg.eigvalsh(_ggn(tiny_mlp, train, wd))[-1])
    options = {"rank": 10} if solver == "arnoldi" else {}
    att = get_method(f"if-{solver}", AttributionTask(tiny_mlp, weight_decay=wd), **options).fit(train)
    assert DAMPING_LEVEL == 0.01
    assert att.lam_ == pytest.approx(DAMPING_LEVEL * top, rel=1e-3)


def test_explicit_damping_is_kept_as_given(tiny_mlp, tiny_data):
    train, _ = tiny_data
    att = get_method("if-explicit", AttributionTask(tiny_mlp, weight_decay=0.01), damping=0.123).fit(train)
    assert att.lam_ == 0.123
