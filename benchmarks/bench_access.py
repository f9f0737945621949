"""Limited access and fine-tuned models on digits, each figure beside its baseline in the same run:

- proxies: Grad-Dot, TRAK and EK-FAC on each proxy of the MLP (hparams, distill, small, init), LDS against the
  *target's* truth beside the same method on the target, agreement of the two score matrices, and mislabel AUC
  (10% flipped labels) beside the target's;
- further training (final model only): each method's cosine with the further-training truth against the amount
  of further training (also drawn as a plotly figure, assets/further_training.html);
- the planted backdoor: AUC and recall@20 of the poisoned images, plain and with debias and denoise.

    python benchmarks/bench_access.py --json benchmarks/results/access_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tda_explorer.evaluate.harness import run_method
from tda_explorer.evaluate.proxies import evaluate_proxy
from tda_explorer.experiments import build_experiment
from tda_explorer.experiments.backdoor import evaluate_backdoor
from tda_explorer.retraining import subset_ground_truth
from tda_explorer.retraining.further_training import further_training_cosine, further_training_truth

PROXY_METHODS = ("grad-dot", "trak", "if-ekfac")
CURVE_METHODS = ("grad-dot", "tracin", "trak", "if-ekfac", "if-explicit")


def proxy_rows(cache_dir: str) -> list[dict]:
    clean, noisy = build_experiment("mlp"), build_experiment("mlp", noise=0.1)
    truth = subset_ground_truth(clean, cache_dir=cache_dir)
    rows = []
    for method in PROXY_METHODS:
        for kind in ("distill", "hparams", "small", "init"):
            r = evaluate_proxy(clean, method, kind, truth)
            m = evaluate_proxy(noisy, method, kind)
            row = {"method": method, "proxy": kind, "access": r["access"], "lds": r["lds"],
                   "target_lds": r["target_lds"], "lds_ratio": r["lds"] / r["target_lds"],
                   "proxy_score_spearman": r["proxy_score_spearman"], "mislabel_auc": m["mislabel_auc"],
                   "target_mislabel_auc": m["target_mislabel_auc"], "proxy_test_accuracy": r["proxy_test_accuracy"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def curve_rows(epochs: list[int], seeds: int) -> list[dict]:
    exp = build_experiment("mlp")
    train = exp.split.train
    ids = [train.ids[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:50].tolist()]
    scores = {m: run_method(exp, m)[1].scores for m in CURVE_METHODS}
    rows = []
    for t in epochs:
        truth = further_training_truth(exp.task(), train, exp.split.test, ids, t, lr=0.1 * exp.config.lr,
                                       batch_size=exp.config.batch_size, seeds=range(seeds))
        for method, s in scores.items():
            row = {"epochs": t, "method": method, "cosine": further_training_cosine(s, train, truth)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def ensemble_rows(cache_dir: str, model: str = "mlp") -> list[dict]:
    """TRAK ensembles on digits-``model``: independent models, dropout masks on the trained model (``mlp``: Dropout
    added after training; ``mlp-dropout``: the recipe's model, trained with Dropout(0.1) before its last layer),
    both combined, LoRA adapters. Training seconds beyond the attributed model, as the engine trains extra members
    (in lock-step) and as independent runs would (members − 1 times one model's training)."""
    import time

    from tda_explorer import AttributionTask
    from tda_explorer.compute.methods import get_method
    from tda_explorer.compute.methods.plan import fitted_bytes as stored_bytes
    from tda_explorer.compute.training.lora import add_dropout
    from tda_explorer.compute.training.train import train_model
    from tda_explorer.evaluate import lds
    from tda_explorer.evaluate.harness import method_options

    exp = build_experiment(model)
    train, test = exp.split.train, exp.split.test
    truth = subset_ground_truth(exp, cache_dir=cache_dir)
    started = time.perf_counter()
    train_model(exp.factory, train.inputs, train.labels, exp.config)
    one_model = time.perf_counter() - started
    rows = []

    def add(kind, size, masks, method, training_seconds):
        started = time.perf_counter()
        scores = method.fit(train).attribute(test).scores
        row = {"model": model, "ensemble": kind, "members": size, "masks": masks,
               "lds": lds(scores, truth.masks, truth.measurements)[0], "training_seconds": training_seconds,
               "independent_runs_training_seconds": (size - 1) * one_model if kind != "lora" else None,
               "attribution_seconds": time.perf_counter() - started,
               "stored_bytes": stored_bytes(method) if kind != "lora" else method.stored_bytes_,
               "one_model_training_seconds": one_model}
        if kind == "lora":
            row["training_seconds"] = method.training_seconds_
            row["attribution_seconds"] -= method.training_seconds_
        rows.append(row)
        print(json.dumps(row), flush=True)

    for k in (1, 2, 5, 10):
        options, extra = method_options(exp, "trak", ensemble=k)
        add("independent", k, 1, get_method("trak", exp.task(), **options), extra)  # k − 1 more models, lock-step
    trained_with_dropout = any(isinstance(m, torch.nn.Dropout) for m in exp.record.model)
    dropout_model = exp.record.model if trained_with_dropout else add_dropout(exp.record.model, 0.1)
    dropout_task = AttributionTask(dropout_model, weight_decay=exp.config.weight_decay)
    for m in (5, 10, 20):
        add("dropout", 1, m, get_method("trak", dropout_task, dropout_masks=m), 0.0)
    if trained_with_dropout:  # the general form: K independent models × M masks each
        for m in (5, 10):
            options, extra = method_options(exp, "trak", ensemble=2)
            add("independent+dropout", 2, m, get_method("trak", exp.task(), dropout_masks=m, **options), extra)
    for m in (5, 10):
        add("lora", m, 1, get_method("lora-ensemble", exp.task(), members=m, rank=10, epochs=1), 0.0)
    return rows


def backdoor_rows() -> list[dict]:
    rows = []
    for method in ("grad-dot", "if-ekfac", "trak", "tracin"):
        r = evaluate_backdoor(method)
        row = {k: r[k] for k in ("method", "attack_success", "backdoor_auc", "backdoor_auc_dda", "recall_at_20",
                                 "recall_at_20_dda")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def draw_curve(rows: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in CURVE_METHODS:
        points = [r for r in rows if r["method"] == method]
        fig.add_trace(go.Scatter(x=[r["epochs"] for r in points], y=[r["cosine"] for r in points],
                                 mode="lines+markers", name=method))
    fig.update_layout(title="Agreement with further training from the final model (digits-MLP, 50 examples)",
                      xaxis_title="epochs of further training", yaxis_title="mean cosine with τ_FT",
                      xaxis_type="log", height=420)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--cache-dir", default=".tda_cache")
    parser.add_argument("--epochs", default="1,2,5,10,20")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only", choices=["ensembles"], default=None)
    args = parser.parse_args()
    path = Path(args.json)
    if args.only == "ensembles":
        result = json.loads(path.read_text()) if path.exists() else {}
        result["ensembles"] = ensemble_rows(args.cache_dir)
        result["ensembles_mlp_dropout"] = ensemble_rows(args.cache_dir, "mlp-dropout")
        path.write_text(json.dumps(result, indent=2))
        return
    result = {"threads": torch.get_num_threads(), "proxies": proxy_rows(args.cache_dir)}
    result["further_training"] = curve_rows([int(e) for e in args.epochs.split(",")], args.seeds)
    draw_curve(result["further_training"], Path("assets/further_training.html"))
    result["backdoor"] = backdoor_rows()
    result["ensembles"] = ensemble_rows(args.cache_dir)
    result["ensembles_mlp_dropout"] = ensemble_rows(args.cache_dir, "mlp-dropout")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
