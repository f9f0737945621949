"""Influence functions on the digits tasks, every solver beside the peers' solvers in the same process.

LDS on digits-LR and digits-MLP (1,000 train / 300 test, 100 retrained 50% subsets, cached), wall time including
fitting; then EK-FAC on the larger CNN task (20,000 augmented 32×32 digits, 500 test points) as a ratio to one
plain training epoch measured in the same run. A peer that fails (out of memory, unsupported module) is recorded
with its error instead of stopping the run.

    python benchmarks/bench_influence.py [--json results.json] [--device cpu] [--skip-cnn]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402
from bench_speed import cnn_experiment, plain_epoch_seconds, timed  # noqa: E402

from tda_explorer import get_method  # noqa: E402
from tda_explorer.evaluate import evaluate_method, lds  # noqa: E402
from tda_explorer.experiments import build_experiment  # noqa: E402
from tda_explorer.retraining import subset_ground_truth  # noqa: E402

OURS = [("if-explicit", {}), ("if-explicit", {"projection_dim": 2048}), ("if-cg", {}), ("if-lissa", {}),
        ("if-arnoldi", {}), ("if-kfac", {}), ("if-ekfac", {}), ("if-astra", {}), ("if-datainf", {})]
DATTRI = ["explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac"]
KRONFLUENCE = ["kfac", "ekfac"]
# dattri-llm's default damping (1e-3) is not singular: recorded as is, and with the weight decay beside kronfluence's
DATTRI_LLM = [(method, damping) for method in ("kfac", "ekfac") for damping in (None, "wd")]


def _peer_row(task: str, library: str, method: str, run, truth, options: str | None = None) -> dict:
    # peers.py passes the task's weight decay as damping where a peer's default (0) would be singular
    if options is None:
        options = "defaults" if method == "if-arnoldi" and library.startswith("dattri") else "defaults, damping = wd"
    row = {"task": task, "library": library, "method": method, "options": options}
    try:
        scores, secs = run()
        row.update(lds=lds(scores, truth.masks, truth.measurements)[0], seconds=secs)
    except Exception as err:  # recorded, not fatal: a peer's failure is a result
        row.update(lds=None, seconds=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:100]}")
        traceback.print_exc()
    return row


def lds_rows(device: str, cache_dir: str) -> list[dict]:
    rows = []
    for model in ("lr", "mlp"):
        exp = build_experiment(model, device=device)
        truth = subset_ground_truth(exp, cache_dir=cache_dir, device=device)
        task = f"digits-{model}"
        for name, options in OURS:
            r = evaluate_method(exp, name, truth, device=device, **options)
            rows.append({"task": task, "library": "tda_explorer", "method": name,
                         "options": ", ".join(f"{k}={v}" for k, v in options.items()), "lds": r["lds"],
                         "seconds": r["seconds"]})
            print(rows[-1], flush=True)
        if peers.available("dattri"):
            for solver in DATTRI:
                run = lambda s=solver, e=exp: peers.dattri_influence_scores(e, s, device=device)  # noqa: E731
                rows.append(_peer_row(task, "dattri 0.3", f"if-{solver}", run, truth))
                print(rows[-1], flush=True)
        if peers.available("kronfluence"):
            for strategy in KRONFLUENCE:
                run = lambda s=strategy, e=exp: peers.kronfluence_scores(e, s, device=device)  # noqa: E731
                rows.append(_peer_row(task, "kronfluence 1.0", f"if-{strategy}", run, truth))
                print(rows[-1], flush=True)
        if peers.available("dattri_llm"):
            for method, damping in DATTRI_LLM:
                run = lambda m=method, d=damping, e=exp: peers.dattri_llm_scores(e, m, device=device, damping=d)  # noqa: E731
                options = "defaults" if damping is None else "defaults, damping = wd"
                rows.append(_peer_row(task, "dattri-llm 0.1", f"if-{method}", run, truth, options))
                print(rows[-1], flush=True)
    return rows


def cnn_rows(device: str, n_train: int) -> list[dict]:
    exp = cnn_experiment(n_train, device)
    epoch = plain_epoch_seconds(exp, device)
    name = f"cnn ({n_train:,} × 32×32)"
    method = get_method("if-ekfac", exp.task(), device=device)
    _, secs = timed(lambda: method.fit(exp.split.train).attribute(exp.split.test), device)
    rows = [{"task": name, "what": f"if-ekfac: factors + scores for {len(exp.split.test)} test points",
             "library": "tda_explorer", "seconds": secs, "ratio_to_epoch": secs / epoch, "epoch_seconds": epoch}]
    print(rows[-1], flush=True)
    if peers.available("kronfluence"):
        try:
            _, peer = peers.kronfluence_scores(exp, "ekfac", device=device)
            rows.append({**rows[0], "library": "kronfluence 1.0", "seconds": peer, "ratio_to_epoch": peer / epoch,
                         "ours_over_peer": secs / peer})
        except Exception as err:  # recorded, not fatal
            rows.append({**rows[0], "library": "kronfluence 1.0", "seconds": None, "ratio_to_epoch": None,
                         "error": f"{type(err).__name__}: {err}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=".tda_cache")
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--skip-lds", action="store_true")
    args = parser.parse_args()
    result = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "when": time.strftime("%Y-%m-%d")}
    # a skipped section keeps the rows of an earlier run in the same file
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    result["lds_rows"] = previous.get("lds_rows", []) if args.skip_lds else lds_rows(args.device, args.cache_dir)
    result["speed_rows"] = previous.get("speed_rows", []) if args.skip_cnn else cnn_rows(args.device, args.n_train)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
