"""``tda-explorer evaluate --entry module:function``: one attributor on your own model and data.

Your data has no built-in ground truth, so this reports what the method says and, when the entry gives a retrain
function, checks it against retraining:

- ``top``: each attributed test point's label, prediction and top-k proponents / opponents (``[train_id, score]``;
  proponents have positive scores, opponents negative, so a side may hold fewer than k);
- ``mislabel_ranking``: the training examples with the highest self-influence (where mislabeled data hides) with
  their label and the model's prediction;
- ``seconds`` (fit and attribute) and ``seconds_self_influence``;
- ``what_if`` (with ``retrain``): for each of the first N test points, the model is retrained without its k top
  proponents, without its k top opponents and without k random training examples, each paired with a full-data
  model of the same seed (``retraining.own.FunctionRetrainer``). ``loss_delta`` is the change of that test point's
  measurement (removed minus full, averaged over the seeds; positive: the group had lowered its loss) with each
  seed's value beside it, so an effect smaller than the spread between seeds reads as what it is. The summary gives
  the fraction of test points where removing the proponents raised the loss, removing the opponents lowered it, and
  removing the proponents raised it more than removing random examples (on the seed average, and for every seed).
"""

from __future__ import annotations

import argparse
import time

import torch

from tda_explorer.cli.common import _checked_output, _say, _write_result
from tda_explorer.cli.entry import Entry, load_entry
from tda_explorer.cli.evaluate import method_options_from
from tda_explorer.compute.catalogue import NEEDS, method_spec
from tda_explorer.compute.engine.task import AttributionTask, predict
from tda_explorer.compute.methods import available_methods, get_method
from tda_explorer.errors import TDAError
from tda_explorer.retraining.own import FunctionRetrainer

#: Defaults of evaluate's --entry flags.
ENTRY_DEFAULTS = {"k": 10, "n_mislabeled": 20, "what_if": 3, "what_if_seeds": 2}


def _positive(value: int | None, flag: str, zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero)):
        raise TDAError(f"{flag} must be a {'non-negative' if zero else 'positive'} integer, got {value}")


def _how_to_supply(need: str) -> str:
    """How an entry function supplies ``need``."""
    if need == "checkpoints":
        return "return task={'checkpoints': [...]} (Checkpoint objects recorded while training) from the entry"
    groups = " or ".join("+".join(group) for group in NEEDS[need].options)
    return f"return resources={{'{need}': {{...}}}} with the method options {groups} from the entry"


def _check_attributor(entry_spec: str, method: str) -> None:
    """Refuse, by name, a method that is no attributor (before the entry is loaded)."""
    spec = method_spec(method)
    if method not in available_methods():
        raise TDAError(f"--entry {entry_spec}: {method} is a {spec.family.value} method; evaluate --entry runs "
                       f"attributors (pairwise attribution and self-influence: {', '.join(available_methods())}). "
                       f"Use {spec.factory.__name__} from Python on your data")


def _check_needs(entry: Entry, method: str, task: AttributionTask, options: dict) -> None:
    """Refuse, by name, a method that needs what the entry does not supply."""
    spec = method_spec(method)
    lacking = [need for need in spec.needs if need not in entry.provided(task)
               and not any(set(group) <= set(options) for group in NEEDS[need].options)]
    if lacking:
        need = lacking[0]
        raise TDAError(f"--entry {entry.spec}: {method} {spec.missing(entry.provided(task), options)[0]}; "
                       f"{_how_to_supply(need)}")


def _pairs(ids: list, scores: torch.Tensor) -> list[list]:
    return [[i, float(s)] for i, s in zip(ids, scores.tolist())]


