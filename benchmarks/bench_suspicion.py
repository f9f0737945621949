"""``suspicion`` beside its baselines on every noisy task, in the same run on the same models:

- ``suspicion`` at the catalogue's defaults (−log out-of-fold probability of the given label − log the model's own,
  ``signal="loss"``; 5 folds × 3 repeats) and with ``signal="self-influence"`` (+ log TracIn self-influence instead of
  the model's loss; the old default), on the same out-of-fold probabilities;
- cleanlab's self-confidence ranking on the *same* out-of-fold probabilities (1 − p_oof(given label); cleanlab's
  ``get_label_quality_scores`` default, computed here so cleanlab need not be installed);
- the training loss of the attributed model at the given label (the baseline every ranking is shown beside);
- TracIn self-influence alone (suspicion's other signal).

Tasks: the built-in digits experiments with 10% flipped labels (``build_experiment``: lr, mlp, mlp-gelu, mlp-dropout;
seeds 0–2) and, when ``tda_explorer.experiments.zoo`` is there, every zoo task with label noise (``--zoo``). Rows
``{task, seed, ranking, mislabel_auc, recall_at_10}`` go to ``--json`` after each task.

    python benchmarks/bench_suspicion.py --json benchmarks/results/suspicion_cpu.json [--zoo] [--seeds 3]
    python benchmarks/bench_suspicion.py --table benchmarks/results/suspicion_cpu.json   # the README's table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tda_explorer.evaluate.harness import run_method, training_loss
from tda_explorer.evaluate.metrics import mislabel_auc, recall_at
from tda_explorer.experiments import build_experiment

DIGITS = ("lr", "mlp", "mlp-gelu", "mlp-dropout")


def rankings(experiment) -> tuple[dict[str, torch.Tensor], float]:
    """Each ranking's score (higher = more suspicious) on ``experiment``, and suspicion's seconds."""
    t0 = time.perf_counter()
    attributor, _, _, _ = run_method(experiment, "suspicion")
    suspicion = attributor.self_influence().double()
    seconds = time.perf_counter() - t0
    labels = experiment.split.train.labels
    p_given = attributor.oof_.double().cpu()[torch.arange(len(labels)), labels]
    tracin = attributor.base.self_influence().double()
    return {"suspicion": suspicion, "suspicion (self-influence)": tracin.clamp_min(1e-30).log() - p_given.log(),
            "self-confidence": 1 - p_given, "training loss": training_loss(experiment).double(),
            "tracin self-influence": tracin}, seconds


def task_rows(name: str, seed: int, experiment) -> list[dict]:
    flipped = experiment.split.flipped
    scores, seconds = rankings(experiment)
    rows = [{"task": name, "seed": seed, "ranking": ranking, "mislabel_auc": mislabel_auc(score, flipped),
             "recall_at_10": recall_at(score, flipped, 0.1), "n_train": len(flipped), "n_flipped": int(flipped.sum()),
             **({"suspicion_seconds": seconds} if ranking == "suspicion" else {})}
            for ranking, score in scores.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per task: suspicion minus self-confidence and minus the training loss (AUC and recall@10%), per seed."""
    out = []
    for task, seed in dict.fromkeys((r["task"], r["seed"]) for r in rows):
        by = {r["ranking"]: r for r in rows if r["task"] == task and r["seed"] == seed}
        s = by["suspicion"]
        out.append({"task": task, "seed": seed, **{
            f"{key}_minus_{other.replace(' ', '_').replace('-', '_')}": s[key] - by[other][key]
            for other in ("self-confidence", "training loss") for key in ("mislabel_auc", "recall_at_10")}})
    return out


RANKINGS = ("suspicion", "suspicion (self-influence)", "self-confidence", "training loss", "tracin self-influence")


def table(result: dict) -> str:
    """Markdown: per task and seed, each ranking's ROC-AUC / recall@10% and suspicion's margin over self-confidence
    (bold where suspicion is behind)."""
    out = ["| task | seed | flipped | " + " | ".join(RANKINGS) + " | suspicion − self-confidence |",
           "| --- | --- | --- | " + " | ".join("---" for _ in RANKINGS) + " | --- |"]
    for task, seed in dict.fromkeys((r["task"], r["seed"]) for r in result["rows"]):
        by = {r["ranking"]: r for r in result["rows"] if r["task"] == task and r["seed"] == seed}
        cells = [f"{by[k]['mislabel_auc']:.4f} / {by[k]['recall_at_10']:.2f}" for k in RANKINGS]
        d_auc = by["suspicion"]["mislabel_auc"] - by["self-confidence"]["mislabel_auc"]
        d_rec = by["suspicion"]["recall_at_10"] - by["self-confidence"]["recall_at_10"]
        margin = " / ".join(f"**{d:+.{n}f}**" if d < -1e-12 else f"{d:+.{n}f}" for d, n in ((d_auc, 4), (d_rec, 2)))
        out.append(f"| {task} | {seed} | {by['suspicion']['n_flipped']} of {by['suspicion']['n_train']} | "
                   + " | ".join(cells) + f" | {margin} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(DIGITS), help="built-in digits models (none: skip)")
    parser.add_argument("--zoo", action="store_true", help="also every zoo task with label noise")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a result file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    path = Path(args.json) if args.json else None
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}

    def save() -> None:
        result["summary"] = summary(result["rows"])
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))

    for model in args.models:
        for seed in range(args.seeds):
            result["rows"] += task_rows(f"digits-{model} noise 10%", seed,
                                        build_experiment(model, noise=0.1, seed=seed))
            save()
    if args.zoo:
        from tda_explorer.experiments.zoo import build_zoo_task, zoo_tasks

        for spec in zoo_tasks():
            if spec.noise != "none":
                result["rows"] += task_rows(f"zoo {spec.name} ({spec.noise})", spec.seed, build_zoo_task(spec))
                save()
    save()
    for s in result["summary"]:
        print(json.dumps(s))


if __name__ == "__main__":
    main()
