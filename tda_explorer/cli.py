"""The ``tda-explorer`` command line: ``demo`` (the main job) and ``evaluate`` (machine-readable).

Nothing heavy is imported here at module level (no torch, no method catalogue): ``tda-explorer --help`` and
``--version`` answer at once, and a subcommand's catalogue-driven arguments (``--method`` choices, the chosen
method's options) are built only when argv names that subcommand (``build_parser(method, commands=...)``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

from tda_explorer import __version__
from tda_explorer.errors import TDAError

#: What ``tda-explorer --help`` says above the commands (plain text: argparse shows it as is).
DESCRIPTION = ("Interactive training data attribution: which training data made the model do that. "
               "Run 'tda-explorer COMMAND --help' for a command's options.")

#: Method options whose flag would clash with one of ``evaluate``'s own flags take this prefix (``--method-seed``).
CLASHING_PREFIX = "method-"
#: Older flag names kept as aliases of catalogue options.
FLAG_ALIASES = {"n_checkpoints": ["--ensemble-checkpoints"]}


def _interactive() -> bool:
    """Whether stderr is a terminal: progress bars only there (redirected, they leave cursor-movement codes)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar on stderr when it is a terminal; disabled (no output at all) when stderr is redirected."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, disable=not _interactive())


def _say(message: str) -> None:
    """One progress line on stderr (stdout keeps the results, e.g. evaluate's JSON)."""
    print(f"tda-explorer: {message}", file=sys.stderr, flush=True)


def _plain(text: str) -> str:
    """``text`` (a docstring or catalogue help) without reST markup: double backticks and :role:`x`."""
    return re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")


def _help(text: str) -> str:
    """``text`` as an argument's help: plain, with ``%`` escaped (argparse %-formats help strings)."""
    return _plain(text).replace("%", "%%")


def _data_name(model: str) -> str:
    """What a built-in model trains on."""
    from tda_explorer.experiments.digits import TEXT_MODELS

    return "generated reviews" if model in TEXT_MODELS else "digits"


def _training_line(args: argparse.Namespace) -> str:
    """evaluate's progress line before it trains the built-in model."""
    return (f"training the {args.model.upper()} on {_data_name(args.model)} (label noise {args.noise:g}, "
            f"seed {args.seed})…")


def _check_test_id(test_id: int, n_test: int) -> int:
    """``--test-id`` must be a position in the test set (0 .. n_test - 1)."""
    if not 0 <= test_id < n_test:
        raise TDAError(f"--test-id {test_id} is out of range: the test set has {n_test} examples, so pass a test id "
                       f"from 0 to {n_test - 1}")
    return test_id


def _proponents_opponents(top, k: int = 5):
    """Split a ranking frame by sign: proponents are the positive scores (strongest first), opponents the negative
    ones (most negative first), ``k`` each, ranked 1..k and -1..-k; a side with no such score is empty."""
    frame = top.drop_duplicates("train_id")
    pro = frame[frame["score"] > 0].sort_values("score", ascending=False).head(k).copy()
    opp = frame[frame["score"] < 0].sort_values("score", ascending=True).head(k).copy()
    pro["rank"] = range(1, len(pro) + 1)
    opp["rank"] = [-r for r in range(1, len(opp) + 1)]
    return pro, opp


