"""Removal estimators against actual retraining: synset leave-one-out beside influence functions (and data value
embedding on the SGD-trained MLP), on digits-LR and digits-MLP.

For each: LDS (100 retrained 50% subsets), single-example LOO Spearman (200 examples, same-seed paired
retraining = same batches without the example), group-removal Spearman (clusters, class halves, random groups
of 50, top-20 proponents of test points), and all-n LOO time against retraining all n single removals.

    python benchmarks/bench_removal.py [--json results.json] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tda_explorer.evaluate.harness import evaluate_method
from tda_explorer.experiments import build_experiment
from tda_explorer.retraining import subset_ground_truth

RUNS = {
    "lr": [("synset-loo", {}), ("synset-loo", {"per_class": 10}), ("if-explicit", {}), ("if-ekfac", {})],
    "mlp": [("synset-loo", {}), ("synset-loo", {"per_class": 10}), ("if-explicit", {}), ("if-astra", {}),
            ("if-ekfac", {}), ("dvemb", {})],
}
KEYS = ("lds", "loo_spearman", "group_removal_spearman", "group_removal_spearman_by_family", "seconds",
        "all_n_loo_seconds", "retrain_all_n_seconds", "speedup_vs_retraining", "tsloo_spearman")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=".tda_cache")
    args = parser.parse_args()
    rows = []
    for model, runs in RUNS.items():
        exp = build_experiment(model, device=args.device)
        truth = subset_ground_truth(exp, cache_dir=args.cache_dir, device=args.device)
        for name, options in runs:
            r = evaluate_method(exp, name, truth, device=args.device, validate_removal=True,
                                cache_dir=args.cache_dir, **options)
            rows.append({"task": f"digits-{model}", "method": name,
                         "options": ", ".join(f"{k}={v}" for k, v in options.items()),
                         **{k: r[k] for k in KEYS if k in r}})
            print(rows[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                               "threads": torch.get_num_threads(),
                                               "when": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
