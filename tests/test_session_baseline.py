"""The honest baseline beside every ranking: the training loss (and out-of-fold confidence) as columns and as
rankings of their own, and each method's agreement with the loss."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from tda_explorer import TDAError
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.session import OUT_OF_FOLD, TRAINING_LOSS, Session


def _independent_loss(model, data) -> np.ndarray:
    """Cross-entropy at the given label computed here, in float64, from the model's own outputs."""
    with torch.no_grad():
        logits = model(data.inputs).double()
    log_probs = logits - torch.logsumexp(logits, 1, keepdim=True)
    return -log_probs[torch.arange(len(data)), data.labels].numpy()


@pytest.fixture
def tiny_session(tiny_data, tiny_mlp, tmp_path):
    train, test = tiny_data
    return Session(train, test, AttributionTask(tiny_mlp), folder=tmp_path)


def test_loss_column_is_the_models_cross_entropy_and_the_loss_ranking_sorts_by_it(tiny_session, tiny_mlp, tiny_data):
    session, (train, _) = tiny_session, tiny_data
    expected = _independent_loss(tiny_mlp, train)
    np.testing.assert_allclose(session.train_loss.double().numpy(), expected, rtol=1e-5)
    assert TRAINING_LOSS in session.mislabel_rankings  # before any method is computed
    ranking = session.mislabel_ranking(TRAINING_LOSS)
    assert ranking["method"].eq(TRAINING_LOSS).all() and ranking["rank"].tolist() == list(range(1, len(train) + 1))
    by_id = dict(zip(train.ids, expected))
    np.testing.assert_allclose(ranking["training_loss"], [by_id[i] for i in ranking["train_id"]], rtol=1e-5)
    np.testing.assert_allclose(ranking["score"], ranking["training_loss"], rtol=1e-6)
    assert ranking["training_loss"].is_monotonic_decreasing
    assert ranking["train_id"].tolist() == [train.ids[i] for i in np.argsort(-expected, kind="stable")]
    assert "oof_confidence" not in ranking and OUT_OF_FOLD not in session.mislabel_rankings
    with pytest.raises(TDAError, match="rankings: .*training loss"):
        session.mislabel_ranking("nope")


def test_out_of_fold_confidence_column_and_ranking_once_supplied(tiny_session, tiny_data):
    session, (train, _) = tiny_session, tiny_data
    probs = torch.rand(len(train), 3, generator=torch.Generator().manual_seed(1))
    probs = probs / probs.sum(1, keepdim=True)
    with pytest.raises(TDAError, match="must be \\[n_train, n_classes\\]"):
        session.add_out_of_fold(probs[:, :2])
    session.add_out_of_fold(probs)
    confidence = probs[torch.arange(len(train)), train.labels].double().numpy()
    ranking = session.mislabel_ranking(OUT_OF_FOLD)
    assert session.mislabel_rankings[-2:] == [TRAINING_LOSS, OUT_OF_FOLD]
    by_id = dict(zip(train.ids, confidence))
    np.testing.assert_allclose(ranking["oof_confidence"], [by_id[i] for i in ranking["train_id"]])
    assert ranking["oof_confidence"].is_monotonic_increasing  # least confident in the given label first
    np.testing.assert_allclose(ranking["score"], 1 - ranking["oof_confidence"])
    assert "oof_confidence" in session.mislabel_ranking(TRAINING_LOSS)


def test_flags_export_carries_the_baseline_columns(tiny_session, tiny_mlp, tiny_data):
    session, (train, _) = tiny_session, tiny_data
    assert list(session.flags_dataframe().columns) == ["train_id", "flag", "relabel", "note", "updated_at",
                                                       "training_loss"]
    session.flags.flag(train.ids[4])
    session.relabel(train.ids[7], 1)
    flags = session.flags_dataframe().set_index("train_id")
    expected = _independent_loss(tiny_mlp, train)
    np.testing.assert_allclose(flags.loc[[train.ids[4], train.ids[7]], "training_loss"], expected[[4, 7]], rtol=1e-5)


def test_every_training_table_has_the_loss_column(digits_experiment, tmp_path):
    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("grad-dot")
    ranking = session.ranking(session.test.ids[0], "grad-dot", k=3)
    np.testing.assert_allclose(ranking["training_loss"],
                               session.train_loss[session.train.positions(ranking["train_id"].tolist())].double(),
                               rtol=1e-6)
    assert "training_loss" in session.mislabel_ranking("grad-dot")


def test_baseline_comparison_against_independent_spearman_and_auc(digits_experiment, tmp_path):
    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    assert session.flipped is not None and session.flipped.sum() > 0
    session.compute("tracin")
    loss = _independent_loss(digits_experiment.task().model, digits_experiment.train)
    score = session.self_influences["tracin"].double().numpy()
    flipped = digits_experiment.split.flipped.numpy()
    result = session.baseline_comparison("tracin")
    assert result["spearman"] == pytest.approx(spearmanr(score, loss).statistic, abs=1e-6)
    assert result["auc"] == pytest.approx(roc_auc_score(flipped, score))
    assert result["loss_auc"] == pytest.approx(roc_auc_score(flipped, loss), abs=1e-6)
    assert result["auc_minus_loss"] == pytest.approx(result["auc"] - result["loss_auc"])
    assert session.baseline_comparison(TRAINING_LOSS)["spearman"] == pytest.approx(1.0)
    assert session.baseline_comparison(TRAINING_LOSS)["auc_minus_loss"] == pytest.approx(0.0, abs=1e-12)


def test_suspicion_keeps_its_out_of_fold_probabilities_also_from_the_cache(digits_experiment, tmp_path):
    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("suspicion", base="grad-dot", folds=2, repeats=1)
    assert OUT_OF_FOLD in session.mislabel_rankings
    oof = session.oof_probabilities.clone()
    assert "oof_confidence" in session.mislabel_ranking("suspicion")
    again = Session.from_experiment(digits_experiment, folder=tmp_path)
    again.compute("suspicion", base="grad-dot", folds=2, repeats=1)
    assert again.oof_probabilities is not None and torch.equal(again.oof_probabilities, oof)


def test_values_cannot_take_a_baselines_name(tiny_session):
    with pytest.raises(TDAError, match="baseline ranking's name"):
        tiny_session.add_values(TRAINING_LOSS, torch.zeros(len(tiny_session.train)))
    assert tiny_session.mislabel_rankings == [TRAINING_LOSS]
