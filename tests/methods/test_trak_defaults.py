"""TRAK's damping: the default rule λ = DEFAULT_DAMPING · tr(ΦᵀΦ)/min(n, k) (benchmarks/README.md, "TRAK defaults
across the zoo"), an explicit damping relative on the same scale, the task's weight decay never entering; checked
against margin gradients computed here, one example at a time."""

import pytest
import torch

from tda_explorer import AttributionTask, get_method
from tda_explorer.compute.methods.trak import DEFAULT_DAMPING


def _margin_gradients(model, data) -> torch.Tensor:
    """Φ: −margin = log Σ_{c≠y} p_c − log p_y, differentiated per example by plain autograd."""
    rows = []
    for x, y in zip(data.inputs, data.labels):
        logp = model(x.unsqueeze(0)).log_softmax(-1)[0]
        others = torch.cat([logp[:y], logp[y + 1:]]).logsumexp(0)
        grads = torch.autograd.grad(others - logp[y], list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _q(model, data) -> torch.Tensor:
    with torch.no_grad():
        return 1 - model(data.inputs).softmax(-1)[torch.arange(len(data)), data.labels]


@pytest.mark.parametrize("damping, weight_decay", [(None, 0.0), (None, 0.01), (0.5, 0.0), (0.5, 0.01)])
def test_damping_is_relative_to_the_kernel_and_ignores_weight_decay(tiny_mlp, tiny_data, damping, weight_decay):
    train, test = tiny_data
    phi, phi_test = _margin_gradients(tiny_mlp, train), _margin_gradients(tiny_mlp, test)
    n, p = phi.shape  # 20 examples, 43 parameters: exact gradients (p < the default k), the dual system
    relative = DEFAULT_DAMPING if damping is None else damping
    lam = relative * float(phi.square().sum()) / min(n, p)
    options = {} if damping is None else {"damping": damping}
    method = get_method("trak", AttributionTask(tiny_mlp, weight_decay=weight_decay), **options).fit(train)
    assert method.lam_[0] == pytest.approx(lam, rel=1e-6)
    expected = phi_test @ torch.linalg.solve(phi.T @ phi + lam * torch.eye(p, dtype=phi.dtype), phi.T)
    torch.testing.assert_close(method.attribute(test).scores.double(), expected * _q(tiny_mlp, train),
                               rtol=1e-4, atol=1e-6)


def test_default_is_the_documented_constant(tiny_mlp):
    method = get_method("trak", AttributionTask(tiny_mlp))
    assert method.args.damping == DEFAULT_DAMPING and method.relative_damping == DEFAULT_DAMPING
    assert get_method("trak", AttributionTask(tiny_mlp), damping=None).relative_damping == DEFAULT_DAMPING
    assert get_method("trak", AttributionTask(tiny_mlp), damping=0.0).relative_damping == 0.0


def test_projected_primal_system_uses_the_feature_count(tiny_mlp, tiny_data):
    """k = 8 projected features < n = 20 examples: the k×k system, λ relative to tr(ΦᵀΦ)/k."""
    train, _ = tiny_data
    method = get_method("trak", AttributionTask(tiny_mlp), projection_dim=8, damping=2.0).fit(train)
    phi = method.phi_[0].double()
    assert phi.shape == (20, 8) and not method.dual_[0]
    assert method.lam_[0] == pytest.approx(2.0 * float(phi.square().sum()) / 8, rel=1e-6)
