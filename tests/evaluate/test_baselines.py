"""Every mislabel figure the harness and ``tda-explorer evaluate`` report comes beside the training-loss baseline's
(and, for suspicion, beside cleanlab's self-confidence on the same out-of-fold probabilities)."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from tda_explorer.cli import main
from tda_explorer.evaluate import compare_methods, evaluate_method, recall_at
from tda_explorer.evaluate.metrics import baseline_metrics, rank_correlation


def _loss(experiment) -> torch.Tensor:
    train = experiment.split.train
    with torch.no_grad():
        logits = experiment.record.model(train.inputs).double()
    return torch.logsumexp(logits, 1) - logits[torch.arange(len(train)), train.labels]


def test_rank_correlation_is_spearman():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, generator=gen), torch.randn(200, generator=gen)
    b = a + b
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    assert np.isnan(rank_correlation(a, torch.ones(200)))


def test_baseline_metrics_against_an_independent_computation():
    gen = torch.Generator().manual_seed(1)
    flipped = torch.rand(300, generator=gen) < 0.1
    loss = torch.rand(300, generator=gen) + flipped.double()
    score = torch.rand(300, generator=gen) + 0.5 * flipped.double()
    confidence = torch.rand(300, generator=gen) * (1 - 0.8 * flipped.double())
    result = baseline_metrics(score, flipped, loss, confidence)
    assert result["loss_baseline_mislabel_auc"] == pytest.approx(roc_auc_score(flipped.numpy(), loss.numpy()))
    assert result["mislabel_auc_minus_loss"] == pytest.approx(
        roc_auc_score(flipped.numpy(), score.numpy()) - roc_auc_score(flipped.numpy(), loss.numpy()))
    assert result["oof_baseline_mislabel_auc"] == pytest.approx(roc_auc_score(flipped.numpy(), -confidence.numpy()))
    top = np.argsort(confidence.numpy())[:30]  # the least confident 10%
    assert result["oof_baseline_recall_at_10"] == pytest.approx(flipped.numpy()[top].sum() / flipped.sum().item())
    assert result["recall_at_10_minus_loss"] == pytest.approx(recall_at(score, flipped, 0.1)
                                                              - recall_at(loss, flipped, 0.1))
    assert "oof_baseline_mislabel_auc" not in baseline_metrics(score, flipped, loss)


def test_harness_rows_carry_the_loss_baseline(digits_experiment):
    flipped = digits_experiment.split.flipped
    loss = _loss(digits_experiment)
    row = evaluate_method(digits_experiment, "grad-dot")
    assert row["loss_baseline_mislabel_auc"] == pytest.approx(roc_auc_score(flipped.numpy(), loss.numpy()), abs=1e-6)
    assert row["mislabel_auc_minus_loss"] == pytest.approx(row["mislabel_auc"] - row["loss_baseline_mislabel_auc"])
    assert row["loss_baseline_recall_at_10"] == pytest.approx(recall_at(loss, flipped, 0.1))
    assert "oof_baseline_mislabel_auc" not in row
    frame = compare_methods(digits_experiment, ["grad-dot"])
    assert {"loss_baseline_mislabel_auc", "mislabel_auc_minus_loss", "spearman_with_loss"} <= set(frame.columns)


def test_suspicion_is_reported_beside_self_confidence_on_its_own_out_of_fold_models(digits_experiment):
    row = evaluate_method(digits_experiment, "suspicion", base="grad-dot", folds=2, repeats=1)
    for key in ("oof_baseline_mislabel_auc", "oof_baseline_recall_at_10", "mislabel_auc_minus_oof",
                "recall_at_10_minus_oof", "mislabel_auc_minus_loss"):
        assert key in row
    assert row["mislabel_auc_minus_oof"] == pytest.approx(row["mislabel_auc"] - row["oof_baseline_mislabel_auc"])


def test_cli_evaluate_json_has_the_baseline_fields(tmp_path):
    path = tmp_path / "r.json"
    assert main(["evaluate", "--model", "lr", "--method", "grad-dot", "--noise", "0.1", "--no-lds",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["mislabel_auc_minus_loss"] == pytest.approx(result["mislabel_auc"]
                                                              - result["loss_baseline_mislabel_auc"])
    assert result["recall_at_10_minus_loss"] == pytest.approx(result["recall_at_10"]
                                                              - result["loss_baseline_recall_at_10"])
    assert -1 <= result["spearman_with_loss"] <= 1


def test_lava_evaluation_carries_the_loss_baseline(digits_experiment):
    from tda_explorer.evaluate.valuation import evaluate_lava

    row = evaluate_lava(digits_experiment)
    assert row["mislabel_auc_minus_loss"] == pytest.approx(row["mislabel_auc"] - row["loss_baseline_mislabel_auc"])
