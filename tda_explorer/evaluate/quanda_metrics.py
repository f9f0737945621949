"""Metrics computed as quanda 0.5 computes them, on score matrices ``[n_test, n_train]`` (higher = more helpful),
so results compare with quanda's benchmarks; ``benchmarks/crosscheck_quanda.py`` checks each against quanda itself.
Model randomization is ``tda_explorer.evaluate.trust.model_randomization``; LDS is ``metrics.lds``.
"""

from __future__ import annotations

import torch

from tda_explorer._validation import TDAError, check_positive_int


def _check(scores: torch.Tensor, n_train: int | None = None, argument: str = "scores") -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise TDAError(f"{argument} must be [n_test, n_train], got shape {tuple(scores.shape)}")
    if n_train is not None and scores.shape[1] != n_train:
        raise TDAError(f"{argument} has {scores.shape[1]} training columns, expected {n_train}")
    return scores.double()


def _mask(mask: torch.Tensor, n: int, argument: str) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        if mask.dim() == 1 and len(mask) != n:  # a list of indices
            full = torch.zeros(n, dtype=torch.bool)
            full[mask.long()] = True
            return full
        mask = mask.bool()
    if mask.shape[-1] != n:
        raise TDAError(f"{argument} must mark the {n} training examples, got shape {tuple(mask.shape)}")
    return mask


def class_detection(scores: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor,
                    top_k: int = 5) -> float:
    """Share of each test point's top-k training examples that carry its label, averaged over test points."""
    scores = _check(scores, len(train_labels))
    top = scores.topk(check_positive_int(top_k, "top_k"), dim=1).indices
    return float((torch.as_tensor(train_labels)[top] == torch.as_tensor(test_labels)[:, None]).double().mean())


def subclass_detection(scores: torch.Tensor, train_subclasses: torch.Tensor, test_subclasses: torch.Tensor,
                       top_k: int = 5) -> float:
    """Class detection on the original subclasses of a model trained on grouped superclasses."""
    return class_detection(scores, train_subclasses, test_subclasses, top_k)


def top_k_cardinality(scores: torch.Tensor, top_k: int = 5) -> float:
    """Distinct training examples among all test points' top-k, divided by k · n_test (higher: more diverse)."""
    scores = _check(scores)
    top = scores.topk(check_positive_int(top_k, "top_k"), dim=1).indices
    return len(torch.unique(top)) / (top_k * len(scores))


def mislabeling_detection_area(self_influence: torch.Tensor, mislabeled: torch.Tensor) -> float:
    """Area under the cumulative share of mislabeled examples found when inspecting by self-influence, highest first
    (trapezoid rule over ranks, divided by n): 0.5 for a random ranking, near 1 for a perfect one. (Our ROC-AUC form
    is ``metrics.mislabel_auc``.)"""
    values = torch.as_tensor(self_influence).double().flatten()
    hits = _mask(mislabeled, len(values), "mislabeled")
    if not hits.any():
        raise TDAError("mislabeled marks no training example")
    curve = torch.cumsum(hits[torch.argsort(values, descending=True)].double(), 0) / hits.sum()
    return float(torch.trapezoid(curve) / len(values))


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the precision-recall curve of one score row (step-wise: mean precision at each positive)."""
    order = torch.argsort(torch.as_tensor(scores).double(), descending=True)
    hits = positives[order].double()
    if hits.sum() == 0:
        return 0.0
    precision = torch.cumsum(hits, 0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / hits.sum())


def _mean_auprc(scores: torch.Tensor, positives: torch.Tensor, keep: torch.Tensor | None) -> float:
    rows = scores if keep is None else scores[torch.as_tensor(keep, dtype=torch.bool)]
    if len(rows) == 0:
        return 0.0
    return float(sum(average_precision(r, positives) for r in rows) / len(rows))


def shortcut_detection(scores: torch.Tensor, shortcut: torch.Tensor, predicted: torch.Tensor | None = None,
                       test_labels: torch.Tensor | None = None, shortcut_class: int | None = None) -> float:
    """Mean AUPRC of the shortcut-carrying training examples, over test points predicted as the shortcut class whose
    true label is another (quanda's default filters; give ``predicted``, ``test_labels`` and ``shortcut_class``)."""
    scores = _check(scores)
    positives = _mask(shortcut, scores.shape[1], "shortcut")
    keep = None
    if shortcut_class is not None:
        if predicted is None or test_labels is None:
            raise TDAError("shortcut_class filters by prediction and label: give predicted and test_labels too")
        keep = (torch.as_tensor(predicted) == shortcut_class) & (torch.as_tensor(test_labels) != shortcut_class)
    return _mean_auprc(scores, positives, keep)


def mixed_datasets(scores: torch.Tensor, adversarial: torch.Tensor, predicted: torch.Tensor | None = None,
                   adversarial_label: int | None = None) -> float:
    """Mean AUPRC of the adversarial (out-of-distribution, one shared label) training examples, over test points
    predicted as that label when ``predicted`` and ``adversarial_label`` are given."""
    scores = _check(scores)
    positives = _mask(adversarial, scores.shape[1], "adversarial")
    keep = None if predicted is None else torch.as_tensor(predicted) == adversarial_label
    return _mean_auprc(scores, positives, keep)


def mean_reciprocal_rank(scores: torch.Tensor, entailment: torch.Tensor) -> float:
    """Mean over queries of 1 / rank of the first training example that entails it (0 when none does)."""
    scores = _check(scores)
    entailment = torch.as_tensor(entailment).bool()
    if entailment.shape != scores.shape:
        raise TDAError(f"entailment must be [n_test, n_train] = {list(scores.shape)}, got {list(entailment.shape)}")
    ranked = torch.gather(entailment, 1, torch.argsort(scores, dim=1, descending=True))
    first = ranked.double().argmax(1) + 1
    return float(torch.where(ranked.any(1), 1.0 / first, torch.zeros_like(first, dtype=torch.float64)).mean())


def recall_at_k(scores: torch.Tensor, entailment: torch.Tensor, k: int = 10) -> float:
    """Share of queries with an entailing training example among their top-k proponents."""
    scores = _check(scores)
    entailment = torch.as_tensor(entailment).bool()
    top = scores.topk(check_positive_int(k, "k"), dim=1).indices
    return float(torch.gather(entailment, 1, top).any(1).double().mean())
