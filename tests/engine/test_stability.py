"""Stability of scores across seeds and checkpoints: statistics against scipy, and the digits pipeline."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tda_explorer import TDAError
from tda_explorer.compute.engine.stability import stability_from_scores
from tda_explorer.evaluate.stability import model_variants, score_stability
from tda_explorer.experiments import build_experiment


def test_statistics_match_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3, 4, generator=gen) + torch.linspace(-2, 2, 4)
    got = stability_from_scores("m", scores, ["a", "b", "c"], [10, 11, 12, 13])
    s = scores.double().numpy()
    mean, std = s.mean(0), s.std(0, ddof=1)
    np.testing.assert_allclose(got.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(got.std.numpy(), std, rtol=1e-12)
    np.testing.assert_allclose(got.p_value.numpy(), 2 * norm.sf(np.abs(mean / std)), rtol=1e-9, atol=1e-12)
    frame = got.to_frame(["b"], alpha=0.05)
    assert list(frame.columns) == ["test_id", "train_id", "method", "mean", "std", "z", "p_value", "stable"]
    assert len(frame) == 4 and (frame["stable"] == (frame["p_value"] < 0.05)).all()
    same = stability_from_scores("m", torch.stack([torch.tensor([[1.0, 0.0]])] * 3), ["t"], [0, 1])
    assert same.p_value.tolist() == [[0.0, 1.0]]  # no variation: a nonzero score is certain, a zero one is not
    with pytest.raises(TDAError, match="n_models >= 2"):
        stability_from_scores("m", scores[:1], ["a", "b", "c"], [10, 11, 12, 13])


def test_seed_and_checkpoint_variants_on_digits():
    exp = build_experiment("mlp", n_train=150, n_test=10, epochs=6)
    variants = model_variants(exp, n_seeds=3, last_checkpoints=2)
    assert len(variants) == 6
    assert not torch.equal(variants[0]["0.weight"], variants[2]["0.weight"])  # another seed
    assert not torch.equal(variants[0]["0.weight"], variants[1]["0.weight"])  # the next epoch
    result = score_stability("grad-dot", exp.task(), variants, exp.split.train, exp.split.test)
    assert result.n_models == 6 and result.mean.shape == (10, 150)
    assert bool(((result.p_value >= 0) & (result.p_value <= 1)).all())
    # some pairs keep their sign whatever the seed (tiny p), others are noise (large p)
    assert float(result.p_value.min()) < 0.01 and float(result.p_value.max()) > 0.5
    with pytest.raises(TDAError, match="last_checkpoints must be in 1..6"):
        model_variants(exp, last_checkpoints=9)
