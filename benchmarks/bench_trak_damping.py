"""TRAK's damping swept on the zoo from one featurisation per task and k (benchmarks/README.md, "TRAK defaults
across the zoo"): Φ = USVᵀ once, then for each λ the scores φ′ᵀV diag(s/(s² + λ)) Uᵀ ⊙ Q, the attributor's own
features, Q and test features; λ relative to the mean diagonal of the kernel (tr(ΦᵀΦ)/min(n, k), what ``damping=``
means) and the old rule's n · weight decay.

    python benchmarks/bench_trak_damping.py --json /tmp/trak/sweep.json [--task T ...] [--dims 512 2048 4096]
        [--relative 1e-6 ... 1e4]
"""

from __future__ import annotations

import argparse
import json

import torch

from tda_explorer.compute.engine.losses import neg_margin
from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_tasks

RELATIVE = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4]


def _lds(coords, s, ev, u, q, lam: float, truth) -> float:
    return lds((((coords * (s / (ev + lam))) @ u.T) * q).float(), truth.masks, truth.measurements)[0]


def sweep_task(name: str, dims, relative) -> dict:
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    n, wd = len(exp.split.train), exp.config.weight_decay
    out = {"n": n, "wd": wd}
    for k in dims:
        config, _ = method_options(exp, "trak", projection_dim=k)
        att = get_method("trak", exp.task(), **config).fit(exp.split.train)
        phi = att.phi_[0].double()
        _, params, seed = att._variants()[0]
        phi_test = att._features(exp.split.test, test=True, params=params, loss_fn=neg_margin,
                                 dropout_seed=seed).double()
        u, s, vh = torch.linalg.svd(phi, full_matrices=False)
        coords, ev, q = phi_test @ vh.T, s.square(), att.q_.double()
        base = float(ev.sum()) / min(phi.shape)  # the mean diagonal of the kernel the solve builds

        row = {"features": phi.shape[1], "mean_diagonal": base, "top_eigenvalue": float(ev[0]),
               **{f"rel{c:g}": _lds(coords, s, ev, u, q, c * base, truth) for c in relative}}
        if wd > 0:
            row["n_wd"] = _lds(coords, s, ev, u, q, n * wd, truth)
        out[str(k)] = row
        print(name, k, json.dumps({a: round(b, 3) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--task", nargs="*", default=None)
    parser.add_argument("--dims", nargs="*", type=int, default=[512, 2048, 4096])
    parser.add_argument("--relative", nargs="*", type=float, default=RELATIVE)
    args = parser.parse_args()
    results = {}
    for name in args.task or [t.name for t in zoo_tasks()]:
        results[name] = sweep_task(name, args.dims, args.relative)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
