"""Render benchmarks/results/*.json as the markdown tables of benchmarks/README.md.

    python benchmarks/report.py > /tmp/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def fmt(value, digits: int = 3) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def accuracy_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    lds_rows = [r for r in data["rows"] if "lds" in r]
    mis_rows = [r for r in data["rows"] if "mislabel_auc" in r]
    out = [f"### Accuracy ({path.stem}, torch {data.get('torch', '?')}, device {data.get('device', '?')})", "",
           "| task | method | options | library | LDS | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['task']} | {r['method']} | {r['options']} | {r['library']} | {fmt(r['lds'])} | "
            f"{fmt(r['seconds'], 2)} |" for r in lds_rows]
    out += ["", "| task | method | library | ROC-AUC | recall@10% | recall@20% | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['task']} | {r['method']} | {r['library']} | {fmt(r['mislabel_auc'], 4)} | "
            f"{fmt(r['recall_at_10'], 2)} | {fmt(r['recall_at_20'], 2)} | {fmt(r['seconds'], 2)} |" for r in mis_rows]
    return "\n".join(out)


def speed_table(path: Path) -> str:
    data = json.loads(path.read_text())
    where = data.get("gpu") or f"CPU, {data.get('threads')} threads"
    out = [f"### Speed ({path.stem}: {where}, torch {data.get('torch', '?')})", "",
           "| task | what | library | seconds | × one plain epoch | ours / dattri |",
           "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['task']} | {r['what']} | {r['library']} | {fmt(r['seconds'], 3)} | {fmt(r['ratio_to_epoch'], 2)} | "
            f"{fmt(r.get('ours_over_peer'), 3)} |" for r in data["rows"]]
    return "\n".join(out)


def influence_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    where = data.get("gpu") or f"CPU, {data.get('threads')} threads"
    out = [f"### Influence functions ({path.stem}: {where}, torch {data.get('torch', '?')})", "",
           "| task | method | options | library | LDS | seconds | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['task']} | {r['method']} | {r['options']} | {r['library']} | {fmt(r['lds'])} | "
            f"{fmt(r['seconds'], 2)} | {r.get('error', '')} |" for r in data["lds_rows"]]
    if data["speed_rows"]:
        out += ["", "| task | what | library | seconds | × one plain epoch |", "| --- | --- | --- | --- | --- |"]
        out += [f"| {r['task']} | {r['what']} | {r['library']} | {fmt(r['seconds'], 2)} | "
                f"{fmt(r['ratio_to_epoch'], 2)} |" for r in data["speed_rows"]]
    return "\n".join(out)


def removal_table(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"### Removal estimators against retraining ({path.stem}: CPU, {data.get('threads')} threads)", "",
           "| task | method | options | LDS | single-example LOO ρ | group-removal ρ | all-n LOO s | retraining s | "
           "speed-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['task']} | {r['method']} | {r['options']} | {fmt(r.get('lds'))} | {fmt(r.get('loo_spearman'))} | "
            f"{fmt(r.get('group_removal_spearman'))} | {fmt(r.get('all_n_loo_seconds'), 2)} | "
            f"{fmt(r.get('retrain_all_n_seconds'), 1)} | {fmt(r.get('speedup_vs_retraining'), 1)} |"
            for r in data["rows"]]
    return "\n".join(out)


def topk_table(path: Path, rows: list[dict], device: str) -> str:
    out = [f"### Streaming top-k ({path.stem}: `tda-explorer bench topk`, {device})", "",
           "| stored examples | dim | dtype | s / query (one) | s / query (batch of 16) | peak RSS MB | peak GPU MB |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['n_train']:,} | {r['dim']} | {r['dtype']} | {fmt(r['seconds_per_query'], 3)} | "
            f"{fmt(r['seconds_per_query_batched'], 4)} | {fmt(r['peak_rss_mb'], 0)} | "
            f"{fmt(r.get('peak_device_mb'), 0)} |" for r in rows]
    return "\n".join(out)


def scale_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    out = []
    if data.get("featurize"):
        out += [f"### Featurisation throughput ({path.stem}: transformer on generated reviews, torchrun + gloo, "
                "one thread per process)", "",
                "| projection | processes | examples | examples / s | × one process |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {r['projection']} ({r['dim']}) | {r['processes']} | {r['rows']:,} | "
                f"{fmt(r['examples_per_second'], 0)} | {fmt(r.get('speedup_vs_1_process'), 2)} |"
                for r in data["featurize"]]
        out.append("")
    if data.get("memory"):
        out += [f"### Featurisation peak memory against n_train ({path.stem}: one process, shards streamed to disk)",
                "", "| projection | n_train | peak RSS MB | seconds |", "| --- | --- | --- | --- |"]
        out += [f"| {r['projection']} ({r['dim']}) | {r['n_train']:,} | {fmt(r['peak_rss_mb'], 0)} | "
                f"{fmt(r['featurize_seconds'], 1)} |" for r in data["memory"]]
        out.append("")
    if data.get("topk"):
        out.append(topk_table(path, data["topk"], data.get("device", "cpu")))
    return "\n".join(out)


def trajectory_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"### Trajectory-exact attribution ({path.stem}: CPU, {data.get('threads')} threads; every method on the "
           "replayed run the truths perturb)", "",
           "| model | removed | method | LDS same-seed | LDS fresh-seed | truth ceiling | seconds | × training run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['model']} | {r['fraction_removed']:.0%} | {r['method']} | {fmt(r['lds_same_seed'])} | "
            f"{fmt(r['lds_fresh_seed'])} | {fmt(r['truth_ceiling'])} | {fmt(r['seconds'], 1)} | "
            f"{fmt(r.get('seconds_vs_training_run'), 1)} |" for r in data.get("rows", [])]
    if data.get("source"):
        out += ["", f"### SOURCE segments ({path.stem}: digits-MLP, fresh-seed truth, half subsets)", "",
                "| epochs | method | segments | LDS | seconds |", "| --- | --- | --- | --- | --- |"]
        out += [f"| {r['epochs']} | {r['method']} | {r['segments'] or ''} | {fmt(r['lds'])} | {fmt(r['seconds'], 1)} |"
                for r in data["source"]]
    if data.get("groups"):
        out += ["", f"### Group attribution ({path.stem}: digits-LR, 10 Dirichlet groups, leave-group-out "
                "retraining over 3 paired seeds)", "", "| method | options | group Pearson | seconds |",
                "| --- | --- | --- | --- |"]
        out += [f"| {r['method']} | {', '.join(f'{k}={v}' for k, v in r['options'].items())} | "
                f"{fmt(r['group_pearson'])} | {fmt(r['seconds'], 1)} |" for r in data["groups"]]
    return "\n".join(out)


def inrun_table(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"### In-Run Data Shapley ({path.stem}: digits, 10% flipped labels; step callback: 100 validation points; "
           "single pass: median of interleaved plain/recorded pairs)", "",
           "| model | order | form | mislabel ROC-AUC | recall@10% | recall@20% | throughput × plain training |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['model']} | {r['order']} | {r.get('form', '')} | {fmt(r.get('mislabel_auc'))} | "
            f"{fmt(r.get('recall_at_10'), 2)} | {fmt(r.get('recall_at_20'), 2)} | {fmt(r['throughput_ratio'], 2)} |"
            for r in data["rows"]]
    return "\n".join(out)


def access_tables(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"### Proxy models ({path.stem}: digits-MLP; LDS against the target's truth, mislabel AUC with 10% "
           "flipped labels)", "",
           "| method | proxy | access | LDS | target LDS | ratio | score agreement ρ | mislabel AUC | target AUC |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {r['method']} | {r['proxy']} | {r['access']} | {fmt(r['lds'])} | {fmt(r['target_lds'])} | "
            f"{fmt(r['lds_ratio'], 2)} | {fmt(r['proxy_score_spearman'])} | {fmt(r['mislabel_auc'])} | "
            f"{fmt(r['target_mislabel_auc'])} |" for r in data.get("proxies", [])]
    curve = data.get("further_training", [])
    if curve:
        epochs = sorted({r["epochs"] for r in curve})
        methods = list(dict.fromkeys(r["method"] for r in curve))
        cell = {(r["method"], r["epochs"]): r["cosine"] for r in curve}
        out += ["", f"### Further training from the final model ({path.stem}: mean cosine with τ_FT, 50 examples, "
                "5 seeds; figure: assets/further_training.html)", "",
                "| method | " + " | ".join(f"{e} epochs" for e in epochs) + " |",
                "| --- | " + " | ".join("---" for _ in epochs) + " |"]
        out += [f"| {m} | " + " | ".join(fmt(cell.get((m, e))) for e in epochs) + " |" for m in methods]
    if data.get("backdoor"):
        out += ["", f"### Planted backdoor ({path.stem}: 20 poisoned of 1,020, held-out triggered 3s as queries)", "",
                "| method | attack success | AUC | AUC with DDA | recall@20 | recall@20 with DDA |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['method']} | {fmt(r['attack_success'], 2)} | {fmt(r['backdoor_auc'])} | "
                f"{fmt(r['backdoor_auc_dda'])} | {fmt(r['recall_at_20'], 2)} | {fmt(r['recall_at_20_dda'], 2)} |"
                for r in data["backdoor"]]
    rows = data.get("ensembles", []) + data.get("ensembles_mlp_dropout", [])
    if rows:
        out += ["", f"### TRAK ensembles ({path.stem}: digits; training seconds beyond the attributed model, in "
                "lock-step and as independent runs)", "",
                "| model | ensemble | members | masks | LDS | training s | independent runs s | attribution s | "
                "stored bytes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r.get('model', 'mlp')} | {r['ensemble']} | {r['members']} | {r.get('masks', '')} | "
                f"{fmt(r['lds'])} | {fmt(r['training_seconds'], 2)} | "
                f"{fmt(r.get('independent_runs_training_seconds'), 2)} | {fmt(r['attribution_seconds'], 2)} | "
                f"{r['stored_bytes']:,} |" for r in rows]
        out += ["", "Cheap ensembles against five independent models (models trained, as a ratio to five):", ""]
        out += [f"- {line}" for line in cheap_ensemble_summary(rows)]
    return "\n".join(out)


def cheap_ensemble_summary(rows: list[dict]) -> list[str]:
    """Per model: the dropout / LoRA ensembles whose LDS reaches five independent models', with the ratio of their
    training (models trained, as independent runs) to the five models' training."""
    lines = []
    for model in dict.fromkeys(r.get("model", "mlp") for r in rows):
        mine = [r for r in rows if r.get("model", "mlp") == model]
        five = next((r for r in mine if r["ensemble"] == "independent" and r["members"] == 5), None)
        if five is None:
            continue
        reached = [r for r in mine if r["ensemble"] != "independent" and r["lds"] >= five["lds"]]
        if not reached:
            lines.append(f"{model}: none reaches five models' LDS {fmt(five['lds'])}")
        for r in reached:
            ratio = (r["members"] if r["ensemble"] != "lora" else 1) / 5
            lines.append(f"{model}: {r['ensemble']} {r['members']} × {r['masks']} masks, LDS {fmt(r['lds'])} ≥ "
                         f"{fmt(five['lds'])} at {ratio:.1f}× the five models' training")
    return lines


