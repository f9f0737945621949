"""The per-sample gradient fallback for models vmap cannot run (data-dependent control flow, as Hugging Face's
attention masks): a backward batched over the losses, in slices, equal to vmap's gradients on a twin model."""

import torch
from torch import nn

from tda_explorer.compute.engine import gradients
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.engine.losses import cross_entropy


class Net(nn.Module):
    """An MLP with Dropout; ``branch=True`` adds a data-dependent ``if`` that is always taken (vmap refuses it), so
    both variants compute the same function."""

    def __init__(self, branch: bool):
        super().__init__()
        self.branch = branch
        self.hidden, self.drop, self.out = nn.Linear(5, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.hidden(x)))
        if self.branch and bool(x.abs().sum() >= 0):
            h = h + 0.0
        return self.out(h)


def test_fallback_in_slices_equals_vmap_with_dropout_masks():
    torch.manual_seed(0)
    plain, branchy = Net(branch=False), Net(branch=True)
    branchy.load_state_dict(plain.state_dict())
    n = 2 * gradients.BATCHED_ROWS + 5  # three slices, the last one short
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    names = [name for name, _ in plain.named_parameters()]
    for seed in (None, 4):  # plain, and one dropout-ensemble member (masks sliced with the rows)
        expected = per_sample_gradients(plain, names, x, y, cross_entropy, dropout_seed=seed)
        got = per_sample_gradients(branchy, names, x, y, cross_entropy, dropout_seed=seed)
        assert torch.allclose(got, expected, atol=1e-6)
    assert (expected != 0).any()


def test_each_batched_backward_takes_a_slice_of_the_chunk(monkeypatch):
    """A backward batched over B losses costs about B full backward passes of the B-row graph, so every one is given
    at most BATCHED_ROWS losses (and the gradients still equal a per-example loop's)."""
    torch.manual_seed(0)
    model = Net(branch=True)
    names = [name for name, _ in model.named_parameters()]
    x, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    sizes, grad = [], torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched"):
            sizes.append(len(grad_outputs))
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    got = per_sample_gradients(model, names, x, y, cross_entropy)
    assert sum(sizes) == 100 and max(sizes) <= gradients.BATCHED_ROWS
    monkeypatch.undo()
    by_hand = []
    for i in range(100):
        model.zero_grad()
        nn.functional.cross_entropy(model.eval()(x[i : i + 1]), y[i : i + 1]).backward()
        by_hand.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(got, torch.stack(by_hand), atol=1e-6)
