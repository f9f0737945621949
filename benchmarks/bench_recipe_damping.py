"""K-FAC / EK-FAC on every zoo task at the damping read from the training recipe (``TrainConfig.implicit_damping``:
λ = (1 − momentum) / (lr · steps), SGD runs only) beside the spectrum-relative levels, on the task's own model and
fresh-seed LDS truth; factors fitted once per method and Fisher kind (benchmarks/README.md, "Damping from the training
run").

    python benchmarks/bench_recipe_damping.py --json /tmp/recipe_damping.json [--task T ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings

import torch

from tda_explorer.compute.catalogue import check_arguments
from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_tasks

RELATIVE = [1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0]
SCALES = [0.3, 1.0, 3.0]  # multiples of the recipe's λ (1: the default)


def _lds(attributor, exp, truth) -> float:
    return float(lds(attributor.attribute(exp.split.test).scores, truth.masks, truth.measurements)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=None)
    parser.add_argument("--fisher", nargs="*", default=["expected", "true", "empirical"])
    args = parser.parse_args()
    rows = []
    for spec in zoo_tasks():
        if args.task and spec.name not in args.task:
            continue
        exp = build_zoo_task(spec.name)
        truth = zoo_ground_truth(exp)
        recipe = exp.config.implicit_damping(len(exp.split.train))
        for method in ("if-kfac", "if-ekfac"):
            for fisher in args.fisher:
                config, _ = method_options(exp, method, fisher=fisher)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    att = get_method(method, exp.task(), **config)
                t0 = time.perf_counter()
                att.fit(exp.split.train)
                row = {"task": spec.name, "optimizer": spec.optimizer, "method": method, "fisher": fisher,
                       "recipe_damping": recipe, "fit_seconds": time.perf_counter() - t0, "relative": {}, "recipe": {}}
                if recipe is not None:
                    for c in SCALES:  # the default's own path (damping None, an SGD train_config) at c × its λ
                        scaled = dataclasses.replace(exp.config, lr=exp.config.lr / c)
                        att.args = check_arguments(dataclasses.replace(att.args, damping=None, train_config=scaled))
                        row["recipe"][str(c)] = _lds(att, exp, truth)
                for d in RELATIVE:
                    att.with_damping(d)
                    row["relative"][str(d)] = _lds(att, exp, truth)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items()}), flush=True)
                json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows},
                          open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
