"""The Kronecker damping match on MLPs of growing width: whether it runs (or falls back), on how many examples and
probes, at what time and memory beside the same fit at a given damping (no match), each row in a fresh process
(benchmarks/README.md, "The expected Fisher in C − 1 rows").

Each row: a 784-h-10 ReLU MLP trained 3 epochs by SGD on 2,000 generated examples (10 classes, a linear rule with
noise), then ``if-ekfac`` fitted on 1,800 of them with the SGD recipe (so the match's exact system takes the recipe's
ridge) and 50 test points attributed: the default (the match) and ``damping=0.5`` (the old spectrum rule, no match).
The row's memory is its own growth, peak resident set minus the resident set before the fit. Linux only.

    python benchmarks/bench_match_width.py [--hidden 64 256 1024] [--json FILE]
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

import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.training.train import TrainConfig

RECIPE = TrainConfig(epochs=3, batch_size=64, lr=0.05, optimizer="sgd")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _task(hidden: int) -> tuple[nn.Module, AttributionDataset, AttributionDataset]:
    torch.manual_seed(0)
    x = torch.randn(2000, 784)
    y = (x @ torch.randn(784, 10) + 0.5 * torch.randn(2000, 10)).argmax(1)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE.lr)
    for _ in range(RECIPE.epochs):
        for i in range(0, 1800, RECIPE.batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model, AttributionDataset(x[:1800], y[:1800]), AttributionDataset(x[1800:1850], y[1800:1850])


def measure(hidden: int, setting: str) -> dict:
    """One row, in this process."""
    model, train, test = _task(hidden)
    options = {} if setting == "matched" else {"damping": 0.5}
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS:")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attributor = get_method("if-ekfac", AttributionTask(model), train_config=RECIPE, **options).fit(train)
        attributor.attribute(test)
    match = attributor.damping_match_
    return {"hidden": hidden, "parameters": sum(p.numel() for p in model.parameters()), "setting": setting,
            "rule": attributor.damping_rule_, "examples": match.examples if match else None,
            "probes": match.probes if match else None, "seconds": time.perf_counter() - t0,
            "growth_mb": _status_mb("VmHWM:") - before,
            "warnings": [str(w.message)[:160] for w in caught if "matched" in str(w.message)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", nargs="*", type=int, default=[64, 256, 1024])
    parser.add_argument("--json", default=None)
    parser.add_argument("--row", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(int(args.row[0]), args.row[1])))
        return
    rows = []
    for hidden in args.hidden:
        for setting in ("given", "matched"):
            out = subprocess.run([sys.executable, __file__, "--row", str(hidden), setting], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
