"""The direct influence solvers' damping swept on the zoo from one eigendecomposition per task (benchmarks/README.md,
"Influence-function damping across the zoo"): if-explicit is fitted once with its defaults (GGN curvature), the
dense curvature H = LLᵀ − λI is read back from its Cholesky factor, H = QΛQᵀ once, then for each λ the scores
(g′Q) diag(1/(Λ + λ)) (gQ)ᵀ / n; λ relative to the mean eigenvalue trace(H)/p
(what the default rule scales) and, for comparison, to the largest eigenvalue.

    python benchmarks/bench_if_damping.py --json /tmp/ifd/sweep.json [--task T ...] [--relative 1e-4 ... 10]
"""

from __future__ import annotations

import argparse
import json

import torch

from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth

RELATIVE = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
TOP = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]  # the same, relative to the largest eigenvalue
# the zoo tasks whose dense p×p curvature is cheap on a CPU (the others hold > 12,000 parameters)
CHEAP = ["digits-logreg-sgd", "wine-mlp-adam", "wine-logreg-sgdm", "synth20-logreg-adam", "synth20-mlp-tanh-sgd",
         "digits-mlp-dropout-sgd", "digits-mlp-sgdm", "digits-mlp-gelu-adamw"]


def sweep_task(name: str, relative) -> dict:
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    config, _ = method_options(exp, "if-explicit")
    att = get_method("if-explicit", exp.task(), **config).fit(exp.split.train)
    chol = att.chol_
    matrix = chol @ chol.T
    matrix.diagonal().sub_(att.lam_)
    ev, q = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    base = float(matrix.diagonal().mean())  # trace(H)/p, the default rule's scale
    g_test = att._features(exp.split.test, test=True).double() @ q
    g_train = att.g_train_ @ q
    n = len(exp.split.train)

    def score(lam: float) -> float:
        return lds(((g_test / (ev + lam)) @ g_train.T / n).float(), truth.masks, truth.measurements)[0]

    row = {"params": matrix.shape[0], "wd": exp.config.weight_decay, "mean_eigenvalue": base,
           "top_eigenvalue": float(ev[-1]), "default_lambda": att.lam_,
           "default": lds(att.attribute(exp.split.test).scores, truth.masks, truth.measurements)[0],
           **{f"rel{c:g}": score(c * base) for c in relative},
           **{f"top{c:g}": score(c * float(ev[-1])) for c in TOP}}
    print(name, json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=CHEAP)
    parser.add_argument("--relative", nargs="*", type=float, default=RELATIVE)
    args = parser.parse_args()
    results = {}
    for name in args.task:
        results[name] = sweep_task(name, args.relative)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