def _sides_text(top, columns: list[str], k: int = 5, snippet=None) -> str:
    """The proponents and opponents of one test example as two tables (``none`` for an empty side)."""
    lines = []
    titles = ("Proponents (positive scores, strongest first)", "Opponents (negative scores, strongest first)")
    for title, side in zip(titles, _proponents_opponents(top, k)):
        if snippet is not None:
            side["text"] = [snippet(i) for i in side["train_id"]]
        lines += [f"{title}:", side[columns].to_string(index=False) if len(side) else "  none"]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Digits with label noise → MLP with checkpoints → TracIn → mislabel ranking and proponents."""
    from tda_explorer.evaluate import mislabel_auc, recall_at
    from tda_explorer.experiments import build_experiment
    from tda_explorer.session import Session

    if args.n_test > 0:  # (a bad --n-test gets the loader's own message)
        _check_test_id(args.test_id, args.n_test)  # before minutes of training, not after
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _progress(range(3), "demo", total=3)
    print(f"Loading {_data_name(args.model)} ({args.n_train} train / {args.n_test} test), flipping "
          f"{args.noise:.0%} of the training labels (seed {args.seed}); training a {args.model.upper()} with "
          "checkpoints…", flush=True)
    exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=args.n_train,
                           n_test=args.n_test, epochs=args.epochs, progress=_interactive())
    steps.update()
    session = Session.from_experiment(exp, folder=out / "session")
    t0 = time.perf_counter()
    attribution = session.compute(args.method)
    seconds = time.perf_counter() - t0
    steps.update()
    flipped = exp.split.flipped
    print(f"\nTest accuracy: {exp.test_accuracy():.3f}")
    print(f"Attribution: {args.method} over {len(exp.record.checkpoints)} checkpoints in {seconds:.2f}s "
          f"({len(session.test)} × {len(session.train)} scores)")

    ranking = session.mislabel_ranking(args.method)
    ranking["truly_flipped"] = flipped[session.train.positions(ranking["train_id"].tolist())].tolist()
    shown = min(10, len(ranking))
    print(f"\nThe {shown} training example{'s' if shown != 1 else ''} most likely mislabeled (self-influence, "
          "highest first):")
    print(ranking.head(shown)[["rank", "train_id", "label", "predicted", "suggested", "score", "truly_flipped"]]
          .to_string(index=False))
    if flipped.any():
        score = session.self_influences[args.method]
        print(f"\nMislabel detection: ROC-AUC {mislabel_auc(score, flipped):.3f}; recall of flipped labels after "
              f"inspecting the top 10%: {recall_at(score, flipped, 0.1):.3f}, top 20%: "
              f"{recall_at(score, flipped, 0.2):.3f}")

    test_id = session.test.ids[_check_test_id(args.test_id, len(session.test))]
    pos = session.test.positions([test_id])[0]
    print(f"\nTest example #{test_id} (label {int(session.test.labels[pos])}, predicted "
          f"{int(session.test_predicted[pos])}): top-5 proponents and opponents")
    columns = ["rank", "train_id", "score", "label", "predicted"]
    text = session.train.renderer.kind == "text"
    if text:
        print(f"  “{session.test.renderer.snippet(test_id)}”")
        columns.append("text")
    print(_sides_text(session.ranking(test_id, args.method, k=5), columns, k=5,
                      snippet=session.train.renderer.snippet if text else None))

    ranking.to_csv(out / "mislabel_ranking.csv", index=False)
    attribution.to_dataframe(k=10).to_csv(out / "proponents_opponents_top10.csv", index=False)
    session.test_table().to_csv(out / "test_examples.csv", index=False)
    steps.update()
    steps.close()
    print(f"\nWrote mislabel_ranking.csv, proponents_opponents_top10.csv and test_examples.csv to {out.resolve()}")
    print(f"Flags you set in the explorer are kept in {(out / 'session' / 'flags.sqlite').resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run one method on a built-in task; write its metrics as JSON."""
    import torch

    from tda_explorer.compute.catalogue import Family, method_spec
    from tda_explorer.evaluate import evaluate_method
    from tda_explorer.experiments import build_experiment
    from tda_explorer.retraining import removal_ground_truth, subset_ground_truth, truth_ceiling

    if args.data != "digits":
        raise TDAError(f"unknown data {args.data!r}; expected one of: digits")
    if args.json:
        _checked_output(args.json)  # before the run, not after it
    torch.manual_seed(args.seed)
    spec = method_spec(args.method)
    if spec.family is Family.GROUPS and not args.groups:
        raise TDAError(f"{args.method} scores groups of training data: pass --groups K")
    if spec.family is Family.VALUES and args.method != "lava":
        raise TDAError(f"{args.method} runs inside your training loop, not on a trained model: see "
                       f"{spec.factory.__module__} (benchmarks/bench_inrun.py measures it)")
    if args.verifier != "auto" and (args.scenario != "facts" or args.method != "fasttrack"):
        raise TDAError(f"--verifier {args.verifier} picks the stage-2 verifier of two-stage fact tracing: use it with "
                       "--scenario facts --method fasttrack, or leave it out")
    t0 = time.perf_counter()

    def finish(result: dict) -> int:
        _say(f"done in {time.perf_counter() - t0:.1f} s")
        return _write_result(result, args.json)

    if args.scenario == "facts":
        from tda_explorer.experiments.facts import TRACING_METHODS, evaluate_tracing

        if args.method not in TRACING_METHODS:
            raise TDAError(f"--scenario facts compares fact-tracing methods: pass --method one of "
                           f"{', '.join(TRACING_METHODS)}, got {args.method}")
        _say(f"training a causal LM on generated facts and tracing each query with {args.method}…")
        return finish({"data": "generated facts", "model": "causal-lm",
                       **evaluate_tracing(args.method, seed=args.seed, device=args.device, verifier=args.verifier)})
    if args.scenario == "planted-pool":
        from tda_explorer.experiments.planted_pool import evaluate_selection

        if args.method != "less":
            raise TDAError(f"--scenario planted-pool evaluates targeted selection: pass --method less, got "
                           f"{args.method}")
        _say("planted pool: selecting with less and training on the selection, a random one and the full pool…")
        return finish({"data": args.data, "model": args.model,
                       **evaluate_selection(args.method, seed=args.seed, device=args.device)})
    if spec.family is Family.VALUES:
        from tda_explorer.evaluate.valuation import evaluate_lava

        _say(_training_line(args))
        exp = build_experiment(args.model, noise=args.noise, seed=args.seed, device=args.device,
                               progress=_interactive())
        _say("valuing the training set with lava…")
        return finish({"data": args.data, "model": args.model, "noise": args.noise,
                       "n_train": len(exp.split.train), "n_validation": len(exp.split.test),
                       **evaluate_lava(exp, device=args.device)})
    if args.scenario == "backdoor":
        from tda_explorer.experiments.backdoor import evaluate_backdoor

        if args.model != "mlp":
            raise TDAError(f"--scenario backdoor fine-tunes the digits MLP; got --model {args.model}")
        _say(f"backdoor: fine-tuning the digits MLP on triggered data and attributing with {args.method}…")
        return finish({"data": args.data, "model": args.model,
                       **evaluate_backdoor(args.method, seed=args.seed, device=args.device)})
    _say(_training_line(args))
    exp = build_experiment(args.model, noise=args.noise, seed=args.seed, device=args.device, progress=_interactive())
    if args.groups:
        from tda_explorer.evaluate.groups import evaluate_groups

        _say(f"scoring {args.groups} groups with {args.method} and retraining without each group "
             f"(cached in {args.cache_dir})…")
        return finish({"data": args.data, "model": args.model, "n_train": len(exp.split.train),
                       **evaluate_groups(exp, args.method, args.groups, cache_dir=args.cache_dir,
                                         device=args.device)})
    truth, others = None, {}
    if args.truth == "further-training":
        from tda_explorer.evaluate.harness import run_method
        from tda_explorer.retraining.further_training import further_training_cosine, further_training_truth

        train = exp.split.train
        ids = [train.ids[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
               [: min(50, len(train))].tolist()]
        epochs = args.epochs or 5
        _say(f"further-training truth: {epochs} more epochs without each of {len(ids)} examples, 5 seeds…")
        truth_ft = further_training_truth(exp.task(), train, exp.split.test, ids, epochs, lr=0.1 * exp.config.lr,
                                          batch_size=exp.config.batch_size, seeds=range(5), device=args.device)
        _say(f"computing {args.method} attributions…")
        _, attribution, seconds, _ = run_method(exp, args.method, device=args.device)
        return finish({"data": args.data, "model": args.model, "method": args.method, "truth": args.truth,
                       "further_training_epochs": epochs, "n_left_out": len(ids), "seeds": 5,
                       "further_training_cosine": further_training_cosine(attribution.scores, train, truth_ft),
                       "seconds": seconds})
    if args.truth == "same-seed":
        exp = exp.replayed()  # attribute the very run the same-seed removals perturb
    if not args.no_lds:
        _say(f"LDS truth ({args.truth}): retraining {args.n_subsets} models without {args.subset_fraction:.0%} of "
             f"the training set each (cached in {args.cache_dir}; --no-lds skips this)…")
    if not args.no_lds and args.truth == "same-seed":
        truth = removal_ground_truth(exp, args.n_subsets, args.subset_fraction, same_seed=True,
                                     cache_dir=args.cache_dir, device=args.device)
        others["fresh_seed"] = removal_ground_truth(exp, args.n_subsets, args.subset_fraction, same_seed=False,
                                                    cache_dir=args.cache_dir, device=args.device)
    elif not args.no_lds:
        truth = subset_ground_truth(exp, n_subsets=args.n_subsets, fraction=1 - args.subset_fraction,
                                    cache_dir=args.cache_dir, device=args.device)
    options = {"ensemble": args.ensemble, **method_options_from(args)}
    result = {"data": args.data, "model": args.model, "noise": args.noise, "n_train": len(exp.split.train),
              "n_test": len(exp.split.test), "test_accuracy": exp.test_accuracy()}
    if args.proxy:
        from tda_explorer.evaluate.proxies import evaluate_proxy

        _say(f"attributing a {args.proxy} proxy of the model with {args.method} and scoring it…")
        result.update(evaluate_proxy(exp, args.method, args.proxy, truth, device=args.device, **options))
    else:
        _say(f"computing {args.method} attributions ({len(exp.split.test)} test × {len(exp.split.train)} train) "
             "and their metrics…")
        result.update(evaluate_method(exp, args.method, truth, device=args.device, cache_dir=args.cache_dir,
                                      validate_removal=args.method == "synset-loo", other_truths=others, **options))
    if truth is not None:
        result.update(lds_subsets=args.n_subsets, truth=args.truth, subset_fraction_removed=args.subset_fraction)
    if "fresh_seed" in others:
        result["truth_ceiling"] = truth_ceiling(truth, others["fresh_seed"])
    return finish(result)


def method_options_from(args: argparse.Namespace) -> dict:
    """The catalogue options of ``args.method`` given on the command line (the others keep their defaults)."""
    return {name[len("opt_"):]: value for name, value in vars(args).items()
            if name.startswith("opt_") and value is not None}


def add_method_options(parser: argparse.ArgumentParser, method: str | None) -> None:
    """The chosen method's options as flags, generated from its catalogue entry (type, default, help)."""
    from tda_explorer.compute.catalogue import CATALOGUE

    if method not in CATALOGUE:
        parser.add_argument_group("method options", "pass --method NAME to see and set that method's options "
                                                    "(tda-explorer methods lists every method's)")
        return
    group = parser.add_argument_group(f"options of {method}", _plain(CATALOGUE[method].summary))
    taken = {s for action in parser._actions for s in action.option_strings}
    for info in CATALOGUE[method].argument_info():
        if not info.cli:
            continue
        flag = "--" + info.name.replace("_", "-")
        if flag in taken:
            flag = "--" + CLASHING_PREFIX + info.name.replace("_", "-")
        constraint = f"; {info.constraint}" if info.constraint else ""
        group.add_argument(flag, *FLAG_ALIASES.get(info.name, []), dest="opt_" + info.name, type=info.parse,
                           default=None, metavar=info.type.upper().replace(" ", ""),
                           help=_help(f"{info.help} (default {info.default}{constraint})"))


def cmd_methods(args: argparse.Namespace) -> int:
    """Print the method catalogue: each method's family, needs and options; ``--json FILE`` writes it."""
    from tda_explorer.compute.catalogue import CATALOGUE

    if args.json:
        _checked_output(args.json)
    rows = [CATALOGUE[name].describe() for name in sorted(CATALOGUE)]
    if args.json:
        _checked_output(args.json).write_text(json.dumps({"methods": rows}, indent=2, default=str))
    for row in rows:
        needs = f"  needs: {', '.join(row['needs'])}" if row["needs"] else ""
        print(f"{row['name']:<16} {row['family']:<34}{needs}")
        if args.verbose:
            for a in row["arguments"]:
                flag = "--" + a["name"].replace("_", "-")
                print(f"    {flag:<24} {a['type']:<16} default {a['default']!s:<10} {_plain(a['help'])}")
    return 0


def _checked_output(path: str) -> Path:
    """The ``--json`` file to write: its folder must exist (no folder is created for it) and it must not be one."""
    out = Path(path)
    if not out.parent.is_dir():
        raise TDAError(f"--json {path}: the folder {out.parent} does not exist; create it or pick another path")
    if out.is_dir():
        raise TDAError(f"--json {path} is a folder; pass the path of a file to write, e.g. {out / 'result.json'}")
    return out


def _write_result(result: dict, path: str | None) -> int:
    """Print ``result`` as JSON and, with ``--json``, write it there too."""
    text = json.dumps(result, indent=2, default=str)
    if path:
        _checked_output(path).write_text(text)
    print(text)
    return 0


def _featurized_task(exp, projection_kind: str):
    """The experiment's task; LoGra tracks its Linear/Conv2d layers (the others have no Kronecker form)."""
    from tda_explorer.compute.engine.kfac import linear_layer_names

    return exp.task(parameters=linear_layer_names(exp.record.model) if projection_kind == "logra" else None)


def cmd_featurize(args: argparse.Namespace) -> int:
    """Sharded, resumable featurisation of a built-in task's training set (run under torchrun to shard)."""
    from tda_explorer.compute.engine.sharded import (
        close_distributed,
        featurize_sharded,
        gather_summaries,
        init_distributed,
        launch_device,
    )
    from tda_explorer.experiments import build_experiment

    device = launch_device(args.device)
    init_distributed(device)
    exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=args.n_train, epochs=args.epochs)
    task = _featurized_task(exp, args.projection_kind)
    result = featurize_sharded(task, exp.split.train, args.out, projection_dim=args.projection_dim,
                               projection_kind=args.projection_kind, shard_rows=args.shard_rows, device=device,
                               stop_after=args.stop_after)
    ranks = gather_summaries(result)
    if ranks is not None:  # rank 0 prints one summary (no interleaved lines), before the group is left
        print(json.dumps({**result, "ranks": ranks}), flush=True)
    close_distributed()
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Grad-dot top-k proponents/opponents of test points against a sharded feature store."""
    import torch

    from tda_explorer.compute.engine.featurize import iter_features, make_projector
    from tda_explorer.compute.engine.sharded import load_sharded, store_fingerprint
    from tda_explorer.compute.engine.topk import topk_scores
    from tda_explorer.experiments import build_experiment

    if args.json:
        _checked_output(args.json)
    manifest_path = Path(args.store) / "manifest.json"
    if not manifest_path.is_file():
        raise TDAError(f"--store {args.store}: no feature store there ({manifest_path} is missing); pass the --out "
                       "folder of tda-explorer featurize")
    manifest = json.loads(manifest_path.read_text())
    features = load_sharded(args.store)
    exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=manifest["n"], epochs=args.epochs)
    test = exp.split.test.subset(list(range(min(args.n_test_points, len(exp.split.test)))))
    cfg = manifest["projection"] or {}
    task = _featurized_task(exp, cfg.get("kind", "rademacher"))
    projector = make_projector(task, cfg.get("rank", cfg.get("dim_out")), cfg.get("kind", "rademacher"),
                               cfg.get("seed", 0))
    fingerprint = store_fingerprint(task, projector, exp.split.train)
    if fingerprint != manifest["fingerprint"]:
        raise TDAError(f"{args.store} was featurised from another model or data (fingerprint "
                       f"{manifest['fingerprint']}); these arguments give {fingerprint}: pass the same --model, "
                       "--noise, --seed and --epochs as to featurize")
    queries = torch.cat([g for _, g in iter_features(task, test, task.test_measurement, projector)])
    top = topk_scores(features.numpy(), queries, args.k)
    ids = exp.split.train.ids
    result = {str(t): {side: [[ids[i], float(v)] for v, i in zip(top[side][0][j].tolist(), top[side][1][j].tolist())]
                       for side in top} for j, t in enumerate(test.ids)}
    return _write_result(result, args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks run through the CLI (``explorer``: selection latency at scale; ``topk``: streaming top-k)."""
    if args.json:
        _checked_output(args.json)
    if args.what == "topk":
        result = benchmark_module("bench_topk").bench_topk(
            n_train=args.n_train, dim=args.dim, k=args.k, batch=args.batch, max_memory=args.max_memory_mb * 2**20,
            folder=args.folder, device=args.device)
    else:
        result = benchmark_module("bench_explorer").bench_explorer(n_train=args.n_train, n_test=args.n_test)
    return _write_result(result, args.json)


