"""The curvature's forms, each against the other in this process (benchmarks/README.md, "if-explicit through the
kernel, and curvature products within memory"):

* ``explicit``: if-explicit's two exact forms on the zoo tasks whose training set has fewer outputs than the model has
  parameters (n·C < p): the p × p curvature (dense) against the n·C × n·C kernel (Woodbury, the default there) at the
  same damping; time of fit + attribution + self-influence as a ratio, the largest relative difference of their
  scores, and LDS of each;
* ``products``: GGN products of 64 random directions over the whole training set through the factor A, (VAᵀ)A,
  against the vectorised products (``Curvature._term``), with the factor's build time, the ratio of A's multiply-adds
  to the model's forward flops and which form the rule picks; and on the MLPs around the rule's threshold, 1,024
  directions over a minibatch of 64 rows (the stochastic solvers' workload) in float32 and float64.

    python benchmarks/bench_curvature_forms.py --json benchmarks/results/curvature_forms_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from tda_explorer.compute.engine.curvature import Curvature
from tda_explorer.compute.methods import get_method
from tda_explorer.data.batching import take_rows
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth

TASKS = ("wine-mlp-adam", "shapes16-cnn-bn-sgdm")
PRODUCT_TASKS = ("digits-mlp-gelu-adamw", "shapes16-cnn-bn-sgdm", "reviews-transformer-adam")
#: the MLPs around the rule's threshold, on the stochastic solvers' workload (a minibatch, many right-hand sides)
MINIBATCH_TASKS = ("wine-mlp-adam", "synth200-mlp-adamw", "shapes16-mlp-adam", "digits-mlp-gelu-adamw",
                   "digits-mlp-sgdm")


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


def _products(name: str, directions: int = 64, rows: int | None = None, dtype: torch.dtype = torch.float64) -> dict:
    """GGN products of ``directions`` random directions over the whole training set (``rows`` None) or a minibatch of
    its first ``rows`` (LiSSA's and ASTRA's workload), vectorised against through A, in ``dtype``."""
    exp = build_zoo_task(name)
    factored = Curvature(exp.task(), exp.split.train, "ggn", dtype=dtype)
    plain = Curvature(exp.task(), exp.split.train, "ggn", dtype=dtype)
    plain._shared["a"] = None  # the vectorised products
    outputs = factored.outputs()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        factored._logits(factored.theta, take_rows(next(factored._batches())[0], slice(0, 1)))
    vectors = torch.randn(directions, factored.dim, dtype=dtype, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    factor = factored.ggn_factor()
    build = time.perf_counter() - t0
    if rows is not None:
        subset = torch.arange(rows)
        plain = plain.on_rows(subset)
        factor = factor.view(factored.n, outputs, -1)[subset].reshape(-1, factored.dim) * (factored.n / rows) ** 0.5
    plain.matvec(vectors[:2])  # one untimed call (the activation count, first-call overheads)
    t0 = time.perf_counter()
    want = plain.matvec(vectors)
    vectorised = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = (vectors @ factor.T) @ factor + factored.wd * vectors
    through = time.perf_counter() - t0
    return {"task": name, "dtype": str(dtype).removeprefix("torch."), "rows": rows or factored.n, "p": factored.dim,
            "n_outputs": factored.n * outputs, "factor_mb": factor.numel() * factor.element_size() / 2**20,
            "flop_ratio": 4 * outputs * factored.dim / counter.get_total_flops(),
            "directions": directions, "vectorised_seconds": vectorised, "factor_build_seconds": build,
            "factor_product_seconds": through, "vectorised_over_factor": vectorised / through,
            "max_relative_difference": float((got - want).norm() / want.norm()),
            "rule_picks_factor": factored.factor() is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=list(TASKS))
    parser.add_argument("--product-task", nargs="*", default=list(PRODUCT_TASKS))
    parser.add_argument("--minibatch-task", nargs="*", default=list(MINIBATCH_TASKS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    out = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "when": time.strftime("%Y-%m-%d %H:%M"), "explicit": [], "products": []}

    def save(part: str, row: dict) -> None:
        out[part].append(row)
        print(json.dumps(row), flush=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    for name in args.product_task:
        save("products", _products(name))
    for name in args.minibatch_task:
        for dtype in (torch.float32, torch.float64):
            save("products", _products(name, directions=1024, rows=64, dtype=dtype))
    for name in args.task:
        exp = build_zoo_task(name)
        truth = zoo_ground_truth(exp)
        kernel = _run(exp, truth, "kernel", None)
        dense = _run(exp, truth, "dense", kernel["attributor"].lam_)  # the same damping for both forms
        a, b = kernel["scores"].double(), dense["scores"].double()
        p, n = kernel["attributor"].n_params, len(exp.split.train)
        save("explicit", {"task": name, "p": p, "n_outputs": n * exp.spec.n_classes,
                          "damping": kernel["attributor"].lam_, "kernel_seconds": kernel["seconds"],
                          "dense_seconds": dense["seconds"], "dense_over_kernel": dense["seconds"] / kernel["seconds"],
                          "max_relative_difference": float((a - b).abs().max() / b.abs().max()),
                          "kernel_lds": kernel["lds"], "dense_lds": dense["lds"]})


if __name__ == "__main__":
    main()
