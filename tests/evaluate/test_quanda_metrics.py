"""quanda-compatible metrics against hand-worked cases and the recipe's random-explainer expectations."""

from __future__ import annotations

import pytest
import torch

from tda_explorer.errors import TDAError
from tda_explorer.evaluate.quanda_metrics import (
    average_precision,
    class_detection,
    mean_reciprocal_rank,
    mislabeling_detection_area,
    mixed_datasets,
    recall_at_k,
    shortcut_detection,
    top_k_cardinality,
)


def test_hand_worked_cases():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    train_labels, test_labels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1])
    assert class_detection(scores, train_labels, test_labels, top_k=2) == pytest.approx(0.75)  # 2/2 and 1/2
    assert top_k_cardinality(scores, top_k=2) == pytest.approx(3 / 4)  # {0, 2} ∪ {1, 2}
    entail = torch.tensor([[False, False, True, False], [False, False, False, False]])
    assert mean_reciprocal_rank(scores, entail) == pytest.approx((1 / 2 + 0) / 2)
    assert recall_at_k(scores, entail, k=1) == 0 and recall_at_k(scores, entail, k=2) == pytest.approx(0.5)
    assert average_precision(torch.tensor([0.9, 0.8, 0.1]), torch.tensor([True, False, True])) == pytest.approx(
        (1 + 2 / 3) / 2)
    perfect = mislabeling_detection_area(torch.tensor([5.0, 4.0, 1.0, 0.0]), torch.tensor([True, True, False, False]))
    assert perfect == pytest.approx(torch.trapezoid(torch.tensor([0.5, 1, 1, 1])).item() / 4)


def test_a_random_explainer_scores_chance():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(100, 1000, generator=gen)
    train_labels = torch.randint(0, 10, (1000,), generator=gen)
    assert class_detection(scores, train_labels, torch.randint(0, 10, (100,), generator=gen)) == pytest.approx(
        0.10, abs=0.02)
    assert top_k_cardinality(scores, 5) == pytest.approx(1000 * (1 - 0.995**100) / 500, abs=0.03)  # 394 of 500
    flipped = torch.rand(1000, generator=gen) < 0.1
    assert mislabeling_detection_area(torch.rand(1000, generator=gen), flipped) == pytest.approx(0.5, abs=0.05)
    assert mislabeling_detection_area(flipped.double(), flipped) > 0.94
    shortcut = torch.rand(1000, generator=gen) < 0.2
    assert shortcut_detection(scores, shortcut) == pytest.approx(0.2, abs=0.03)  # AUPRC ≈ the positive rate
    predicted, labels = torch.randint(0, 2, (100,), generator=gen), torch.randint(0, 2, (100,), generator=gen)
    filtered = shortcut_detection(scores, shortcut, predicted, labels, shortcut_class=1)
    keep = (predicted == 1) & (labels != 1)
    assert filtered == pytest.approx(sum(average_precision(r, shortcut) for r in scores[keep]) / int(keep.sum()))
    assert mixed_datasets(scores, shortcut, predicted, 0) == pytest.approx(
        sum(average_precision(r, shortcut) for r in scores[predicted == 0]) / int((predicted == 0).sum()))


def test_bad_shapes_are_refused():
    with pytest.raises(TDAError, match="scores must be \\[n_test, n_train\\]"):
        top_k_cardinality(torch.rand(5))
    with pytest.raises(TDAError, match="entailment must be \\[n_test, n_train\\] = \\[2, 3\\]"):
        mean_reciprocal_rank(torch.rand(2, 3), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TDAError, match="shortcut_class filters by prediction and label"):
        shortcut_detection(torch.rand(2, 3), torch.tensor([True, False, False]), shortcut_class=1)


def test_compare_methods_reports_the_quanda_heuristics(digits_experiment):
    from tda_explorer.evaluate import compare_methods

    frame = compare_methods(digits_experiment, ["grad-dot"])
    row = frame.iloc[0]
    assert 0 < row["class_detection"] <= 1 and 0 < row["top_k_cardinality"] <= 1
    assert 0.5 < row["mislabeling_detection_area"] <= 1  # 10% flipped labels in this experiment


def test_the_quanda_explainer_adapter_says_what_it_needs():
    import importlib.util

    from tda_explorer.integrations.quanda import quanda_explainer

    if importlib.util.find_spec("quanda") is not None:
        pytest.skip("quanda is installed here: benchmarks/crosscheck_quanda.py exercises the adapter")
    with pytest.raises(TDAError, match="quanda_explainer needs quanda"):
        quanda_explainer("grad-dot")
