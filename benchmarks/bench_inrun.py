"""In-Run Data Shapley on digits with 10% flipped labels: the values as a mislabel ranking (lowest first), and
training throughput with the recorder on as a ratio to the same run without it (both measured here): the
step-callback form beside the engine's vmapped step, and the single-pass form in a plain torch.optim loop on the
digits MLP and on the 20k-image CNN speed task, carrying the whole validation set or a rotating slice of it per step.

    python benchmarks/bench_inrun.py --json benchmarks/results/inrun_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tda_explorer.compute.training.train import train_weighted
from tda_explorer.compute.valuation.inrun_shapley import InRunShapley
from tda_explorer.evaluate import mislabel_auc, recall_at
from tda_explorer.experiments import build_experiment


def _loop(model, train, config, epochs: int, shapley=None, seed: int = 0, block: int = 16):
    """A plain torch.optim.SGD loop (the recipe's lr, weight decay and batch size) as a generator: it yields the
    seconds of each ``block`` steps (and of the last, shorter block), so that two runs can be interleaved."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bs = min(config.batch_size, len(train))
    steps, started = 0, time.perf_counter()
    for _ in range(epochs):
        for rows in torch.randperm(len(train), generator=gen).split(bs):
            optimizer.zero_grad()
            if shapley is None:
                loss = torch.nn.functional.cross_entropy(model(train.inputs[rows]), train.labels[rows],
                                                         reduction="sum") / bs
                loss.backward()
            else:
                shapley.backward(rows, config.lr)
            optimizer.step()
            steps += 1
            if steps % block == 0:
                yield time.perf_counter() - started
                started = time.perf_counter()
    if steps % block:
        yield time.perf_counter() - started


def _interleaved_runs(plain, recorded) -> tuple[float, float]:
    """Seconds of two whole training runs, their blocks of steps taken in turn (plain, recorded, plain, …): the
    machine's speed drifts by ±20% over a second here, and interleaving at ~10 ms hits both runs alike."""
    plain_seconds = recorded_seconds = 0.0
    for p, r in zip(plain, recorded, strict=True):
        plain_seconds, recorded_seconds = plain_seconds + p, recorded_seconds + r
    return plain_seconds, recorded_seconds


def single_pass_rows(n_validation: int, validation_batches: tuple[int | None, ...], repeats: int) -> list[dict]:
    """Single-pass recorder against plain training: pairs of whole runs (plain, recorded), each pair's runs
    interleaved by blocks of 16 steps; the median ratio of ``repeats`` pairs per validation batch (three times as
    many for the MLP, whose runs last about half a second)."""
    import statistics
    from dataclasses import replace

    from tda_explorer import AttributionTask
    from tda_explorer.compute.models.reference import make_model
    from tda_explorer.data.digits import load_augmented_digits

    rows = []
    exp = build_experiment("mlp", noise=0.1)
    cnn_split = load_augmented_digits(n_train=20_000, n_test=n_validation)
    cnn_config = replace(exp.config, lr=0.05, weight_decay=1e-3)
    tasks = [("mlp", exp.split.train, exp.split.test.subset(range(n_validation)),
              lambda: exp.factory(0), exp.config, exp.config.epochs),
             ("cnn-20k", cnn_split.train, cnn_split.test, lambda: make_model("cnn", 1024, 10, seed=0), cnn_config, 1)]
    for name, train, validation, factory, config, epochs in tasks:
        for validation_batch in validation_batches:
            ratios, plains, recordeds = [], [], []
            for _ in range(repeats * 3 if name == "mlp" else repeats):
                model = factory()
                shapley = InRunShapley(AttributionTask(model), train, validation, min(config.batch_size, len(train)),
                                       validation_batch=validation_batch)
                plain, recorded = _interleaved_runs(_loop(factory(), train, config, epochs),
                                                    _loop(model, train, config, epochs, shapley))
                plains.append(plain)
                recordeds.append(recorded)
                ratios.append(plain / recorded)
            carried = validation_batch or len(validation)
            row = {"model": name, "order": 1,
                   "form": f"single pass, torch.optim loop, {carried} of {len(validation)} validation rows per step",
                   "validation_batch": carried, "plain_seconds": statistics.median(plains),
                   "recorded_seconds": statistics.median(recordeds), "throughput_ratio": statistics.median(ratios),
                   "throughput_ratios": ratios, "steps": shapley.steps}
            if name == "mlp":
                suspicion = -shapley.values
                row.update(mislabel_auc=mislabel_auc(suspicion, exp.split.flipped),
                           recall_at_10=recall_at(suspicion, exp.split.flipped, 0.1),
                           recall_at_20=recall_at(suspicion, exp.split.flipped, 0.2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--n-validation", type=int, default=100)
    parser.add_argument("--single-pass-validation", type=int, default=32,
                        help="the single-pass form's validation set")
    parser.add_argument("--validation-batches", default="all,8",
                        help="validation rows the single pass carries per step ('all' or a number), comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved plain/recorded pairs per setting")
    parser.add_argument("--only", choices=["single-pass"], default=None)
    args = parser.parse_args()
    batches = tuple(None if b == "all" else int(b) for b in args.validation_batches.split(","))
    path = Path(args.json)
    if args.only == "single-pass":
        result = json.loads(path.read_text()) if path.exists() else {"rows": []}
        kept = [r for r in result["rows"] if not r["form"].startswith("single pass")]
        rows = kept + single_pass_rows(args.single_pass_validation, batches, args.repeats)
        path.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    rows = []
    for model in ("mlp", "mlp-gelu"):
        exp = build_experiment(model, noise=0.1)
        train, test = exp.split.train, exp.split.test
        validation = test.subset(range(args.n_validation), name="validation")  # fixed before training
        ones = torch.ones(1, len(train))
        t0 = time.perf_counter()
        train_weighted(exp.factory, train.inputs, train.labels, ones, exp.config, [exp.config.seed])
        plain = time.perf_counter() - t0
        for second_order in (False, True):
            shapley = InRunShapley(exp.task(), train, validation, min(exp.config.batch_size, len(train)),
                                   second_order=second_order)
            t0 = time.perf_counter()
            train_weighted(exp.factory, train.inputs, train.labels, ones, exp.config, [exp.config.seed],
                           callback=shapley)
            recorded = time.perf_counter() - t0
            suspicion = -shapley.values  # harmful (negative value) first
            row = {"model": model, "order": 2 if second_order else 1, "form": "step callback, engine",
                   "mislabel_auc": mislabel_auc(suspicion,
                   exp.split.flipped), "recall_at_10": recall_at(suspicion, exp.split.flipped, 0.1),
                   "recall_at_20": recall_at(suspicion, exp.split.flipped, 0.2), "plain_seconds": plain,
                   "recorded_seconds": recorded, "throughput_ratio": plain / recorded, "steps": shapley.steps}
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows += single_pass_rows(args.single_pass_validation, batches, args.repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
