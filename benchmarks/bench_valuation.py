"""Valuation, selection and fact tracing, each beside its baseline in the same run:

- LAVA on digits with 10% flipped labels (seeds 0–2): mislabel AUC, recall and seconds, beside the no-label-term
  ablation, cleanlab's confident-learning self-confidence on the same out-of-fold probabilities as ``suspicion``,
  and ``suspicion`` with and without LAVA added (z-scores summed) — the measurement that decides whether LAVA
  joins the suspicion score;
- LESS on the planted pool (seeds 0–2): target accuracy of the selection against a random selection of the same
  size and the full pool;
- fact tracing (seed 0): F1 of TrackStar, two-stage tracing, TracIn and BM25, and each method's seconds as a
  ratio to TracIn's.

    python benchmarks/bench_valuation.py --json benchmarks/results/valuation_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tda_explorer.compute.lava import LAVA
from tda_explorer.evaluate import build_experiment, mislabel_auc, recall_at
from tda_explorer.evaluate.facts import TRACING_METHODS, evaluate_tracing
from tda_explorer.evaluate.harness import run_method
from tda_explorer.evaluate.selection import evaluate_selection
from tda_explorer.evaluate.valuation import evaluate_lava


def _z(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / t.std()


def lava_rows(seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        exp = build_experiment("mlp", noise=0.1, seed=seed)
        flipped = exp.split.flipped
        row = {"seed": seed, **evaluate_lava(exp)}
        attributor, _, _, _ = run_method(exp, "suspicion")
        suspicion = attributor.self_influence().double()
        lava = -LAVA(model=exp.record.model).fit(exp.split.train, exp.split.test).values_.double()
        labels = exp.split.train.labels
        self_confidence = -attributor.oof_.double()[torch.arange(len(labels)), labels]  # cleanlab's default rank
        for name, score in (("suspicion", suspicion), ("suspicion_plus_lava", _z(suspicion) + _z(lava)),
                            ("oof_self_confidence", self_confidence)):
            row.update({f"{name}_auc": mislabel_auc(score, flipped), f"{name}_recall_at_10":
                        recall_at(score, flipped, 0.1)})
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    result: dict = {"lava": lava_rows(seeds)}
    result["less"] = []
    for seed in seeds:
        row = evaluate_selection("less", seed=seed)
        result["less"].append(row)
        print(json.dumps({k: row[k] for k in ("target_acc_selected", "target_acc_random", "target_acc_full",
                                              "selected_precision")}), flush=True)
    facts = {m: evaluate_tracing(m) for m in TRACING_METHODS}
    for row in facts.values():
        row["seconds_ratio_to_tracin"] = row["seconds"] / facts["tracin"]["seconds"]
        print(json.dumps({k: row.get(k) for k in ("method", "f1", "precision", "recall", "seconds",
                                                  "seconds_ratio_to_tracin", "stage1_recall")}), flush=True)
    result["facts"] = list(facts.values())
    result["summary"] = {
        "lava_auc_mean": float(np.mean([r["mislabel_auc"] for r in result["lava"]])),
        "lava_no_label_term_auc_mean": float(np.mean([r["no_label_term_mislabel_auc"] for r in result["lava"]])),
        "suspicion_auc_mean": float(np.mean([r["suspicion_auc"] for r in result["lava"]])),
        "suspicion_plus_lava_auc_mean": float(np.mean([r["suspicion_plus_lava_auc"] for r in result["lava"]])),
        "less_minus_random_points": float(np.mean([100 * (r["target_acc_selected"] - r["target_acc_random"])
                                                   for r in result["less"]])),
    }
    print(json.dumps(result["summary"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
