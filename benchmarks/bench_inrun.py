"""In-Run Data Shapley on digits with 10% flipped labels: the values as a mislabel ranking (lowest first), and
training throughput with the recorder on as a ratio to the same run without it (both measured here).

    python benchmarks/bench_inrun.py --json benchmarks/results/inrun_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tda_explorer.compute.inrun_shapley import InRunShapley
from tda_explorer.compute.training import train_weighted
from tda_explorer.evaluate import build_experiment, mislabel_auc, recall_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--n-validation", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for model in ("mlp", "mlp-gelu"):
        exp = build_experiment(model, noise=0.1)
        train, test = exp.split.train, exp.split.test
        validation = test.subset(range(args.n_validation), name="validation")  # fixed before training
        ones = torch.ones(1, len(train))
        t0 = time.perf_counter()
        train_weighted(exp.factory, train.inputs, train.labels, ones, exp.config, [exp.config.seed])
        plain = time.perf_counter() - t0
        for second_order in (False, True):
            shapley = InRunShapley(exp.task(), train, validation, min(exp.config.batch_size, len(train)),
                                   second_order=second_order)
            t0 = time.perf_counter()
            train_weighted(exp.factory, train.inputs, train.labels, ones, exp.config, [exp.config.seed],
                           callback=shapley)
            recorded = time.perf_counter() - t0
            suspicion = -shapley.values  # harmful (negative value) first
            row = {"model": model, "order": 2 if second_order else 1, "mislabel_auc": mislabel_auc(suspicion,
                   exp.split.flipped), "recall_at_10": recall_at(suspicion, exp.split.flipped, 0.1),
                   "recall_at_20": recall_at(suspicion, exp.split.flipped, 0.2), "plain_seconds": plain,
                   "recorded_seconds": recorded, "throughput_ratio": plain / recorded, "steps": shapley.steps}
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
