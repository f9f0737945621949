"""if-lissa's precision: float32 minibatch products and iterates (the default) against float64, in one process, on zoo
tasks (benchmarks/README.md, "LiSSA's precision"): LDS of each against the cached truth, the largest relative
difference of their scores, and the time of fit + attribution as a ratio.

    python benchmarks/bench_lissa_precision.py --json benchmarks/results/lissa_precision_cpu.json [--task T ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rowfile import run_over_tasks  # noqa: E402

from tda_explorer.evaluate.harness import run_method  # noqa: E402
from tda_explorer.evaluate.metrics import lds  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth  # noqa: E402

TASKS = ("wine-mlp-adam", "digits-logreg-sgd", "synth20-mlp-tanh-sgd", "digits-mlp-sgdm")


def measure(name: str) -> dict:
    """One row: fit and attribute the test set at the defaults in float32 and in float64."""
    exp = build_zoo_task(name)
    truth = zoo_ground_truth(exp)
    runs = {}
    for precision in ("float32", "float64"):
        _, attribution, seconds, _ = run_method(exp, "if-lissa", device="cpu", precision=precision)
        runs[precision] = (attribution.scores.double(), seconds,
                           float(lds(attribution.scores, truth.masks, truth.measurements)[0]))
    (a, fast, lds32), (b, slow, lds64) = runs["float32"], runs["float64"]
    return {"task": name, "float32_seconds": fast, "float64_seconds": slow, "float64_over_float32": slow / fast,
            "float32_lds": lds32, "float64_lds": lds64,
            "max_relative_difference": float((a - b).abs().max() / b.abs().max())}


def main() -> None:
    run_over_tasks(__doc__, TASKS, lambda task: [measure(task)])

if __name__ == "__main__":
    main()
