import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tda_explorer import TDAError
from tda_explorer.evaluate import lds, mislabel_auc, recall_at


def test_lds_matches_scipy_per_test_point():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen)
    masks = torch.rand(40, 50, generator=gen) < 0.5
    loss = torch.randn(40, 3, generator=gen)
    mean, per_test = lds(scores, masks, loss)
    predicted = masks.double() @ scores.double().T
    want = [spearmanr(predicted[:, j], -loss[:, j]).statistic for j in range(3)]
    np.testing.assert_allclose(per_test, want, rtol=1e-10)
    assert mean == pytest.approx(np.mean(want))


def test_lds_is_one_for_an_exact_linear_datamodel():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 30, generator=gen)
    masks = torch.rand(25, 30, generator=gen) < 0.5
    loss = -(masks.double() @ scores.double().T)  # helpful examples lower the loss
    assert lds(scores, masks, loss)[0] == pytest.approx(1.0)


def test_mislabel_metrics():
    flipped = torch.tensor([True, False, False, True, False, False, False, False, False, False])
    perfect = flipped.float() + 0.01 * torch.arange(10)
    assert mislabel_auc(perfect, flipped) == 1.0
    assert recall_at(perfect, flipped, 0.2) == 1.0
    assert recall_at(perfect, flipped, 0.1) == 0.5
    with pytest.raises(TDAError, match="both flipped and clean"):
        mislabel_auc(perfect, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(TDAError, match="fraction must be in"):
        recall_at(perfect, flipped, 1.5)
