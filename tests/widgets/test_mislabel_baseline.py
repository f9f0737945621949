"""The Mislabels tab puts every ranking beside the training-loss baseline: the loss is a ranking of its own (offered
before any method is computed) and the chosen ranking's rank correlation with it (and, with known flips, its AUC
beside the loss's) is on a line of its own. Driven without a browser."""

import re

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from tda_explorer import AttributionTask
from tda_explorer.session import OUT_OF_FOLD, TRAINING_LOSS, Session
from tda_explorer.widgets import Explorer
from tda_explorer.widgets.mislabel import MislabelPanel, baseline_text
from tda_explorer.widgets.state import ExplorerState


def _shown_correlation(panel) -> float:
    return float(re.search(r"rank correlation with training loss: (-?[0-9.]+)", panel.baseline.value).group(1))


def _independent_loss(experiment) -> np.ndarray:
    train = experiment.train
    with torch.no_grad():
        logits = experiment.task().model(train.inputs).double()
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(train)), train.labels]).numpy()


def test_training_loss_is_offered_before_any_method_is_computed(tiny_data, tiny_mlp, tmp_path):
    train, test = tiny_data
    session = Session(train, test, AttributionTask(tiny_mlp), folder=tmp_path)
    state = ExplorerState()
    panel = MislabelPanel(session, state, interactive=False)
    assert list(panel.method.options) == [TRAINING_LOSS]
    assert state.mislabel_method == TRAINING_LOSS
    assert "no ranking" not in panel.list.value and "training loss</th>" in panel.list.value
    assert panel.baseline.value.count("the baseline") == 1
    shown = panel.table()
    assert shown["train_id"].tolist() == session.mislabel_ranking(TRAINING_LOSS)["train_id"].tolist()


def test_selecting_a_method_shows_its_spearman_with_the_loss_and_auc_minus_the_losss(session_with,
                                                                                     digits_experiment):
    session = session_with("tracin", "grad-dot")
    explorer = Explorer(session, method="tracin")
    panel = explorer.mislabels
    assert list(panel.method.options) == ["tracin", "grad-dot", TRAINING_LOSS]
    loss = _independent_loss(digits_experiment)
    flipped = digits_experiment.split.flipped.numpy()
    for method in ("grad-dot", "tracin"):
        panel.method.value = method  # what picking it in the dropdown does
        score = session.self_influences[method].double().numpy()
        assert _shown_correlation(panel) == pytest.approx(spearmanr(score, loss).statistic, abs=0.006)
        auc, loss_auc = roc_auc_score(flipped, score), roc_auc_score(flipped, loss)
        assert f"ROC-AUC {auc:.3f} vs {loss_auc:.3f} for the loss ({auc - loss_auc:+.3f})" in panel.baseline.value
    panel.method.value = TRAINING_LOSS
    assert "the baseline" in panel.baseline.value and "rank correlation" not in panel.baseline.value
    assert explorer.state.mislabel_method == TRAINING_LOSS
    assert panel.table()["training_loss"].is_monotonic_decreasing


def test_the_line_says_when_a_method_adds_little_beyond_the_loss():
    close = baseline_text("m", {"spearman": 0.97})
    assert "0.97 — this method adds little beyond the loss" in close
    assert "adds little" not in baseline_text("m", {"spearman": 0.6})
    assert "undefined" in baseline_text("m", {"spearman": float("nan")})
    text = baseline_text("m", {"spearman": 0.5, "auc": 0.97, "loss_auc": 0.99, "auc_minus_loss": -0.02,
                               "recall_at_10": 0.8, "loss_recall_at_10": 0.9, "recall_at_10_minus_loss": -0.1})
    assert "ROC-AUC 0.970 vs 0.990 for the loss (-0.020)" in text and "recall@10% 0.80 vs 0.90 (-0.10)" in text


def test_out_of_fold_ranking_joins_the_dropdown_once_suspicion_ran(session_with):
    session = session_with("grad-dot")
    explorer = Explorer(session)
    session.compute("suspicion", base="grad-dot", folds=2, repeats=1)
    explorer.refresh()
    options = list(explorer.mislabels.method.options)
    assert options == ["grad-dot", "suspicion", TRAINING_LOSS, OUT_OF_FOLD]
    explorer.mislabels.method.value = OUT_OF_FOLD
    assert "out-of-fold p(given)</th>" in explorer.mislabels.list.value
    assert explorer.mislabels.table()["oof_confidence"].is_monotonic_increasing
