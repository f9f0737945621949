"""if-explicit's two exact forms on the zoo tasks whose training set has fewer outputs than the model has parameters
(n·C < p): the p × p curvature (dense) against the n·C × n·C kernel (Woodbury, the default there), fitted one after
the other in this process at the same damping; time of fit + attribution + self-influence as a ratio, the largest
relative difference of their scores, and LDS of each (benchmarks/README.md, "if-explicit through the kernel").

    python benchmarks/bench_explicit_kernel.py --json benchmarks/results/explicit_kernel_cpu.json [--task T ...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth

TASKS = ("wine-mlp-adam", "shapes16-cnn-bn-sgdm")


def _run(exp, truth, form: str, damping: float | None) -> dict:
    config, _ = method_options(exp, "if-explicit", device="cpu")
    if damping is not None:
        config["damping"] = damping
    attributor = get_method("if-explicit", exp.task(), **config)
    attributor._exact_form = lambda train: form  # the form under test, whatever the default's choice
    t0 = time.perf_counter()
    attributor.fit(exp.split.train)
    scores = attributor.attribute(exp.split.test).scores
    attributor.self_influence()
    seconds = time.perf_counter() - t0
    return {"attributor": attributor, "scores": scores, "seconds": seconds,
            "lds": float(lds(scores, truth.masks, truth.measurements)[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=list(TASKS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for name in args.task:
        exp = build_zoo_task(name)
        truth = zoo_ground_truth(exp)
        kernel = _run(exp, truth, "kernel", None)
        dense = _run(exp, truth, "dense", kernel["attributor"].lam_)  # the same damping for both forms
        a, b = kernel["scores"].double(), dense["scores"].double()
        p, n = kernel["attributor"].n_params, len(exp.split.train)
        row = {"task": name, "p": p, "n_outputs": n * exp.spec.n_classes, "damping": kernel["attributor"].lam_,
               "kernel_seconds": kernel["seconds"], "dense_seconds": dense["seconds"],
               "dense_over_kernel": dense["seconds"] / kernel["seconds"],
               "max_relative_difference": float((a - b).abs().max() / b.abs().max()),
               "kernel_lds": kernel["lds"], "dense_lds": dense["lds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
