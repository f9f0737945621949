"""CG self-influence against CG pairwise attribution, measured in the same run (issue #27: "CG self-influence
finishes within 10× its pairwise time").

On the noisy digits MLP (10% flipped labels, the benchmark set-up of README.md), ``if-cg`` with its defaults:
``attribute(test)`` solves one right-hand side per test point, ``self_influence()`` one per training example, each
set as one block of block CG. The same with ``preconditioner='ekfac'`` (EK-FAC-preconditioned) beside it.
Reported: seconds, block-CG iterations, the ratio self-influence / pairwise (target ≤ 10), the largest relative
difference between the two runs' self-influence (the same system to the same tolerance), and with ``--check``
the largest relative difference from ``if-explicit``'s (Cholesky) self-influence at the same damping.

    python benchmarks/bench_cg_self_influence.py [--n-train 1000] [--n-test 300] [--check] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from tda_explorer import get_method
from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning
from tda_explorer.experiments import build_experiment


def bench_cg_self_influence(n_train: int = 1000, n_test: int = 300, noise: float = 0.1,
                            preconditioners: tuple[str, ...] = ("none", "ekfac"), device: str = "cpu",
                            check: bool = False) -> dict:
    exp = build_experiment("mlp", noise=noise, n_train=n_train, n_test=n_test, device=device)
    task = exp.task()
    rows, self_scores = {}, {}
    for choice in preconditioners:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SolverBackoffWarning)
            t0 = time.perf_counter()
            cg = get_method("if-cg", task, preconditioner=choice, device=device).fit(exp.split.train)
            fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            cg.attribute(exp.split.test)
            pairwise, pairwise_iterations = time.perf_counter() - t0, cg.iterations_
            t0 = time.perf_counter()
            self_scores[choice] = cg.self_influence()
            self_time = time.perf_counter() - t0
        rows[choice] = {
            "fit_s": fit, "pairwise_s": pairwise, "pairwise_iterations": pairwise_iterations,
            "self_influence_s": self_time, "self_influence_iterations": cg.iterations_,
            "ratio": self_time / pairwise, "residual": cg.residual_, "damping": cg.lam_,
            "backoff": [str(w.message) for w in caught if issubclass(w.category, SolverBackoffWarning)],
        }
        print(choice, json.dumps(rows[choice]), flush=True)
    result = {"task": f"digits mlp, noise {noise}", "n_train": n_train, "n_test": n_test, "device": device,
              "threads": torch.get_num_threads(), "runs": rows}
    if check:
        explicit = get_method("if-explicit", task, damping=rows[preconditioners[0]]["damping"], device=device)
        truth = explicit.fit(exp.split.train).self_influence()
        result["self_influence_max_relative_difference_from_explicit"] = float(
            (self_scores[preconditioners[0]] - truth).abs().max() / truth.abs().max())
    if len(self_scores) > 1:
        a, b = (self_scores[c] for c in preconditioners[:2])
        result["self_influence_max_relative_difference"] = float((a - b).abs().max() / b.abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--preconditioners", default="none,ekfac")
    parser.add_argument("--check", action="store_true", help="compare with if-explicit's self-influence")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()
    result = bench_cg_self_influence(args.n_train, args.n_test, args.noise, tuple(args.preconditioners.split(",")),
                                     args.device, args.check)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