def cmd_stress(args: argparse.Namespace) -> int:
    """Crash-safety stress tests (``flags``: SIGKILL during flag writes; ``--damage``: damaged files too)."""
    if args.json:
        _checked_output(args.json)
    # damage= only when asked, so the call also works with a stress_flags that predates the keyword
    extra = {"damage": True} if args.damage else {}
    result = benchmark_module("stress_flags").stress_flags(trials=args.trials, writes=args.writes, seed=args.seed,
                                                           **extra)
    _write_result(result, args.json)
    return 0 if result["lost"] == 0 and result.get("integrity_failures", 0) == 0 else 1


def benchmark_module(name: str):
    """A module of the source checkout's ``benchmarks/`` (benchmark and stress code is not shipped in the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise TDAError(f"{name} lives in benchmarks/ of a source checkout, not beside this installed package "
                       f"({path.parent} is missing): run it from a clone of tda_explorer")
    spec = importlib.util.spec_from_file_location(f"tda_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_argument(parser: argparse.ArgumentParser) -> None:
    from tda_explorer.experiments.digits import EXPERIMENT_MODELS, TEXT_MODELS

    text = ", ".join(TEXT_MODELS)
    parser.add_argument("--model", default="mlp", choices=EXPERIMENT_MODELS,
                        help=f"the built-in model to train (default mlp; {text} trains on generated reviews, the "
                             "others on the 8x8 digits)")


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    """The built-in digits task a sharded store belongs to (model, label noise, seed)."""
    _model_argument(parser)
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of training labels flipped (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, label noise and training")


def _json_argument(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", default=None, metavar="FILE",
                        help=f"also write {what} as JSON to FILE (its folder must exist)")


def _demo_arguments(demo: argparse.ArgumentParser, method: str | None = None) -> None:
    from tda_explorer.compute.methods import available_methods

    demo.add_argument("--out", default="tda_output", help="folder for the ranked tables (default: tda_output)")
    _model_argument(demo)
    demo.add_argument("--method", default="tracin", choices=available_methods(),
                      help="the attribution method (default tracin)")
    demo.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped (default 0.1)")
    demo.add_argument("--n-train", type=int, default=1000, help="training examples (default 1000)")
    demo.add_argument("--n-test", type=int, default=300, help="test examples (default 300)")
    demo.add_argument("--epochs", type=int, default=None, help="override the model's training epochs")
    demo.add_argument("--test-id", type=int, default=0,
                      help="test example whose proponents and opponents are printed (0 .. n-test - 1; default 0)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, label noise and training")
    demo.set_defaults(func=cmd_demo)


def _evaluate_arguments(ev: argparse.ArgumentParser, method: str | None = None) -> None:
    from tda_explorer.compute.catalogue import CATALOGUE

    ev.add_argument("--data", default="digits", help="the built-in data set (digits, the only one; default digits)")
    _model_argument(ev)
    ev.add_argument("--method", required=True, choices=sorted(CATALOGUE), metavar="METHOD",
                    help="a method of the catalogue (tda-explorer methods lists them); --method NAME --help lists "
                         "its options")
    ev.add_argument("--scenario", choices=["backdoor", "planted-pool", "facts"], default=None,
                    help="backdoor: a base MLP on digits 0-4 fine-tuned on all ten with 20 triggered 3s labelled 8; "
                         "reports backdoor_auc and backdoor_auc_dda (debias and denoise) for the method. "
                         "planted-pool (--method less): digits seen through four transformations, a target set from "
                         "one; reports target_acc_selected/random/full and selected_precision. "
                         "facts (--method trackstar, fasttrack, tracin or bm25): a causal LM trained on generated "
                         "fictional facts; reports precision, recall and f1 of tracing each query's supporting "
                         "documents (--data and --model are ignored)")
    ev.add_argument("--verifier", choices=["auto", "embedding", "gradient"], default="auto",
                    help="--scenario facts --method fasttrack: the stage-2 verifier — embedding (the MiniLM sentence "
                         "encoder's cosine), gradient (the fact LM's answer-aligned gradient cosine) or auto "
                         "(embedding when MiniLM is installed, else gradient)")
    ev.add_argument("--proxy", choices=["hparams", "distill", "small", "init"], default=None,
                    help="attribute a proxy of the model (limited access) and score it against the target's truth; "
                         "adds proxy, target_lds and proxy_score_spearman")
    ev.add_argument("--groups", type=int, default=None, metavar="K",
                    help="score K Dirichlet groups against leave-group-out retraining (group_pearson) instead of LDS")
    ev.add_argument("--noise", type=float, default=0.0, help="flip this fraction of labels; adds mislabel metrics")
    ev.add_argument("--n-subsets", type=int, default=100, help="retrained subsets for LDS (cached; default 100)")
    ev.add_argument("--no-lds", action="store_true", help="skip LDS (no retraining)")
    ev.add_argument("--epochs", type=int, default=None,
                    help="with --truth further-training: epochs of further training from the final model (default 5)")
    ev.add_argument("--truth", choices=["fresh-seed", "same-seed", "further-training"], default="fresh-seed",
                    help="LDS truth: retraining with fresh seeds, or the recorded run itself with the subset's weights "
                         "zeroed (then also lds_fresh_seed and truth_ceiling)")
    ev.add_argument("--subset-fraction", type=float, default=0.5,
                    help="fraction of the training set each LDS subset removes (0.01: small drops)")
    ev.add_argument("--cache-dir", default=".tda_cache",
                    help="folder where retrained models and truths are cached (default .tda_cache)")
    ev.add_argument("--device", default="cpu", help="where to train and attribute (cpu, cuda, cuda:1; default cpu)")
    ev.add_argument("--ensemble", type=int, default=None, metavar="K",
                    help="TRAK: train K-1 more models with fresh seeds and ensemble over all K")
    ev.add_argument("--seed", type=int, default=0, help="seed of the data split, label noise and training")
    _json_argument(ev)
    add_method_options(ev, method)
    ev.set_defaults(func=cmd_evaluate)


def _methods_arguments(methods: argparse.ArgumentParser, method: str | None = None) -> None:
    _json_argument(methods, "the catalogue")
    methods.add_argument("-v", "--verbose", action="store_true", help="also list every method's options")
    methods.set_defaults(func=cmd_methods)


def _featurize_arguments(feat: argparse.ArgumentParser, method: str | None = None) -> None:
    _task_arguments(feat)
    feat.add_argument("--n-train", type=int, default=1000, help="training examples to featurise (default 1000)")
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
    _task_arguments(score)
    score.add_argument("--epochs", type=int, default=None, help="as given to featurize")
    score.add_argument("--k", type=int, default=5, help="proponents and opponents per test point (default 5)")
    score.add_argument("--n-test-points", type=int, default=5, help="test points to score (default 5)")
    _json_argument(score, "the top-k lists")
    score.set_defaults(func=cmd_score)


def _bench_arguments(bench: argparse.ArgumentParser, method: str | None = None) -> None:
    bench.add_argument("what", choices=["explorer", "topk"],
                       help="explorer: selection latency of the explorer at scale; topk: streaming top-k over a "
                            "generated feature store")
    bench.add_argument("--n-train", type=int, default=50_000, help="training examples (default 50000)")
    bench.add_argument("--n-test", type=int, default=200, help="explorer: test examples (default 200)")
    bench.add_argument("--dim", type=int, default=1024, help="topk: stored feature dimension")
    bench.add_argument("--k", type=int, default=10, help="topk: proponents and opponents per query")
    bench.add_argument("--batch", type=int, default=16, help="topk: queries sharing one pass")
    bench.add_argument("--max-memory-mb", type=int, default=16, help="topk: memory budget of one chunk")
    bench.add_argument("--folder", default=None, help="topk: where the generated store is written (temporary)")
    bench.add_argument("--device", default="cpu", help="topk: where chunks are scored (cpu, cuda)")
    _json_argument(bench)
    bench.set_defaults(func=cmd_bench)


def _stress_arguments(stress: argparse.ArgumentParser, method: str | None = None) -> None:
    stress.add_argument("what", choices=["flags"],
                        help="flags: SIGKILL a process writing flags, then check every acknowledged write survived")
    stress.add_argument("--trials", type=int, default=100, help="kill-and-audit rounds (default 100)")
    stress.add_argument("--writes", type=int, default=1000, help="flag writes per trial (default 1000)")
    stress.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    stress.add_argument("--damage", action="store_true",
                        help="also damage the database, the WAL and the journal between trials; every acknowledged "
                             "write must come back")
    _json_argument(stress)
    stress.set_defaults(func=cmd_stress)


#: Each subcommand: its one-line help, its description and what adds its arguments (only when it is used).
COMMANDS = {
    "demo": ("the digits demo: find mislabeled training data and proponents",
             "Train a small model on digits with flipped labels, attribute it, and print the training examples most "
             "likely mislabeled and one test example's proponents and opponents; the tables go to --out.",
             _demo_arguments),
    "evaluate": ("evaluate one method on a built-in task; JSON out",
                 "Run one method of the catalogue on a built-in task and print its metrics as JSON (LDS against "
                 "retrained subsets, mislabel detection, time). Progress goes to stderr. --method NAME --help also "
                 "lists that method's options.",
                 _evaluate_arguments),
    "methods": ("the method catalogue: families, needs and options",
                "List every method of the catalogue with its family and needs (-v: and options).",
                _methods_arguments),
    "featurize": ("sharded, resumable featurisation (torchrun -m tda_explorer featurize)",
                  "Project each training example's gradient and store the features in resumable shards; run under "
                  "torchrun to split the work over ranks.",
                  _featurize_arguments),
    "score": ("top-k proponents/opponents against a sharded feature store",
              "Score test points against a feature store written by featurize and print each one's top-k proponents "
              "and opponents as JSON.",
              _score_arguments),
    "bench": ("benchmarks: explorer selection latency, streaming top-k",
              "Benchmarks from benchmarks/ of a source checkout; the result is printed as JSON.",
              _bench_arguments),
    "stress": ("crash-safety stress tests",
               "Crash-safety stress tests from benchmarks/ of a source checkout; exits 1 when an acknowledged write "
               "was lost.",
               _stress_arguments),
}


def build_parser(method: str | None = None, commands=None) -> argparse.ArgumentParser:
    """The command line; ``method`` (the ``--method`` given, if any) adds that method's options to ``evaluate``.

    ``commands``: the subcommands whose arguments are built (None: all). Building ``demo``, ``evaluate`` or
    ``methods`` loads torch and the method catalogue; the top-level parser with no command built loads neither.
    """
    parser = argparse.ArgumentParser(prog="tda-explorer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tda-explorer {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                help="one of the commands below")
    for name, (summary, description, add_arguments) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=description)
        if commands is None or name in commands:
            add_arguments(command, method)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the top-level parser has no option taking a value, so the first word that is not an option names the command
    command = next((word for word in argv if not word.startswith("-")), None)
    method = None
    if command == "evaluate":
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--method")
        method = first.parse_known_args(argv)[0].method
    args = build_parser(method, commands={command} & set(COMMANDS)).parse_args(argv)
    try:
        return args.func(args)
    except TDAError as err:
        print(f"tda-explorer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