def _what_if(args: argparse.Namespace, entry: Entry, task: AttributionTask, attribution, test, k: int) -> dict:
    """Retrain without each of the first N test points' top proponents, top opponents and random examples."""
    train = entry.train
    n_points = min(args.what_if, len(test))
    k_remove = min(args.what_if_k or k, len(train) - 1)
    if k_remove < 1:
        raise TDAError(f"--entry {entry.spec}: the what-if check removes training examples, and train has only "
                       f"{len(train)}; pass --what-if 0")
    seeds = [args.seed + i for i in range(args.what_if_seeds)]
    all_ids = list(train.ids)
    full_models: dict[int, torch.nn.Module] = {}

    def retrain(train_ids: list, seed: int) -> torch.nn.Module:
        """The entry's retrain, its full-data model trained once per seed and shared by every test point."""
        if list(train_ids) != all_ids:
            return entry.retrain(train_ids, seed)
        if seed not in full_models:
            full_models[seed] = entry.retrain(train_ids, seed)
        return full_models[seed]

    groups = ("proponents", "opponents", "random")
    retrains = len(seeds) * (1 + len(groups) * n_points)
    points_text = f"{n_points} test point{'s' * (n_points != 1)}"
    _say(f"what-if: retraining with your retrain function {retrains} times ({len(seeds)} paired seeds; without the "
         f"{k_remove} top proponents, top opponents and random examples of {points_text}; --what-if 0 skips this)…")
    t0 = time.perf_counter()
    points = []
    for j in range(n_points):
        test_id = test.ids[j]
        chosen = {side: attribution.topk(test_id, k_remove, side)[0] for side in ("proponents", "opponents")}
        generator = torch.Generator().manual_seed(args.seed * 100_003 + j)
        chosen["random"] = [all_ids[i] for i in torch.randperm(len(all_ids), generator=generator)[:k_remove].tolist()]
        retrainer = FunctionRetrainer(retrain, train, test.subset([j]), task, seeds, args.device)
        effect = retrainer.remove([chosen[g] for g in groups])
        row = attribution.row(test_id)
        point = {"test_id": test_id, "loss_full": float(effect.full[0])}
        for g, group in enumerate(groups):
            positions = train.positions(chosen[group], "train ids")
            point[f"remove_{group}"] = {
                "loss_delta": float(effect.delta[g, 0]),
                "loss_delta_per_seed": [float(v) for v in effect.loss_delta_per_seed[:, g].tolist()],
                "score_sum": float(row[positions].sum()),
                "train_ids": chosen[group],
            }
        points.append(point)
    delta = {group: torch.tensor([p[f"remove_{group}"]["loss_delta"] for p in points]) for group in groups}
    measurement = task.measurement if isinstance(task.measurement, str) else "your measurement"
    return {
        "test_points": n_points, "k": k_remove, "seeds": seeds, "retrains": retrains,
        "measurement": measurement,
        "mean_loss_delta": {group: float(delta[group].mean()) for group in groups},
        "median_loss_delta": {group: float(delta[group].median()) for group in groups},
        "proponents_raise_loss": float((delta["proponents"] > 0).double().mean()),
        "opponents_lower_loss": float((delta["opponents"] < 0).double().mean()),
        "proponents_beat_random": float((delta["proponents"] > delta["random"]).double().mean()),
        "proponents_beat_random_every_seed": sum(
            all(a > b for a, b in zip(p["remove_proponents"]["loss_delta_per_seed"],
                                      p["remove_random"]["loss_delta_per_seed"])) for p in points) / n_points,
        "seconds": time.perf_counter() - t0,
        "points": points,
    }


