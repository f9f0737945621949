"""``tda-explorer featurize`` and ``score``: sharded, resumable featurisation and top-k against its store, on a
built-in task or on your own model and data (``--entry``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tda_explorer.cli.common import _checked_output, _json_argument, _write_result
from tda_explorer.cli.entry import entry_argument, load_entry, refuse_with_entry
from tda_explorer.cli.tasks import TASK_DEFAULTS, _task_arguments
from tda_explorer.compute.engine.featurize import iter_features, make_projector
from tda_explorer.compute.engine.kfac import linear_layer_names
from tda_explorer.compute.engine.sharded import load_sharded, store_fingerprint
from tda_explorer.compute.engine.topk import topk_scores
from tda_explorer.errors import TDAError
from tda_explorer.experiments import build_experiment

#: featurize's built-in task flags (besides TASK_DEFAULTS) with their defaults; --entry refuses them.
FEATURIZE_DEFAULTS = {**TASK_DEFAULTS, "n_train": 1000, "epochs": None}
#: score's built-in task flags.
SCORE_DEFAULTS = {**TASK_DEFAULTS, "epochs": None}


def _featurized_task(exp, projection_kind: str):
    """The experiment's task; LoGra tracks its Linear/Conv2d layers (the others have no Kronecker form)."""
    return exp.task(parameters=linear_layer_names(exp.record.model) if projection_kind == "logra" else None)


def _entry_task(entry, projection_kind: str):
    """The entry's task; LoGra tracks its Linear/Conv2d layers unless the entry chose the parameters."""
    return entry.task(linear_layer_names(entry.model) if projection_kind == "logra" else None)


def cmd_featurize(args: argparse.Namespace) -> int:
    """Sharded, resumable featurisation of a built-in task's training set or of ``--entry``'s (run under torchrun to
    shard)."""
    from tda_explorer.compute.engine.sharded import (
        close_distributed,
        featurize_sharded,
        gather_summaries,
        init_distributed,
        launch_device,
    )

    device = launch_device(args.device)
    distributed = init_distributed(device)
    try:
        refuse_with_entry(args, FEATURIZE_DEFAULTS)
        if args.entry:
            entry = load_entry(args.entry)  # every rank calls it: it must return the same model and data each time
            task, train = _entry_task(entry, args.projection_kind), entry.train
        else:
            exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=args.n_train,
                                   epochs=args.epochs)
            task, train = _featurized_task(exp, args.projection_kind), exp.split.train
        result = featurize_sharded(task, train, args.out, projection_dim=args.projection_dim,
                                   projection_kind=args.projection_kind, shard_rows=args.shard_rows, device=device,
                                   stop_after=args.stop_after)
        ranks = gather_summaries(result)
        if ranks is not None:  # rank 0 prints one summary (no interleaved lines), before the group is left
            print(json.dumps({**result, "ranks": ranks}), flush=True)
    except BaseException:
        close_distributed(wait=False)
        raise
    close_distributed()
    if distributed:
        # Gloo's worker threads can abort the interpreter's finalisation (SIGABRT, "terminate called without an
        # active exception") after a clean run; every shard and the summary are on disk, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Grad-dot top-k proponents/opponents of test points against a sharded feature store."""
    if args.json:
        _checked_output(args.json)
    refuse_with_entry(args, SCORE_DEFAULTS)
    manifest_path = Path(args.store) / "manifest.json"
    if not manifest_path.is_file():
        raise TDAError(f"--store {args.store}: no feature store there ({manifest_path} is missing); pass the --out "
                       "folder of tda-explorer featurize")
    manifest = json.loads(manifest_path.read_text())
    features = load_sharded(args.store)
    cfg = manifest["projection"] or {}
    kind = cfg.get("kind", "rademacher")
    if args.entry:
        entry = load_entry(args.entry)
        train, test, task = entry.train, entry.test, _entry_task(entry, kind)
        same = ("pass the --entry featurize ran with; its function must return the same trained model and training "
                "data each time it is called (seed its training)")
    else:
        exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=manifest["n"],
                               epochs=args.epochs)
        train, test, task = exp.split.train, exp.split.test, _featurized_task(exp, kind)
        same = "pass the same --model, --noise, --seed and --epochs as to featurize (or its --entry)"
    test = test.subset(list(range(min(args.n_test_points, len(test)))))
    projector = make_projector(task, cfg.get("rank", cfg.get("dim_out")), kind, cfg.get("seed", 0))
    fingerprint = store_fingerprint(task, projector, train)
    if fingerprint != manifest["fingerprint"]:
        raise TDAError(f"{args.store} was featurised from another model or data (fingerprint "
                       f"{manifest['fingerprint']}); these arguments give {fingerprint}: {same}")
    queries = torch.cat([g for _, g in iter_features(task, test, task.test_measurement, projector)])
    top = topk_scores(features.numpy(), queries, args.k)
    ids = train.ids
    result = {str(t): {side: [[ids[i], float(v)] for v, i in zip(top[side][0][j].tolist(), top[side][1][j].tolist())]
                       for side in top} for j, t in enumerate(test.ids)}
    return _write_result(result, args.json)


def _featurize_arguments(feat: argparse.ArgumentParser, method: str | None = None) -> None:
    entry_argument(feat, "featurise the training set")
    _task_arguments(feat)
    feat.add_argument("--n-train", type=int, default=None, help="training examples to featurise (default 1000)")
    feat.add_argument("--epochs", type=int, default=None, help="train the model this many epochs (default: recipe)")
    feat.add_argument("--out", required=True, help="folder of the sharded feature store")
    feat.add_argument("--projection-dim", type=int, default=1024,
                      help="features per example, or with --projection-kind logra the rank of each layer side")
    feat.add_argument("--projection-kind", default="rademacher", choices=["rademacher", "gaussian", "logra"],
                      help="random projection of the gradients (default rademacher; logra: per-layer Kronecker)")
    feat.add_argument("--shard-rows", type=int, default=4096, help="examples per shard file (default 4096)")
    feat.add_argument("--device", default="cpu", help="where to featurise (cpu, cuda; under torchrun: each rank's)")
    feat.add_argument("--stop-after", type=int, default=None, help="stop after this many shards (resume later)")
    feat.set_defaults(func=cmd_featurize)


def _score_arguments(score: argparse.ArgumentParser, method: str | None = None) -> None:
    score.add_argument("--store", required=True, help="folder of a feature store written by featurize --out")
    entry_argument(score, "score the test set")
    _task_arguments(score)
    score.add_argument("--epochs", type=int, default=None, help="as given to featurize")
    score.add_argument("--k", type=int, default=5, help="proponents and opponents per test point (default 5)")
    score.add_argument("--n-test-points", type=int, default=5, help="test points to score (default 5)")
    _json_argument(score, "the top-k lists")
    score.set_defaults(func=cmd_score)
