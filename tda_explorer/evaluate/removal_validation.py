"""Removal estimators against actual retraining: single examples, clusters, random groups, top-k proponents.

Any attributor can be checked: one with ``estimate_removals`` (synset leave-one-out) predicts each group's
effect directly; any other is taken as additive, a group's predicted effect the sum of its members' scores.
The truth is the retraining engine's same-seed paired retraining (``Retrainer``), cached on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from tda_explorer.compute.engine.attribution import Attribution
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.removal import LOOGroundTruth, loo_correlation
from tda_explorer.retraining.retrainer import Retrainer


def removal_groups(experiment: Experiment, attribution: Attribution, cluster_of: torch.Tensor | None = None,
                   n_random: int = 10, size: int = 50, n_topk: int = 10, k: int = 20,
                   seed: int = 0) -> list[tuple[str, list[Any], int | None]]:
    """Groups as ``(family, train ids, target test position or None for the mean over the test set)``:
    clusters (every 10th when ``cluster_of`` is given), whole-class halves, random groups, and the top-k
    proponents of ``n_topk`` test points."""
    train, test = experiment.split.train, experiment.split.test
    ids = train.ids
    gen = torch.Generator().manual_seed(seed)
    groups: list[tuple[str, list[Any], int | None]] = []
    if cluster_of is not None:
        for c in range(0, int(cluster_of.max()) + 1, 10):
            groups.append(("cluster", [ids[i] for i in torch.nonzero(cluster_of == c).flatten().tolist()], None))
    for c in sorted(set(train.labels.tolist())):
        members = torch.nonzero(train.labels == c).flatten().tolist()
        groups.append(("class half", [ids[i] for i in members[: len(members) // 2]], None))
    for _ in range(n_random):
        groups.append(("random", [ids[i] for i in torch.randperm(len(train), generator=gen)[:size].tolist()], None))
    for j in torch.randperm(len(test), generator=gen)[:n_topk].tolist():
        top = attribution.scores[j].argsort(descending=True)[:k].tolist()
        groups.append(("top-k proponents", [ids[i] for i in top], j))
    return groups


def _predicted(attributor: Attributor, attribution: Attribution, experiment: Experiment,
               groups: list[list[Any]]) -> torch.Tensor:
    """``[n_groups, n_test]`` predicted changes of each test measurement."""
    if hasattr(attributor, "estimate_removals"):
        return attributor.estimate_removals(groups, experiment.split.test).double()
    positions = [experiment.split.train.positions(g, "groups") for g in groups]
    return torch.stack([attribution.scores[:, p].double().sum(1) for p in positions])


def single_removal_spearman(experiment: Experiment, attribution: Attribution, retrainer: Retrainer,
                            n_loo: int = 200, seed: int = 0) -> tuple[float, float]:
    """Mean over test points of the Spearman correlation between scores and the actual change of the test
    measurement when each of ``n_loo`` random training examples is removed (paired same-seed retraining: the
    same batches without the example, i.e. trajectory-specific leave-one-out); and the retraining seconds."""
    train = experiment.split.train
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_loo].tolist()
    t0 = time.perf_counter()
    loo = retrainer.remove([[train.ids[i]] for i in rows])
    seconds = loo.seconds if loo.seconds > 0 else time.perf_counter() - t0
    return loo_correlation(attribution, LOOGroundTruth(rows, loo.delta)), seconds


def validate_removals(experiment: Experiment, attributor: Attributor, attribution: Attribution,
                      n_loo: int = 200, cache_dir: str | Path | None = None, device: str = "cpu",
                      seed: int = 0) -> dict[str, Any]:
    """``loo_spearman`` (single examples), ``group_removal_spearman`` (pooled and per family) and the time of the
    estimator's all-n leave-one-out against retraining (``speedup_vs_retraining``)."""
    retrainer = Retrainer(experiment, cache_dir=cache_dir, device=device)
    train = experiment.split.train
    value, retrain_seconds = single_removal_spearman(experiment, attribution, retrainer, n_loo, seed)
    result: dict[str, Any] = {"loo_spearman": value, "loo_examples": n_loo}

    cluster_of = getattr(getattr(attributor, "synset_", None), "cluster_of", None)
    groups = removal_groups(experiment, attribution, cluster_of)
    predicted = _predicted(attributor, attribution, experiment, [g for _, g, _ in groups])
    truth = retrainer.remove([g for _, g, _ in groups]).delta
    pick = lambda d, target: float(d.mean()) if target is None else float(d[target])  # noqa: E731
    pred = np.array([pick(predicted[i], t) for i, (_, _, t) in enumerate(groups)])
    true = np.array([pick(truth[i], t) for i, (_, _, t) in enumerate(groups)])
    result["group_removal_spearman"] = float(spearmanr(pred, true).statistic)
    families = sorted({f for f, _, _ in groups})
    result["group_removal_spearman_by_family"] = {
        f: float(spearmanr(pred[m], true[m]).statistic) if (m := np.array([g[0] == f for g in groups])).sum() > 2
        else None for f in families
    }
    # all-n leave-one-out: the estimator's attribution time against retraining every single-example removal
    t0 = time.perf_counter()
    attributor.attribute(experiment.split.test)
    online = time.perf_counter() - t0
    result["retrain_all_n_seconds"] = retrain_seconds / n_loo * len(train)  # measured on n_loo, per model
    result["all_n_loo_seconds"] = online
    result["speedup_vs_retraining"] = result["retrain_all_n_seconds"] / online
    return result
