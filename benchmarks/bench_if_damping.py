"""The direct influence solvers' damping swept on the zoo from one eigendecomposition per task (benchmarks/README.md,
"Influence-function damping across the zoo"): if-explicit is fitted once with its defaults (GGN curvature), then its
curvature H (weight decay included) is eigendecomposed once and for each λ the scores
(g′Q) diag(1/(Λ + λ)) (gQ)ᵀ / n come from it: in the dense form H = QΛQᵀ read back from the Cholesky factor, in the
kernel form (n·C < p) AAᵀ = UΣUᵀ, so that on the span of Aᵀ the eigenvalues are Σ + wd and elsewhere wd. λ is relative
to the mean eigenvalue trace(H)/p and to the largest eigenvalue (the spectrum rule's scale), and on the Adam / AdamW
runs to the run's ridge mean(√v̂ + ε) / (lr · steps) (``adam_damping`` over ``ADAM_RIDGE``: "Damping from an Adam run");
the default (the recipe's rule where it has one) is reported beside them.

    python benchmarks/bench_if_damping.py --json benchmarks/results/if_damping_cpu.json [--task T ...]
"""

from __future__ import annotations

import argparse
import json

import torch

from tda_explorer.compute.methods import get_method
from tda_explorer.compute.methods.influence.direct import ADAM_RIDGE, adam_damping
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_tasks

RELATIVE = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
TOP = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]  # the same, relative to the largest eigenvalue
ADAM = [0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]  # multiples of an Adam run's ridge


def _solver(att) -> tuple:
    """``(scores(λ), mean eigenvalue, largest eigenvalue)`` of the fitted if-explicit's curvature H (wd included)."""
    wd, n, p = att.curvature_.wd, len(att.train_), att.n_params
    g_train = att.g_train_
    if att.form_ == "kernel":
        a = att.factor_
        sigma, u = torch.linalg.eigh(0.5 * (a @ a.T + (a @ a.T).T))
        sigma = sigma.clamp_min(0)
        dots = None

        def scores(test_g: torch.Tensor, lam: float) -> torch.Tensor:
            nonlocal dots
            if dots is None:
                dots = (test_g @ g_train.T, u.T @ (a @ test_g.T), u.T @ (a @ g_train.T))
            plain, left, right = dots
            mu = wd + lam
            return (plain - left.T @ (right / (sigma + mu).unsqueeze(1))) / mu / n

        return scores, float(sigma.sum()) / p + wd, float(sigma[-1]) + wd
    matrix = att.chol_ @ att.chol_.T
    matrix.diagonal().sub_(att.lam_)
    ev, q = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    rotated = g_train @ q

    def scores(test_g: torch.Tensor, lam: float) -> torch.Tensor:
        return ((test_g @ q) / (ev + lam)) @ rotated.T / n

    return scores, float(matrix.diagonal().mean()), float(ev[-1])


def sweep_task(name: str, relative) -> dict:
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    config, _ = method_options(exp, "if-explicit")
    att = get_method("if-explicit", exp.task(), **config).fit(exp.split.train)
    scores, base, top = _solver(att)
    g_test = att._features(exp.split.test, test=True).double()

    def score(lam: float) -> float:
        return lds(scores(g_test, lam).float(), truth.masks, truth.measurements)[0]

    row = {"params": att.n_params, "form": att.form_, "wd": exp.config.weight_decay, "optimizer": exp.spec.optimizer,
           "mean_eigenvalue": base, "top_eigenvalue": top, "default_lambda": att.lam_, "rule": att.damping_rule_,
           "default": lds(att.attribute(exp.split.test).scores, truth.masks, truth.measurements)[0],
           **{f"rel{c:g}": score(c * base) for c in relative},
           **{f"top{c:g}": score(c * top) for c in TOP}}
    adam = adam_damping(exp.config, exp.split.train, exp.task().checkpoints)
    if adam is not None:
        row["adam_ridge"] = adam / ADAM_RIDGE
        row.update({f"adam{c:g}": score(c * row["adam_ridge"]) for c in ADAM})
    print(name, json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=[t.name for t in zoo_tasks()])
    parser.add_argument("--relative", nargs="*", type=float, default=RELATIVE)
    args = parser.parse_args()
    results = {}
    for name in args.task:
        results[name] = sweep_task(name, args.relative)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
