"""Kronecker damping rules at the expected Fisher (issue #27): λ = damping × the largest eigenvalue of each layer
("layer-max") or × the mean eigenvalue over all tracked layers ("global-mean"), beside bench_kronecker_defaults.py
(per-layer mean, the default rule).

    python benchmarks/bench_kronecker_damping_rules.py OUT.json
"""
import json
import sys
import warnings

import torch

from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_tasks

GRID = {"layer-max": [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
        "global-mean": [0.03, 0.1, 0.3, 0.5, 1.0, 3.0, 10.0]}
out = sys.argv[1]
res = {}
for name in [t.name for t in zoo_tasks()]:
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    for method in ("if-kfac", "if-ekfac"):
        config, _ = method_options(exp, method, device="cpu", fisher="expected")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            att = get_method(method, exp.task(), device="cpu", **config)
        try:
            att.fit(exp.split.train)
        except Exception as err:
            res[f"{name}|{method}"] = {"error": str(err)[:200]}
            continue
        for rule, grid in GRID.items():
            row = {}
            for d in grid:
                if rule == "layer-max":
                    inv = torch.cat([1.0 / (f.eigenvalues + d * f.eigenvalues.max()).flatten() for f in att.factors_])
                else:
                    g = torch.cat([f.eigenvalues.flatten() for f in att.factors_]).mean()
                    inv = torch.cat([1.0 / (f.eigenvalues + d * g).flatten() for f in att.factors_])
                att._inverse_eigenvalues = lambda inv=inv: inv
                row[str(d)] = float(lds(att.attribute(exp.split.test).scores, truth.masks, truth.measurements)[0])
            res[f"{name}|{method}|{rule}"] = row
            print(name, method, rule, {k: round(v, 3) for k, v in row.items()}, flush=True)
            json.dump(res, open(out, "w"), indent=1)
