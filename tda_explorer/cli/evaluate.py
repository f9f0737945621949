"""``tda-explorer evaluate``: one method of the catalogue on a built-in task, metrics as JSON; the chosen method's
options become flags generated from its catalogue entry. With ``--entry`` it runs on your own model and data instead
(``cli/evaluate_entry.py``)."""

from __future__ import annotations

import argparse
import time

import torch

from tda_explorer.cli.common import _checked_output, _help, _interactive, _json_argument, _plain, _say, _write_result
from tda_explorer.cli.entry import entry_argument, refuse_with_entry
from tda_explorer.cli.tasks import _data_name, _model_argument
from tda_explorer.compute.catalogue import CATALOGUE, Family, method_spec
from tda_explorer.errors import TDAError
from tda_explorer.evaluate import evaluate_method
from tda_explorer.experiments import build_experiment
from tda_explorer.retraining import removal_ground_truth, subset_ground_truth, truth_ceiling
from tda_explorer.retraining.ground_truth import default_cache_dir

#: Method options whose flag would clash with one of ``evaluate``'s own flags take this prefix (``--method-seed``).
CLASHING_PREFIX = "method-"


#: Older flag names kept as aliases of catalogue options.
FLAG_ALIASES = {"n_checkpoints": ["--ensemble-checkpoints"]}

#: The flags that choose or score a built-in task, with their defaults: parsed with default None, so that --entry
#: refuses the ones given and the built-in path fills the rest in.
BUILTIN_DEFAULTS = {"data": "digits", "model": "mlp", "scenario": None, "verifier": "auto", "proxy": None,
                    "groups": None, "noise": 0.0, "n_subsets": 100, "no_lds": False, "epochs": None,
                    "truth": "fresh-seed", "subset_fraction": 0.5, "cache_dir": None, "ensemble": None}
#: The flags only --entry uses (default None without it).
ENTRY_ONLY = ("k", "n_test_points", "n_mislabeled", "what_if", "what_if_k", "what_if_seeds")


def _training_line(args: argparse.Namespace) -> str:
    """evaluate's progress line before it trains the built-in model."""
    return (f"training the {args.model.upper()} on {_data_name(args.model)} (label noise {args.noise:g}, "
            f"seed {args.seed})…")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run one method on a built-in task, or on ``--entry``'s model and data; write its metrics as JSON."""
    refuse_with_entry(args, BUILTIN_DEFAULTS)
    if args.entry:
        from tda_explorer.cli.evaluate_entry import evaluate_entry

        return evaluate_entry(args)
    given = ["--" + name.replace("_", "-") for name in ENTRY_ONLY if getattr(args, name, None) is not None]
    if given:
        raise TDAError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for evaluate --entry (your own model "
                       "and data); a built-in task reports its metrics against its ground truth instead")
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
             f"(cached in {args.cache_dir or default_cache_dir()})…")
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
             f"the training set each (cached in {args.cache_dir or default_cache_dir()}; --no-lds skips this)…")
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


def _evaluate_arguments(ev: argparse.ArgumentParser, method: str | None = None) -> None:
    ev.add_argument("--data", default=None, help="the built-in data set (digits, the only one; default digits)")
    _model_argument(ev, default=None)
    ev.add_argument("--method", required=True, choices=sorted(CATALOGUE), metavar="METHOD",
                    help="a method of the catalogue (tda-explorer methods lists them); --method NAME --help lists "
                         "its options")
    entry_argument(ev, "attribute the test set")
    ev.add_argument("--scenario", choices=["backdoor", "planted-pool", "facts"], default=None,
                    help="backdoor: a base MLP on digits 0-4 fine-tuned on all ten with 20 triggered 3s labelled 8; "
                         "reports backdoor_auc and backdoor_auc_dda (debias and denoise) for the method. "
                         "planted-pool (--method less): digits seen through four transformations, a target set from "
                         "one; reports target_acc_selected/random/full and selected_precision. "
                         "facts (--method trackstar, fasttrack, tracin or bm25): a causal LM trained on generated "
                         "fictional facts; reports precision, recall and f1 of tracing each query's supporting "
                         "documents (--data and --model are ignored)")
    ev.add_argument("--verifier", choices=["auto", "embedding", "gradient"], default=None,
                    help="--scenario facts --method fasttrack: the stage-2 verifier — embedding (the MiniLM sentence "
                         "encoder's cosine), gradient (the fact LM's answer-aligned gradient cosine) or auto "
                         "(embedding when MiniLM is installed, else gradient)")
    ev.add_argument("--proxy", choices=["hparams", "distill", "small", "init"], default=None,
                    help="attribute a proxy of the model (limited access) and score it against the target's truth; "
                         "adds proxy, target_lds and proxy_score_spearman")
    ev.add_argument("--groups", type=int, default=None, metavar="K",
                    help="score K Dirichlet groups against leave-group-out retraining (group_pearson) instead of LDS")
    ev.add_argument("--noise", type=float, default=None,
                    help="flip this fraction of labels; adds mislabel metrics (default 0)")
    ev.add_argument("--n-subsets", type=int, default=None, help="retrained subsets for LDS (cached; default 100)")
    ev.add_argument("--no-lds", action="store_true", default=None, help="skip LDS (no retraining)")
    ev.add_argument("--epochs", type=int, default=None,
                    help="with --truth further-training: epochs of further training from the final model (default 5)")
    ev.add_argument("--truth", choices=["fresh-seed", "same-seed", "further-training"], default=None,
                    help="LDS truth: retraining with fresh seeds (the default), or the recorded run itself with the "
                         "subset's weights zeroed (then also lds_fresh_seed and truth_ceiling)")
    ev.add_argument("--subset-fraction", type=float, default=None,
                    help="fraction of the training set each LDS subset removes (default 0.5; 0.01: small drops)")
    ev.add_argument("--cache-dir", default=None,
                    help="folder where retrained models and truths are cached (default: $TDA_EXPLORER_CACHE, else "
                         ".tda_cache under the working directory)")
    ev.add_argument("--device", default="cpu", help="where to train and attribute (cpu, cuda, cuda:1; default cpu)")
    ev.add_argument("--ensemble", type=int, default=None, metavar="K",
                    help="TRAK: train K-1 more models with fresh seeds and ensemble over all K")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed of the data split, label noise and training; with --entry, of the what-if check's "
                         "random groups and its first retraining seed")
    own = ev.add_argument_group("with --entry (your own model and data)")
    own.add_argument("--k", type=int, default=None,
                     help="proponents and opponents listed per test point (default 10)")
    own.add_argument("--n-test-points", type=int, default=None,
                     help="attribute the first N test points (default: all)")
    own.add_argument("--n-mislabeled", type=int, default=None,
                     help="training examples listed in the self-influence (mislabel) ranking (default 20; 0 skips "
                          "computing self-influence)")
    own.add_argument("--what-if", type=int, default=None, metavar="N",
                     help="when the entry returns a retrain function: retrain without the top proponents, the top "
                          "opponents and as many random examples of each of the first N test points (default 3; 0 "
                          "skips it)")
    own.add_argument("--what-if-k", type=int, default=None,
                     help="training examples removed per group in the what-if check (default: --k)")
    own.add_argument("--what-if-seeds", type=int, default=None,
                     help="paired retraining seeds of the what-if check, at least 2 (default 2)")
    _json_argument(ev)
    add_method_options(ev, method)
    ev.set_defaults(func=cmd_evaluate)
