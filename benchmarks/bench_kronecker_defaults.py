"""Kronecker defaults across the zoo (issue #27): per task, if-kfac / if-ekfac LDS for each Fisher kind (expected, true,
empirical) at 12 relative dampings (per-layer mean eigenvalue; factors fitted once per kind, `with_damping` after).

    python benchmarks/bench_kronecker_defaults.py OUT.json [fishers=expected,true,empirical] [tasks=all]
"""
import json
import sys
import time
import warnings

from tda_explorer.compute.methods import get_method
from tda_explorer.evaluate.harness import method_options
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_tasks

DAMPINGS = [1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 0.5, 1.0, 3.0, 10.0, 30.0, 100.0]
FISHERS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["expected", "true", "empirical"]
out = sys.argv[1]
tasks = sys.argv[3].split(",") if len(sys.argv) > 3 else [t.name for t in zoo_tasks()]
try:
    res = json.load(open(out))
except Exception:
    res = {}
for name in tasks:
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    for method in ("if-kfac", "if-ekfac"):
        for fisher in FISHERS:
            key = f"{name}|{method}|{fisher}"
            if key in res:
                continue
            try:
                config, _ = method_options(exp, method, device="cpu", fisher=fisher)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    att = get_method(method, exp.task(), device="cpu", **config)
                t0 = time.perf_counter()
                att.fit(exp.split.train)
                fit_s = time.perf_counter() - t0
                row = {"fit_seconds": fit_s}
                for d in DAMPINGS:
                    att.with_damping(d)
                    row[str(d)] = float(lds(att.attribute(exp.split.test).scores, truth.masks, truth.measurements)[0])
            except Exception as err:
                row = {"error": f"{type(err).__name__}: {err}"[:200]}
            res[key] = row
            print(key, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            json.dump(res, open(out, "w"), indent=1)
