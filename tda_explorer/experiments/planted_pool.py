"""The planted-pool check of targeted selection: does training on LESS's selection beat a random selection of the
same size on the target task?"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.selection.less import WarmupConfig, select
from tda_explorer.compute.training.train import TrainConfig, stacked_outputs, train_ensemble
from tda_explorer.data.planted import PlantedPool, load_planted_pool

#: How the evaluation models are trained on a selection (or on the whole pool): an MLP with Adam.
SELECTION_TRAINING = TrainConfig(epochs=100, batch_size=32, lr=1e-2, weight_decay=1e-3, optimizer="adam")


def target_accuracy(planted: PlantedPool, rows: torch.Tensor, seeds: list[int], model: str = "mlp",
                    config: TrainConfig = SELECTION_TRAINING, device: str = "cpu") -> list[float]:
    """Train one model per row of pool positions ``rows`` ``[M, k]`` (seed per row, in lock-step); their accuracy on
    the held-out target test set."""
    pool = planted.pool
    factory = lambda seed: make_model(model, pool.inputs.shape[1], pool.n_classes, seed=seed)
    stacked = train_ensemble(factory, pool.inputs, pool.labels, rows, config, seeds, device=device)
    outputs = stacked_outputs(factory(0).to(device), stacked, planted.target_test.inputs.to(device))
    return (outputs.argmax(-1).cpu() == planted.target_test.labels).float().mean(1).tolist()


def evaluate_selection(method: str = "less", fraction: float = 0.05, seed: int = 0, n_seeds: int = 3,
                       device: str = "cpu", **select_options: Any) -> dict[str, Any]:
    """LESS on the planted pool (target: inverted digits, its 20 examples' classes as subtasks) against a random
    selection of the same size and the full pool, ``n_seeds`` training seeds each.

    Returns ``target_acc_selected``, ``target_acc_random``, ``target_acc_full`` (means; ``*_per_seed`` lists),
    ``selected_precision`` (share of the selection from the target's source), the same two figures for the paper's
    max-score allocation (``*_max_allocation``) and the selection's ``seconds``.
    """
    if method != "less":
        raise ValueError(f"the planted-pool scenario evaluates method 'less', got {method!r}")
    planted = load_planted_pool(seed=seed)
    pool, source = planted.pool, np.array(planted.source)
    seeds = [seed + s for s in range(n_seeds)]
    subtasks = planted.target.labels.tolist()
    model = make_model("mlp", pool.inputs.shape[1], pool.n_classes, seed=seed)
    result: dict[str, Any] = {"method": method, "scenario": "planted-pool", "pool": len(pool),
                              "sources": sorted(set(planted.source)), "target_source": planted.target_source,
                              "n_target": len(planted.target), "fraction": fraction, "seeds": seeds}
    for allocation, suffix in (("per-subtask", ""), ("max", "_max_allocation")):
        t0 = time.perf_counter()
        table = select(model, pool, planted.target, fraction, subtasks=subtasks, allocation=allocation,
                       warmup_config=WarmupConfig(seed=seed), projection_dim=1024, device=device, **select_options)
        seconds = time.perf_counter() - t0
        rows = torch.tensor(pool.positions(table["train_id"].tolist()))
        accuracy = target_accuracy(planted, rows.expand(n_seeds, -1), seeds, device=device)
        result.update({f"target_acc_selected{suffix}": float(np.mean(accuracy)),
                       f"target_acc_selected{suffix}_per_seed": accuracy,
                       f"selected_precision{suffix}": float(np.mean(source[rows.numpy()] == planted.target_source)),
                       f"seconds{suffix}": seconds})
    k = len(rows)
    random_rows = torch.stack([torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + s))[:k]
                               for s in seeds])
    accuracy = target_accuracy(planted, random_rows, seeds, device=device)
    result.update(target_acc_random=float(np.mean(accuracy)), target_acc_random_per_seed=accuracy,
                  random_precision=float(np.mean(source[random_rows.numpy()] == planted.target_source)))
    accuracy = target_accuracy(planted, torch.arange(len(pool)).expand(n_seeds, -1), seeds, device=device)
    result.update(target_acc_full=float(np.mean(accuracy)), target_acc_full_per_seed=accuracy, n_selected=k)
    return result
