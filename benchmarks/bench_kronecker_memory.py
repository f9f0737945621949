"""Peak memory of if-kfac / if-ekfac against kronfluence's K-FAC / EK-FAC on the zoo tasks, each row in a fresh process
(benchmarks/README.md, "Kronecker methods: memory beside kronfluence").

A process keeps the heap it freed, so rows measured one after another in one process start from different baselines;
here every (task, library, method) runs in its own process: build the task (the trained model and data, cached), then
reset the peak resident set (``/proc/self/clear_refs``) and run the method: fit and pairwise scores of the test set,
defaults (kronfluence as in ``bench_zoo``: true Fisher, damping = the weight decay, or its heuristic where that is 0);
ours twice: holding the training gradients between queries (``"gradients": "held"``, the default at these sizes) and
recomputing them at each query (``"recomputed"``, ``keep_gradients=False``, as kronfluence does).
The row's figure is its own growth: peak resident set minus the resident set it started from. Linux only.

    python benchmarks/bench_kronecker_memory.py --json benchmarks/results/kronecker_memory_cpu.json [--task T ...]
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
import peers  # noqa: E402
from rowfile import RowFile  # noqa: E402

from tda_explorer.evaluate.harness import run_method  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_tasks  # noqa: E402

METHODS = ("if-kfac", "if-ekfac")
#: ours holding the training gradients between queries (the default at these sizes) and recomputing them per query
#: (``keep_gradients=False``, what kronfluence does), then kronfluence
LIBRARIES = ("tda_explorer", "tda_explorer:recomputed", "kronfluence")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(task: str, library: str, method: str) -> dict:
    """One row, in this process: the method's peak resident-set growth over what the process held before it."""
    warnings.simplefilter("ignore")
    exp = build_zoo_task(task)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS:")
    t0 = time.perf_counter()
    gradients = None
    if library.startswith("tda_explorer"):
        gradients = "recomputed" if library.endswith(":recomputed") else "held"
        library = "tda_explorer"
        run_method(exp, method, device="cpu", keep_gradients=gradients == "held")
    else:
        damping = "wd" if exp.config.weight_decay else None
        peers.kronfluence_scores(exp, method.removeprefix("if-"), device="cpu", damping=damping)
    row = {"task": task, "library": library, "method": method, "before_mb": before,
           "growth_mb": _status_mb("VmHWM:") - before, "seconds": time.perf_counter() - t0}
    return row if gradients is None else row | {"gradients": gradients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--task", nargs="*", default=[t.name for t in zoo_tasks()])
    parser.add_argument("--row", nargs=3, metavar=("TASK", "LIBRARY", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(*args.row)))
        return
    if not peers.available("kronfluence"):
        sys.exit("kronfluence is not installed: make bench-deps")
    out = RowFile(args.json)
    for task in args.task:
        for method in METHODS:
            for library in LIBRARIES:
                done = subprocess.run([sys.executable, __file__, "--row", task, library, method],
                                      capture_output=True, text=True)
                lines = done.stdout.strip().splitlines()
                row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                    "task": task, "library": library, "method": method,
                    "status": f"error: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
                out.add(row)


if __name__ == "__main__":
    main()
