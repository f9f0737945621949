"""Accuracy of every method on the built-in digits tasks, beside the peers measured in the same run.

LDS on digits-LR and digits-MLP (1,000 train / 300 test, 100 retrained 50% subsets, cached);
mislabel ROC-AUC and recall after inspecting 10% / 20% on digits-MLP with 10% flipped labels.

    python benchmarks/bench_accuracy.py [--json results.json] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from tda_explorer.evaluate import evaluate_method, lds, mislabel_auc, recall_at  # noqa: E402
from tda_explorer.experiments import build_experiment  # noqa: E402
from tda_explorer.retraining import subset_ground_truth  # noqa: E402

LDS_METHODS = ["grad-dot", "grad-cos", "tracin", ("trak", {}), ("trak", {"projection_dim": 512}),
               ("trak", {"ensemble": 5})]
MISLABEL_METHODS = ["grad-dot", "tracin", "trak", "suspicion"]


def _name(entry) -> tuple[str, dict]:
    return (entry, {}) if isinstance(entry, str) else entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=".tda_cache")
    args = parser.parse_args()
    rows = []
    for model in ("lr", "mlp"):
        exp = build_experiment(model, device=args.device)
        truth = subset_ground_truth(exp, cache_dir=args.cache_dir, device=args.device)
        for entry in LDS_METHODS:
            name, options = _name(entry)
            r = evaluate_method(exp, name, truth, device=args.device, **options)
            rows.append({"task": f"digits-{model}", "library": "tda_explorer", "method": name,
                         "options": ", ".join(f"{k}={v}" for k, v in options.items()), "lds": r["lds"],
                         "seconds": r["seconds"] + r["extra_training_seconds"]})
            if peers.available("dattri"):
                scores, secs = peers.dattri_scores(exp, name, ensemble=options.get("ensemble", 1))
                extra = 0.0 if not options.get("ensemble") else r["extra_training_seconds"]
                rows.append({"task": f"digits-{model}", "library": "dattri 0.3", "method": name,
                             "options": rows[-1]["options"], "lds": lds(scores, truth.masks, truth.measurements)[0],
                             "seconds": secs + extra})
            print(rows[-1], flush=True)
    noisy = build_experiment("mlp", noise=0.1, device=args.device)
    flipped = noisy.split.flipped
    for name in MISLABEL_METHODS:
        r = evaluate_method(noisy, name, None, device=args.device)
        rows.append({"task": "digits-mlp noise 10%", "library": "tda_explorer", "method": name, "options": "",
                     "mislabel_auc": r["mislabel_auc"], "recall_at_10": r["recall_at_10"],
                     "recall_at_20": r["recall_at_20"], "seconds": r["seconds"] + r["self_influence_seconds"]})
        print(rows[-1], flush=True)
    if peers.available("cleanlab"):
        score, secs = peers.cleanlab_suspicion(noisy)
        rows.append({"task": "digits-mlp noise 10%", "library": "cleanlab 2.9", "method": "confident learning",
                     "options": "5-fold out-of-fold", "mislabel_auc": mislabel_auc(score, flipped),
                     "recall_at_10": recall_at(score, flipped, 0.1), "recall_at_20": recall_at(score, flipped, 0.2),
                     "seconds": secs})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(df.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else df.to_string(index=False))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                               "when": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


def _has_tabulate() -> bool:
    return peers.available("tabulate")


if __name__ == "__main__":
    main()