def quanda_table(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"### quanda cross-check ({path.stem}: quanda {data['quanda']} on the same score matrices)", "",
           "| metric | quanda | ours | difference |", "| --- | --- | --- | --- |"]
    out += [f"| {r['metric']} | {r['quanda']:.6f} | {r['ours']:.6f} | {r['difference']:.1e} |" for r in data["rows"]]
    return "\n".join(out)


def _zoo_family(method: str) -> tuple[str, ...] | None:
    """The peer methods a method of ours is compared with (the best of them per task)."""
    if method.startswith("if-"):
        return ("if-",)
    return {"trak": ("trak",), "tracin": ("tracin", "grad-dot", "grad-cos"), "grad-dot": ("tracin", "grad-dot",
            "grad-cos"), "grad-cos": ("tracin", "grad-dot", "grad-cos"), "suspicion": ("cleanlab",)}.get(method)


def zoo_tables(path: Path) -> str:
    """Per method of ours across the zoo: median and worst regret (oracle LDS - default LDS), wins and losses of its
    default against the best peer of its family (LDS; mislabel ROC-AUC for suspicion against cleanlab), failures;
    then per task the best default of ours against the best peer, beside the seed agreement of its ground truth
    (Spearman between two fresh seeds' retrained losses on the same subsets: how much of the truth is not noise)."""
    import statistics

    data = json.loads(path.read_text())
    rows = data["rows"]
    ok = lambda r, key: r["status"] == "ok" and r.get(key) is not None  # noqa: E731

    def value(library, method, setting, task, key="lds"):
        v = [r[key] for r in rows if r["library"] == library and r["method"] == method and r["setting"] == setting
             and r["task"] == task and ok(r, key)]
        return max(v) if v else None

    tasks = sorted({r["task"] for r in rows})
    ours = [r for r in rows if r["library"] == "tda_explorer"]
    methods = sorted({r["method"] for r in ours}, key=lambda m: (not m.startswith("if-"), m))
    status = "partial run" if data.get("partial", True) else "complete"
    out = [f"### Task zoo ({path.stem}: {len(tasks)} tasks, {status}, torch {data.get('torch', '?')}, "
           f"{data.get('threads', '?')} threads)", "",
           "| method | tasks | median regret | worst regret | wins / losses vs best peer of its family "
           "| default failures |", "| --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        key = "mislabel_auc" if m == "suspicion" else "lds"
        regret = [(value("tda_explorer", m, "oracle", t) - value("tda_explorer", m, "default", t), t) for t in tasks
                  if value("tda_explorer", m, "oracle", t) is not None
                  and value("tda_explorer", m, "default", t) is not None]
        family, wins, losses = _zoo_family(m), 0, 0
        for t in tasks:
            mine = value("tda_explorer", m, "default", t, key)
            peer = [r[key] for r in rows if r["library"] != "tda_explorer" and r["task"] == t and ok(r, key)
                    and family and any(r["method"].startswith(f) for f in family)]
            if mine is not None and peer:
                wins, losses = wins + (mine >= max(peer)), losses + (mine < max(peer))
        fails = [r["task"] for r in ours if r["method"] == m and r["setting"] == "default" and r["status"] != "ok"]
        n = len({r["task"] for r in ours if r["method"] == m and r["setting"] == "default"})
        worst = max(regret) if regret else None
        out.append(f"| {m} | {n} | {fmt(statistics.median(x for x, _ in regret)) if regret else ''} | "
                   f"{f'{worst[0]:.3f} ({worst[1]})' if worst else ''} | {wins} / {losses} | "
                   f"{', '.join(fails) if fails else '0'} |")
    out += ["", "| task | train / test accuracy | seed agreement | best default of ours (LDS) | best peer (LDS) "
            "| suspicion / cleanlab (ROC-AUC) |", "| --- | --- | --- | --- | --- | --- |"]
    for t in tasks:
        info = data.get("tasks", {}).get(t, {})
        acc = (f"{info['train_accuracy']:.2f} / {info['test_accuracy']:.2f}" if "train_accuracy" in info else "")
        mine = [(r["lds"], r["method"]) for r in ours if r["task"] == t and r["setting"] == "default" and ok(r, "lds")]
        peer = [(r["lds"], f"{r['library']} {r['method']}") for r in rows if r["task"] == t and ok(r, "lds")
                and r["library"] != "tda_explorer"]
        best = lambda c: f"{max(c)[0]:.3f} {max(c)[1]}" if c else ""  # noqa: E731
        s, c = value("tda_explorer", "suspicion", "default", t, "mislabel_auc"), value("cleanlab", "cleanlab",
                                                                                          "default", t, "mislabel_auc")
        agreement = info.get("seed_agreement")
        out.append(f"| {t} | {acc} | {fmt(agreement) if agreement is not None else ''} | {best(mine)} | {best(peer)} | "
                   f"{fmt(s) if s is not None else ''} / {fmt(c) if c is not None else ''} |")
    out += ["", *_zoo_loss_baseline(ours), "", *_zoo_calibrated(ours), "", *_zoo_cost(rows)]
    return "\n".join(out)


def _zoo_calibrated(ours: list[dict]) -> list[str]:
    """Per method: on how many tasks the calibrated LDS is at or above the default's, the median and worst change, and
    the calibrated run's time (calibration + fit + attribution) as a multiple of the default's."""
    import statistics

    by = {(r["task"], r["method"], r["setting"]): r for r in ours if r["status"] == "ok" and r.get("lds") is not None}
    out = ["| method | tasks calibrated | at or above the default | median LDS change | worst (task) | median time "
           "/ default's | worst time ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in sorted({r["method"] for r in ours if r["setting"] == "calibrated"}):
        pairs = [(by[t, m, "calibrated"], by[t, m, "default"]) for (t, mm, s) in by if mm == m and s == "calibrated"
                 and (t, m, "default") in by]
        if not pairs:
            continue
        d = [(c["lds"] - r["lds"], c["task"]) for c, r in pairs]
        ratio = [c["seconds"] / max(r["seconds"], 1e-9) for c, r in pairs if c.get("seconds") and r.get("seconds")]
        worst = min(d)
        out.append(f"| {m} | {len(d)} | {sum(x >= -1e-9 for x, _ in d)} | {statistics.median(x for x, _ in d):+.3f} | "
                   f"{worst[0]:+.3f} ({worst[1]}) | {statistics.median(ratio):.1f}× | {max(ratio):.1f}× |")
    return out


def _zoo_cost(rows: list[dict]) -> list[str]:
    """Per task: our EK-FAC beside kronfluence's (seconds, peak resident memory of the row in the same process)."""
    def get(library: str, task: str) -> dict | None:
        return next((r for r in rows if r["library"] == library and r["method"] == "if-ekfac" and r["task"] == task
                     and r["setting"] == "default" and r["status"] == "ok"), None)

    out = ["| task | EK-FAC seconds: ours / kronfluence | time ratio | peak RSS MB: ours / kronfluence |",
           "| --- | --- | --- | --- |"]
    for t in sorted({r["task"] for r in rows}):
        mine, peer = get("tda_explorer", t), get("kronfluence", t)
        if mine is None or peer is None:
            continue
        mem = (f"{mine['peak_rss_mb']:.0f} / {peer['peak_rss_mb']:.0f}"
               if mine.get("peak_rss_mb") and peer.get("peak_rss_mb") else "")
        out.append(f"| {t} | {mine['seconds']:.2f} / {peer['seconds']:.2f} | "
                   f"{mine['seconds'] / max(peer['seconds'], 1e-9):.2f} | {mem} |")
    return out


def _zoo_loss_baseline(ours: list[dict]) -> list[str]:
    """Per method of ours on the noisy zoo tasks (defaults): its mislabel ROC-AUC minus the training loss's (the
    baseline every ranking is shown beside; evaluate_method's ``mislabel_auc_minus_loss``)."""
    import statistics

    rows = [r for r in ours if r["setting"] == "default" and r["status"] == "ok"
            and r.get("mislabel_auc_minus_loss") is not None]
    if not rows:
        return ["(no mislabel rows with the training-loss baseline yet: rerun bench_zoo.py on the noisy tasks)"]
    out = ["| method | noisy tasks | median ROC-AUC − training loss's | worst (task) | tasks at or below the loss |",
           "| --- | --- | --- | --- | --- |"]
    for m in sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("if-"), m)):
        d = [(r["mislabel_auc_minus_loss"], r["task"]) for r in rows if r["method"] == m]
        worst = min(d)
        out.append(f"| {m} | {len(d)} | {statistics.median(x for x, _ in d):+.4f} | {worst[0]:+.4f} ({worst[1]}) | "
                   f"{sum(x <= 0 for x, _ in d)} |")
    return out


def main() -> None:
    for path in sorted(RESULTS.glob("accuracy*.json")):
        print(accuracy_tables(path), end="\n\n")
    for path in sorted(RESULTS.glob("speed*.json")):
        print(speed_table(path), end="\n\n")
    for path in sorted(RESULTS.glob("influence*.json")):
        print(influence_tables(path), end="\n\n")
    for path in sorted(RESULTS.glob("removal*.json")):
        print(removal_table(path), end="\n\n")
    for path in sorted(RESULTS.glob("trajectory*.json")):
        print(trajectory_tables(path), end="\n\n")
    for path in sorted(RESULTS.glob("inrun*.json")):
        print(inrun_table(path), end="\n\n")
    for path in sorted(RESULTS.glob("access*.json")):
        print(access_tables(path), end="\n\n")
    for path in sorted(RESULTS.glob("quanda*.json")):
        print(quanda_table(path), end="\n\n")
    for path in sorted(RESULTS.glob("scale*.json")):
        print(scale_tables(path), end="\n\n")
    for path in sorted(RESULTS.glob("zoo*.json")):
        print(zoo_tables(path), end="\n\n")


if __name__ == "__main__":
    main()
