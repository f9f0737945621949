"""Valuation, selection and fact tracing, each beside its baseline in the same run:

- LAVA on digits with 10% flipped labels (seeds 0–2): mislabel AUC, recall and seconds, beside the no-label-term
  ablation, cleanlab's confident-learning self-confidence on the same out-of-fold probabilities as ``suspicion``,
  and ``suspicion`` with and without LAVA added (z-scores summed) — the measurement that decides whether LAVA
  joins the suspicion score;
- LESS on the planted pool (seeds 0–2): target accuracy of the selection against a random selection of the same
  size and the full pool;
- fact tracing (seeds 0–2, one trained LM per seed shared by the methods): F1 of TrackStar, two-stage tracing
  (MiniLM verifier, and the LM's gradient verifier), TracIn and BM25, and each method's seconds as a ratio to
  TracIn's on the same LM.

    python benchmarks/bench_valuation.py --json benchmarks/results/valuation_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tda_explorer.compute.valuation.lava import LAVA
from tda_explorer.evaluate import mislabel_auc, recall_at
from tda_explorer.evaluate.harness import run_method
from tda_explorer.evaluate.valuation import evaluate_lava
from tda_explorer.experiments import build_experiment
from tda_explorer.experiments.facts import TRACING_METHODS, build_fact_experiment, evaluate_tracing
from tda_explorer.experiments.planted_pool import evaluate_selection

PARTS = ("lava", "less", "facts")


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


def fact_rows(seeds: list[int]) -> list[dict]:
    """Every tracing method on one trained fact LM per seed; two-stage tracing also with MiniLM in float32 and with
    the LM's gradient verifier."""
    rows = []
    for seed in seeds:
        experiment = build_fact_experiment(seed)
        runs = [(m, "auto", "auto") for m in TRACING_METHODS] + [("fasttrack", "auto", "minilm"),
                                                                   ("fasttrack", "gradient", "auto")]
        facts = [evaluate_tracing(m, seed=seed, verifier=v, embedding=e, experiment=experiment) for m, v, e in runs]
        tracin = next(r for r in facts if r["method"] == "tracin")["seconds"]
        for row in facts:
            row.update(seed=seed, seconds_ratio_to_tracin=row["seconds"] / tracin)
            print(json.dumps({k: row.get(k) for k in ("seed", "method", "verifier", "f1", "precision", "recall",
                                                      "seconds", "seconds_ratio_to_tracin", "stage1_recall")}),
                  flush=True)
        rows += facts
    return rows


def facts_summary(rows: list[dict]) -> dict[str, float]:
    """Mean F1 and time ratio to TracIn per method (two-stage tracing per verifier) over the seeds."""
    label = lambda r: r["method"] + (f"[{r['verifier']}]" if "verifier" in r else "")
    return {f"facts {name} {key}": float(np.mean([r[key] for r in rows if label(r) == name]))
            for name in dict.fromkeys(map(label, rows)) for key in ("f1", "seconds_ratio_to_tracin")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measure only these parts; the others are kept from an existing --json file")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    result: dict = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    if "lava" in args.parts:
        result["lava"] = lava_rows(seeds)
    if "less" in args.parts:
        result["less"] = []
        for seed in seeds:
            row = evaluate_selection("less", seed=seed)
            result["less"].append(row)
            print(json.dumps({k: row[k] for k in ("target_acc_selected", "target_acc_random", "target_acc_full",
                                                  "selected_precision")}), flush=True)
    if "facts" in args.parts:
        result["facts"] = fact_rows(seeds)
    missing = [part for part in PARTS if part not in result]
    if missing:
        raise SystemExit(f"no figures for {missing}: measure them (--parts) or name a --json file holding them")
    result["summary"] = {
        "lava_auc_mean": float(np.mean([r["mislabel_auc"] for r in result["lava"]])),
        "lava_no_label_term_auc_mean": float(np.mean([r["no_label_term_mislabel_auc"] for r in result["lava"]])),
        "suspicion_auc_mean": float(np.mean([r["suspicion_auc"] for r in result["lava"]])),
        "suspicion_plus_lava_auc_mean": float(np.mean([r["suspicion_plus_lava_auc"] for r in result["lava"]])),
        "less_minus_random_points": float(np.mean([100 * (r["target_acc_selected"] - r["target_acc_random"])
                                                   for r in result["less"]])),
        **facts_summary(result["facts"]),
    }
    print(json.dumps(result["summary"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
