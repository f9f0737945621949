"""The GGN's factor A (``Curvature.ggn_factor``, n·C × p: the products of the direct solvers and LiSSA's row space go
through it) built by each vectorised form, a ``jacrev`` of the logits (the only form until now) and one gradient per
class, and as shipped (the first chunk built both ways, the faster builds the rest): CPU seconds of each (the faster of
two calls) on the zoo tasks whose products take the factor, and the largest difference of the factors
(benchmarks/README.md, "LiSSA in the factor's row space").

    OMP_NUM_THREADS=1 python benchmarks/bench_ggn_factor.py --json benchmarks/results/ggn_factor_cpu.json [--task T ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rowfile import run_over_tasks  # noqa: E402

from tda_explorer.compute.engine.curvature import Curvature  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task  # noqa: E402

TASKS = ("reviews-transformer-adam", "shapes32-cnn-sgd", "shapes16-cnn-bn-sgdm", "synth200-mlp-adamw",
         "synth20-mlp-tanh-sgd", "wine-mlp-adam")
FORMS = {"jacobian_s": "jacobian", "per_class_s": "per class", "shipped_s": None}


def measure(task: str) -> dict:
    exp = build_zoo_task(task)
    curvature = Curvature(exp.task(), exp.split.train, "ggn", "cpu")  # float64, as the solvers build it
    times, factors = {key: [] for key in FORMS}, {}
    for _ in range(2):  # each twice, in turn: the first call of any pays one-off set-up
        for key, form in FORMS.items():
            t0 = time.process_time()
            factors[key] = curvature.ggn_factor(form=form)
            times[key].append(time.process_time() - t0)
    reference = factors["jacobian_s"]
    difference = max(float((f - reference).abs().max() / reference.abs().max()) for f in factors.values())
    return {"task": task, "rows": reference.shape[0], "parameters": reference.shape[1],
            **{key: min(t) for key, t in times.items()}, "largest_difference": difference}


def main() -> None:
    run_over_tasks(__doc__, TASKS, lambda task: [measure(task)])

if __name__ == "__main__":
    main()
