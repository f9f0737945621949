"""Per-example Dropout masks: a function of (seed, row), applied inside vmap exactly as a hand-masked forward."""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from tda_explorer import TDAError
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.training.dropout_masks import BLOCK, DropoutMasks, mask_seed


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)).double().eval()


def test_masks_depend_on_seed_and_row_only():
    model, x = _model(), torch.randn(1, 4, dtype=torch.float64)
    masks = DropoutMasks(model, 5, lambda: model(x))
    whole = masks.rows(slice(0, 2 * BLOCK + 10))[0]
    assert whole.shape == (2 * BLOCK + 10, 32)
    part = DropoutMasks(model, 5, lambda: model(x)).rows(slice(BLOCK - 3, BLOCK + 7))[0]
    torch.testing.assert_close(part, whole[BLOCK - 3:BLOCK + 7])  # a chunk across a block edge
    assert whole.dtype == torch.bool
    assert abs((~whole).float().mean().item() - 0.3) < 0.02
    assert not torch.equal(whole[0], whole[1])  # a mask per example, not one for all
    members = {tuple(DropoutMasks(model, mask_seed(k, test), lambda: model(x)).rows(slice(0, 10))[0].flatten().tolist())
               for k in range(6) for test in (False, True)}
    assert len(members) == 12  # every member and stream draws its own masks (seeds 2**32 apart included)


def test_vmapped_gradients_equal_hand_masked_autograd():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2] * 3)
    names = [n for n, _ in model.named_parameters()]
    got = per_sample_gradients(model, names, x, y, cross_entropy, dropout_seed=3, max_memory=3 * 8 * 300)
    masks = DropoutMasks(model, 3, lambda: model(x[:1])).rows(slice(0, 9))[0]
    for i in range(9):
        model.zero_grad()
        hidden = model[1](model[0](x[i:i + 1])) * masks[i] / 0.7
        cross_entropy(model[3](hidden), y[i:i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got[i], expected)
    plain = per_sample_gradients(model, names, x, y, cross_entropy)
    assert not torch.allclose(got, plain)
    assert not model.training and all(len(m._forward_hooks) == 0 for m in model.modules())


def test_channel_dropout_masks_whole_channels_and_alpha_dropout_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Dropout2d(0.5)).eval()
    x = torch.randn(1, 1, 8, 8)
    masks = DropoutMasks(model, 0, lambda: model(x)).rows(slice(0, 4))[0]
    assert masks.shape == (4, 6, 1, 1)
    with pytest.raises(TDAError, match="AlphaDropout"):
        DropoutMasks(nn.Sequential(nn.Linear(2, 2), nn.AlphaDropout(0.1)), 0, lambda: None)
    with pytest.raises(TDAError, match="no Dropout module"):
        DropoutMasks(nn.Linear(2, 2), 0, lambda: None)
