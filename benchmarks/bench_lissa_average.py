"""if-lissa's answer: the mean of the iterates over the second half of each run (``average=True``, the default) against
the last iterate (``average=False``, Agarwal et al.), at otherwise default settings on zoo tasks: LDS against the
task's truth, the answer's largest relative residual on the whole training set, back-offs and CPU seconds
(benchmarks/README.md, "LiSSA's iterates averaged").

    OMP_NUM_THREADS=1 python benchmarks/bench_lissa_average.py --json benchmarks/results/lissa_average_cpu.json \\
        [--task T ...]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rowfile import run_over_tasks  # noqa: E402

from tda_explorer.evaluate.harness import run_method  # noqa: E402
from tda_explorer.evaluate.metrics import lds  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth  # noqa: E402

TASKS = ("wine-mlp-adam", "wine-logreg-sgdm", "synth20-logreg-adam", "synth20-mlp-tanh-sgd", "digits-logreg-sgd",
         "digits-mlp-gelu-adamw")


def measure(task: str, average: bool) -> dict:
    """One row: fit and attribute the test set at the defaults with ``average``."""
    exp = build_zoo_task(task)
    truth = zoo_ground_truth(exp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.process_time()
        attributor, attribution, _, _ = run_method(exp, "if-lissa", device="cpu", average=average)
        seconds = time.process_time() - t0
    return {"task": task, "average": average, "lds": lds(attribution.scores, truth.masks, truth.measurements)[0],
            "residual": attributor.residual_, "backoffs": len(attributor.solver_report_["stages"]),
            "cpu_seconds": seconds, "warnings": [str(w.message) for w in caught if "if-lissa" in str(w.message)]}


def main() -> None:
    run_over_tasks(__doc__, TASKS, lambda task: [measure(task, average) for average in (True, False)])

if __name__ == "__main__":
    main()
