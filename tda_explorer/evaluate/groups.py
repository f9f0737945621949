"""Group attribution against leave-group-out retraining: which *sources* (groups of training data) a test set
depends on, as UnTrac's evaluation asks it.

Groups partition the training set with class mixtures drawn from a Dirichlet (α = 0.5: each group leans on a few
classes, as data sources do), so removing a group moves each class's test loss by a different amount. Truth: the
retraining engine's paired removal under the recipe's fixed step budget (zeroed weights keep every step), averaged
over seeds. Score: for each class's test points as the test set, the Pearson correlation across groups between the
estimated and the actual rise of their mean loss, averaged over classes (``group_pearson``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.catalogue import build_arguments
from tda_explorer.compute.valuation.untrac import InverseUnlearnConfig, UnlearnConfig, UnTrac
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.evaluate.harness import run_method
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.retrainer import Retrainer


def dirichlet_groups(train: AttributionDataset, k: int, alpha: float = 0.5, seed: int = 0) -> list[list[Any]]:
    """A partition of ``train``'s ids into ``k`` non-empty groups whose class mixtures are Dirichlet(α) draws."""
    k = check_positive_int(k, "groups")
    if not 2 <= k <= len(train):
        raise TDAError(f"groups must be between 2 and the number of training examples ({len(train)}), got {k}")
    train.check_class_labels("groups")
    rng = np.random.default_rng(seed)
    labels = train.labels.numpy()
    assignment = np.empty(len(labels), dtype=int)
    for c in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == c)[0])
        shares = rng.dirichlet(np.full(k, alpha))
        assignment[members] = rng.choice(k, size=len(members), p=shares)
    for g in range(k):  # every group gets at least one example, taken from the largest group
        if not (assignment == g).any():
            largest = np.bincount(assignment, minlength=k).argmax()
            assignment[np.nonzero(assignment == largest)[0][0]] = g
    return [[train.ids[i] for i in np.nonzero(assignment == g)[0]] for g in range(k)]


def class_pearson(estimates: torch.Tensor, actual: torch.Tensor, test: AttributionDataset) -> tuple[float, list]:
    """Mean over classes of the Pearson correlation across groups between the estimated and the actual rise of the
    class's mean test measurement; both ``[n_groups, n_test]``. Returns (mean, per-class values)."""
    values = []
    for c in sorted(set(test.labels.tolist())):
        cols = test.labels == c
        e, a = estimates[:, cols].double().mean(1), actual[:, cols].double().mean(1)
        if e.std() > 0 and a.std() > 0:
            values.append(float(torch.corrcoef(torch.stack([e, a]))[0, 1]))
    return float(np.mean(values)) if values else float("nan"), values


def group_estimates(experiment: Experiment, method: str, groups: list[list[Any]], device: str = "cpu",
                    **options: Any) -> torch.Tensor:
    """``[n_groups, n_test]`` predicted rise of each test measurement when each group is removed."""
    train, test = experiment.split.train, experiment.split.test
    if method in ("untrac", "untrac-inv"):
        given = {k: v for k, v in options.items() if v is not None}
        # UnTrac-Inv's defaults are its recipe (a few large-batch steps on the test set), as the catalogue lists
        config = build_arguments(InverseUnlearnConfig if method == "untrac-inv" else UnlearnConfig, method, given)
        untrac = UnTrac(experiment.task(), config, device)
        if method == "untrac":
            return untrac.group_effects(train, groups, test)
        # UnTrac-Inv scores groups for the test set as a whole: unlearn each class's test points in turn
        out = torch.zeros(len(groups), len(test), dtype=torch.float64)
        for c in sorted(set(test.labels.tolist())):
            cols = torch.nonzero(test.labels == c).flatten()
            out[:, cols] = untrac.inverse_group_effects(train, groups, test.subset(cols.tolist()))[:, None]
        return out
    attributor, attribution, _, _ = run_method(experiment, method, device=device, **options)
    if method == "synset-loo":
        return attributor.estimate_removals(groups, test).double()
    positions = train.group_positions(groups)
    return torch.stack([attribution.scores[:, rows].sum(1) for rows in positions]).double()


def check_partition(train: AttributionDataset, groups: list[list[Any]], argument: str = "groups") -> None:
    """Refuse groups that overlap or leave training examples out, naming a few of each (sources are disjoint
    and cover the training set)."""
    rows = train.group_positions(groups, argument)
    seen: dict[int, int] = {}
    overlapping = []
    for g, members in enumerate(rows):
        for r in members:
            if r in seen and seen[r] != g:
                overlapping.append(train.ids[r])
            seen[r] = g
    left_out = [train.ids[r] for r in range(len(train)) if r not in seen]
    if overlapping or left_out:
        problems = []
        if overlapping:
            problems.append(f"ids in more than one group: {overlapping[:5]}")
        if left_out:
            problems.append(f"{len(left_out)} ids in no group, e.g. {left_out[:5]}")
        raise TDAError(f"{argument} must partition the training set (every example in exactly one group); "
                       + "; ".join(problems))


def evaluate_groups(experiment: Experiment, method: str, k: int = 10, seeds: int = 3, seed: int = 0,
                    cache_dir: str | None = None, device: str = "cpu", groups: list[list[Any]] | None = None,
                    **options: Any) -> dict[str, Any]:
    """``group_pearson`` of ``method`` over ``k`` Dirichlet groups (or the given partition ``groups``) against
    leave-group-out retraining averaged over ``seeds`` paired seeds, with the per-class values and the estimate's
    seconds."""
    if groups is None:
        groups = dirichlet_groups(experiment.split.train, k, seed=seed)
    else:
        check_partition(experiment.split.train, groups)
        k = len(groups)
    retrainer = Retrainer(experiment, seeds=[experiment.config.seed + s for s in range(seeds)],
                          cache_dir=cache_dir, device=device)
    actual = retrainer.remove(groups).delta
    t0 = time.perf_counter()
    estimates = group_estimates(experiment, method, groups, device=device, **options)
    seconds = time.perf_counter() - t0
    mean, per_class = class_pearson(estimates, actual, experiment.split.test)
    return {"method": method, "groups": k, "group_sizes": [len(g) for g in groups], "group_pearson": mean,
            "group_pearson_per_class": per_class, "retrain_seeds": seeds, "seconds": seconds}
