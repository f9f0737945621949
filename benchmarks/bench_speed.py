"""Speed: featurisation as a ratio to one plain training epoch, and per-method time beside dattri.

Tasks: digits-MLP (1,000 train / 300 test) and a larger CNN task (20,000 augmented 32×32 digits,
500 test points) where per-example cost dominates. Every figure is a ratio measured in this run.

    python benchmarks/bench_speed.py [--device cpu] [--json speed.json] [--n-train 20000] [--skip-peers]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from tda_explorer.compute import TrainConfig, get_method, train_model  # noqa: E402
from tda_explorer.data import load_augmented_digits  # noqa: E402
from tda_explorer.experiments import build_experiment  # noqa: E402
from tda_explorer.experiments.digits import Experiment  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_epoch_seconds(exp: Experiment, device: str, batch_size: int = 128) -> float:
    """One ordinary epoch: batched forward + backward + SGD step with plain autograd (the baseline)."""
    model = exp.factory(0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = exp.split.train.inputs.to(device), exp.split.train.labels.to(device)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(y), batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + batch_size]), y[start : start + batch_size]).backward()
            opt.step()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def timed(fn, device: str) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def cnn_experiment(n_train: int, device: str) -> Experiment:
    split = load_augmented_digits(n_train=n_train, n_test=500)
    config = TrainConfig(epochs=3, batch_size=128, lr=0.05, weight_decay=1e-3, optimizer="sgd", n_checkpoints=3)
    exp = Experiment(split, "cnn", config, record=None)  # type: ignore[arg-type]
    exp.record = train_model(exp.factory, split.train.inputs, split.train.labels, config, device=device)
    exp.record.model.cpu()
    return exp


def best_of(repeats: int, fn, device: str) -> float:
    """Best wall time of ``repeats`` runs (the first pays one-off start-up: CUDA kernels, solver handles)."""
    return min(timed(fn, device)[1] for _ in range(repeats))


def bench_task(name: str, exp: Experiment, device: str, projection_dim: int | None, peers_on: bool,
               repeats: int = 1) -> list[dict]:
    epoch = plain_epoch_seconds(exp, device)
    rows = []
    options = {} if projection_dim is None else {"projection_dim": projection_dim}
    method = get_method("grad-dot", exp.task(), device=device, **options)
    _, feat = timed(lambda: method.fit(exp.split.train), device)
    rows.append({"task": name, "what": "featurisation (per-sample grads of the training set)",
                 "library": "tda_explorer", "seconds": feat, "ratio_to_epoch": feat / epoch, "epoch_seconds": epoch})
    for m in ("grad-dot", "tracin", "trak"):
        # TRAK at dattri's default k = 512, so both do the same amount of work (LDS at k = 512 is in
        # the accuracy benchmark); the gradient-similarity methods keep the task's setting.
        opts = dict(options) if m != "trak" else {"projection_dim": 512}
        secs = best_of(repeats, lambda: get_method(m, exp.task(), device=device, **opts)  # noqa: B023
                       .fit(exp.split.train).attribute(exp.split.test), device)
        row = {"task": name, "what": f"{m}: fit + attribute {len(exp.split.test)} test points",
               "library": "tda_explorer", "seconds": secs, "ratio_to_epoch": secs / epoch, "epoch_seconds": epoch}
        rows.append(row)
        if peers_on and peers.available("dattri"):
            peer_secs = min(peers.dattri_scores(exp, m, device=device)[1] for _ in range(repeats))
            rows.append({**row, "library": "dattri 0.3", "seconds": peer_secs, "ratio_to_epoch": peer_secs / epoch,
                         "ours_over_peer": secs / peer_secs})
        for r in rows[-2:]:
            print(r, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    rows = bench_task("digits-mlp (1,000)", build_experiment("mlp", device=args.device), args.device, None,
                      not args.skip_peers, repeats=2)
    rows += bench_task(f"cnn ({args.n_train:,} × 32×32)", cnn_experiment(args.n_train, args.device), args.device,
                       1024, not args.skip_peers)
    if args.json:
        info = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
