"""Peak memory of if-explicit's exact forms on the zoo tasks against the size of the matrix each form needs, each task
in a fresh process (benchmarks/README.md, "if-explicit's memory").

The floor of an exact solve is its matrix: the p × p curvature (``dense``) or, through the GGN's factor A
(``[n·C, p]``), A and the n·C × n·C matrix AAᵀ + μI (``kernel``), in float64; ``_exact_form`` picks the form by that
size. The row's figure is the fit, pairwise scores of the test set and self-influence at the defaults: the process's
peak resident-set growth over what it held after building the task (``/proc/self/clear_refs``), and its ratio to the
floor. Linux only.

    python benchmarks/bench_explicit_memory.py --json benchmarks/results/explicit_memory_cpu.json [--task T ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_kronecker_memory import _status_mb  # noqa: E402
from rowfile import RowFile  # noqa: E402

from tda_explorer.compute.methods import get_method  # noqa: E402
from tda_explorer.evaluate.harness import method_options  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_tasks  # noqa: E402


def measure(task: str) -> dict:
    """One task's row, in this process."""
    warnings.simplefilter("ignore")
    exp = build_zoo_task(task)
    options, _ = method_options(exp, "if-explicit")  # the recipe the default damping reads, before the reset
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS:")
    t0 = time.perf_counter()
    method = get_method("if-explicit", exp.task(), **options).fit(exp.split.train)
    method.attribute(exp.split.test)
    method.self_influence()
    seconds, growth = time.perf_counter() - t0, _status_mb("VmHWM:") - before
    p = method.n_params
    rows = len(method.factor_) if method.form_ == "kernel" else None
    floor = 8 * (rows * (p + rows) if rows is not None else p * p) / 2**20
    return {"task": task, "params": p, "form": method.form_, "factor_rows": rows, "floor_mb": floor,
            "growth_mb": growth, "ratio": growth / floor, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--task", nargs="*", default=[t.name for t in zoo_tasks()])
    parser.add_argument("--row", metavar="TASK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.row)))
        return
    out = RowFile(args.json)
    for task in args.task:
        done = subprocess.run([sys.executable, __file__, "--row", task], capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        out.add(json.loads(lines[-1]) if done.returncode == 0 and lines else {
            "task": task, "status": f"error: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"})


if __name__ == "__main__":
    main()