def evaluate_entry(args: argparse.Namespace) -> int:
    """``evaluate --entry``: attribute the entry's test set with ``args.method``; the JSON described above."""
    for name, value in ENTRY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _positive(args.k, "--k")
    _positive(args.n_test_points, "--n-test-points")
    _positive(args.n_mislabeled, "--n-mislabeled", zero=True)
    _positive(args.what_if, "--what-if", zero=True)
    _positive(args.what_if_k, "--what-if-k")
    if args.what_if_seeds < 2:
        raise TDAError(f"--what-if-seeds must be at least 2 (the spread between paired seeds is shown beside every "
                       f"effect), got {args.what_if_seeds}")
    if args.json:
        _checked_output(args.json)  # before the run, not after it
    _check_attributor(args.entry, args.method)
    t_start = time.perf_counter()
    _say(f"loading --entry {args.entry}…")
    entry = load_entry(args.entry)
    for name, data in (("train", entry.train), ("test", entry.test)):
        try:
            data.check_class_labels(f"evaluate --entry (a label and a prediction per {name} example)")
        except TDAError as err:
            raise TDAError(f"--entry {args.entry}: {name}: {err}") from None
    task = entry.task()
    options = method_options_from(args)
    _check_needs(entry, args.method, task, options)
    resources = dict(entry.resources)
    if task.checkpoints:  # as a Session does: the task's own checkpoints supply the need
        resources.setdefault("checkpoints", dict)
    try:
        options = method_spec(args.method).fill(options, resources)
    except TDAError as err:
        raise TDAError(f"--entry {args.entry}: {err}") from None
    train, test = entry.train, entry.test
    if args.n_test_points and args.n_test_points < len(test):
        test = test.subset(list(range(args.n_test_points)))
    predicted = {name: predict(task, data, args.device, argument=name).argmax(-1)
                 for name, data in (("train", train), ("test", test))}
    _say(f"computing {args.method} attributions ({len(test)} test × {len(train)} train)…")
    t0 = time.perf_counter()
    try:
        attributor = get_method(args.method, task, device=args.device, **options).fit(train)
        attribution = attributor.attribute(test)
    except TDAError as err:
        if "reads its items lazily" not in str(err):
            raise
        raise TDAError(f"--entry {args.entry}: {err}. From the entry function, return train and test as (inputs, "
                       "labels) tensors (or AttributionDataset.from_torch(dataset).to_memory()) for this "
                       "method") from None
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    self_influence, why_not = None, "--n-mislabeled 0"
    if args.n_mislabeled:
        _say(f"self-influence of the {len(train)} training examples (--n-mislabeled 0 skips it)…")
        try:
            self_influence, why_not = attributor.self_influence(), None
        except (TDAError, NotImplementedError) as err:
            why_not = str(err) or type(err).__name__
    seconds_self = time.perf_counter() - t0
    k = min(args.k, len(train))
    top = {}
    for j, test_id in enumerate(test.ids):
        top[str(test_id)] = {"label": int(test.labels[j]), "predicted": int(predicted["test"][j]),
                             **{side: _pairs(*attribution.topk(test_id, k, side, signed=True))
                                for side in ("proponents", "opponents")}}
    result = {
        "entry": args.entry, "method": args.method, "options": {k_: v for k_, v in options.items()
                                                                 if isinstance(v, (bool, int, float, str))},
        "n_train": len(train), "n_test": len(test),
        "test_accuracy": float((predicted["test"] == test.labels).double().mean()),
        "train_accuracy": float((predicted["train"] == train.labels).double().mean()),
        "seconds": seconds, "seconds_self_influence": seconds_self, "k": k, "top": top,
    }
    if self_influence is None:
        result["mislabel_ranking"], result["mislabel_ranking_skipped"] = None, why_not
    else:
        order = torch.argsort(self_influence, descending=True, stable=True)[: args.n_mislabeled].tolist()
        result["mislabel_ranking"] = [
            {"rank": r + 1, "train_id": train.ids[i], "score": float(self_influence[i]),
             "label": int(train.labels[i]), "predicted": int(predicted["train"][i])} for r, i in enumerate(order)]
    if entry.retrain is None:
        result["what_if"] = None
        result["what_if_skipped"] = "the entry returned no retrain function (train_ids, seed) -> nn.Module"
    elif args.what_if == 0:
        result["what_if"] = None
        result["what_if_skipped"] = "--what-if 0"
    else:
        result["what_if"] = _what_if(args, entry, task, attribution, test, k)
    _say(f"done in {time.perf_counter() - t_start:.1f} s")
    return _write_result(result, args.json)
