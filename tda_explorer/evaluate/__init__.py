"""Evaluation: metrics (LDS, mislabel detection, quanda's) and the runners that score methods on experiments
(``evaluate_method``, ``compare_methods``), removal validation, groups, proxies, stability and trust checks."""

from tda_explorer.evaluate.harness import compare_methods, evaluate_method, run_method
from tda_explorer.evaluate.metrics import lds, mislabel_auc, recall_at
from tda_explorer.evaluate.removal_validation import validate_removals
from tda_explorer.evaluate.stability import model_variants, score_stability

__all__ = [
    "compare_methods", "evaluate_method", "run_method", "lds", "mislabel_auc", "recall_at", "validate_removals",
    "model_variants", "score_stability",
]
