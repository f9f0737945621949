"""The Kronecker damping match's sample: K-FAC's and EK-FAC's LDS at the matched damping as the exact curvature's
sample grows (benchmarks/README.md, "The match's sample").

The match (``compute.methods.influence.matched_damping``) solves the exact system on the Fisher rows of a random
sample of the training set, at most ``MATCH_ROWS`` rows (the Gram matrix it factors is that size squared), and scores
``MATCH_EXAMPLES`` of the sampled examples. The expected Fisher has C − 1 rows per example; ``MATCH_FISHER_ROWS``
keeps the largest of them and sketches the rest into one (``kfac.output_curvature_roots``), so that the same rows
come from more examples. Each setting here is run at several sample seeds (``MATCH_SEED``) on the zoo's ten-class
tasks and records the fresh-seed LDS, the curvature's and the scored examples, the level chosen and the time to fit
and attribute the test set (the match included):

* ``shipped``: the defaults;
* ``rows=K``: at most K Fisher rows per example (``C-1``: no sketch, the previous default);
* ``all``: every training example's C − 1 rows, caps lifted (what the sample estimates; slow).

    python benchmarks/bench_match_sample.py [--task T ...] [--setting shipped rows=C-1 ...] [--seeds 0 1 2 3]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tda_explorer.compute.methods import get_method
from tda_explorer.compute.methods.influence import matched_damping
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth

TASKS = ("digits-logreg-sgd", "digits-mlp-sgdm", "digits-mlp-gelu-adamw", "digits-mlp-dropout-sgd")
SETTINGS = ("shipped", "rows=2", "rows=4", "rows=C-1", "all")
NAMES = ("MATCH_EXAMPLES", "MATCH_ROWS", "MATCH_MEMORY", "MATCH_FISHER_ROWS", "MATCH_SEED")
SHIPPED = {name: getattr(matched_damping, name) for name in NAMES}


def configure(setting: str, seed: int) -> None:
    """The match's module constants for ``setting`` at sample seed ``seed``."""
    values = dict(SHIPPED, MATCH_SEED=seed)
    if setting.startswith("rows="):
        rows = setting.split("=")[1]
        values["MATCH_FISHER_ROWS"] = None if rows == "C-1" else int(rows)
    elif setting == "all":
        values.update(MATCH_EXAMPLES=10**9, MATCH_ROWS=10**9, MATCH_MEMORY=2**40, MATCH_FISHER_ROWS=None)
    elif setting != "shipped":
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    for name, value in values.items():
        setattr(matched_damping, name, value)


def measure(task: str, settings: list[str], seeds: list[int]) -> list[dict]:
    exp = build_zoo_task(task)
    truth = zoo_ground_truth(exp)
    rows = []
    for setting in settings:
        for seed in seeds if setting != "all" else seeds[:1]:  # every example: no sample to vary
            configure(setting, seed)
            for method in ("if-kfac", "if-ekfac"):
                config, _ = method_options(exp, method, device="cpu")
                t0 = time.perf_counter()
                attributor = get_method(method, exp.task(), device="cpu", **config).fit(exp.split.train)
                scores = attributor.attribute(exp.split.test).scores  # the match runs with the first solve
                seconds = time.perf_counter() - t0
                score = lds(scores, truth.masks, truth.measurements)[0]
                match = attributor.damping_match_
                rows.append({"task": task, "setting": setting, "seed": seed, "method": method, "lds": score,
                             "seconds": seconds, "fisher_examples": match.fisher_examples,
                             "scored_examples": match.examples, "family": match.family, "level": match.level,
                             "agreement": match.agreement})
                print(f"{task:24s} {setting:9s} seed {seed} {method:8s} LDS {score:.4f}  curvature "
                      f"{match.fisher_examples:<5d} scored {match.examples:<4d} {match.family} {match.level:.3g}  "
                      f"{seconds:.2f} s", flush=True)
    configure("shipped", SHIPPED["MATCH_SEED"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="*", default=list(TASKS))
    parser.add_argument("--setting", nargs="*", default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for task in args.task for row in measure(task, args.setting, args.seeds)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "torch": torch.__version__, "threads": 1, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
