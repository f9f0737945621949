"""Trajectory-exact attribution on digits: LDS against same-seed truth (the recorded run with the subset's
weights zeroed) and against paired fresh-seed truth, with their ceiling, for small (1%) and large (50%) drops,
on the smooth GELU MLP and the ReLU MLP; replay metagradients beside influence functions and TracIn on the same
replayed models and truths, in one run. Time is also given as a multiple of one training run.

    python benchmarks/bench_trajectory.py --json benchmarks/results/trajectory_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tda_explorer.evaluate import evaluate_method
from tda_explorer.experiments import build_experiment
from tda_explorer.retraining import removal_ground_truth, truth_ceiling

METHODS = [("magic", {}), ("source", {}), ("if-ekfac", {}), ("tracin", {}), ("trak", {})]


def source_rows(cache_dir: str) -> list[dict]:
    """SOURCE with L = 1, 3, 6 segments against EK-FAC influence (fresh-seed truth, half subsets), on the recipe's
    50-epoch MLP and on the same MLP trained 3 and 5 epochs (far from converged)."""
    from tda_explorer.evaluate import evaluate_method
    from tda_explorer.retraining import subset_ground_truth

    rows = []
    for epochs in (None, 5, 3):
        exp = build_experiment("mlp", epochs=epochs)
        truth = subset_ground_truth(exp, cache_dir=cache_dir)
        n_ckpt = len([c for c in exp.record.checkpoints if c.step > 0])
        for name, options in [("if-ekfac", {})] + [("source", {"segments": L}) for L in (1, 3, 6) if L <= n_ckpt]:
            r = evaluate_method(exp, name, truth, **options)
            row = {"model": "mlp", "epochs": exp.config.epochs, "method": name, "segments": options.get("segments"),
                   "lds": r["lds"], "seconds": r["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def group_rows(cache_dir: str) -> list[dict]:
    """Group attribution on digits-LR: 10 Dirichlet groups, Pearson against leave-group-out retraining over 3
    paired seeds, for UnTrac, UnTrac-Inv and the group sums / removals of other methods."""
    from tda_explorer.evaluate.groups import evaluate_groups

    exp = build_experiment("lr")
    rows = []
    for name, options in [("untrac", {}), ("untrac-inv", {"lr": 1e-2, "batch_size": 256, "epochs": 5}),
                          ("if-ekfac", {}), ("if-explicit", {}), ("synset-loo", {}), ("grad-dot", {})]:
        r = evaluate_groups(exp, name, 10, cache_dir=cache_dir, **options)
        row = {"model": "lr", "method": name, "options": options, "groups": 10, "group_pearson": r["group_pearson"],
               "seconds": r["seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--models", default="mlp-gelu,mlp")
    parser.add_argument("--fractions", default="0.01,0.5")
    parser.add_argument("--n-subsets", type=int, default=100)
    parser.add_argument("--cache-dir", default=".tda_cache")
    parser.add_argument("--only", choices=["replay", "source", "groups"], default=None)
    args = parser.parse_args()
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    if args.only in (None, "source"):
        result["source"] = source_rows(args.cache_dir)
    if args.only in (None, "groups"):
        result["groups"] = group_rows(args.cache_dir)
    if args.only in ("source", "groups"):
        path.write_text(json.dumps(result, indent=2))
        return
    rows = []
    for model in args.models.split(","):
        exp = build_experiment(model).replayed()
        for fraction in (float(f) for f in args.fractions.split(",")):
            same = removal_ground_truth(exp, args.n_subsets, fraction, same_seed=True, cache_dir=args.cache_dir)
            fresh = removal_ground_truth(exp, args.n_subsets, fraction, same_seed=False, cache_dir=args.cache_dir)
            ceiling = truth_ceiling(same, fresh)
            for name, options in METHODS:
                r = evaluate_method(exp, name, same, other_truths={"fresh_seed": fresh}, **options)
                row = {"model": model, "fraction_removed": fraction, "method": name, "lds_same_seed": r["lds"],
                       "lds_fresh_seed": r["lds_fresh_seed"], "truth_ceiling": ceiling, "seconds": r["seconds"],
                       "metasmoothness": r.get("metasmoothness"),
                       "seconds_vs_training_run": r.get("seconds_vs_training_run")}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result["rows"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
