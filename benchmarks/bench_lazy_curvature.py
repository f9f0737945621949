"""The curvature solvers on a torch ``Dataset`` (``AttributionDataset.from_torch``) against the same data held in
memory, measured in the same run (benchmarks/README.md, "Curvature solvers on a torch Dataset").

A small CNN on generated 3×16×16 images (its forward costs more than the GGN factor's products, so the factor is
taken); each solver fits, scores 10 test points and computes self-influence at its defaults, on either form of the
data; the row gives both times and their ratio, and the largest relative difference of the scores.

    python benchmarks/bench_lazy_curvature.py [--n-train 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from rowfile import RowFile
from torch import nn
from torch.utils.data import TensorDataset

from tda_explorer import AttributionDataset, AttributionTask, get_method

SOLVERS = ("if-cg", "if-lissa", "if-arnoldi", "if-astra")


def _model(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
    optimizer = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _run(name: str, task: AttributionTask, train: AttributionDataset, test: AttributionDataset):
    t0 = time.perf_counter()
    method = get_method(name, task).fit(train)
    scores, self_influence = method.attribute(test).scores, method.self_influence()
    return time.perf_counter() - t0, scores, self_influence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.n_train, 3, 16, 16, generator=gen), torch.randint(0, 4, (args.n_train,), generator=gen)
    task = AttributionTask(_model(x, y))
    memory, test = AttributionDataset(x, y), AttributionDataset(x[:10], y[:10])
    lazy = AttributionDataset.from_torch(TensorDataset(x, y))
    out = RowFile(args.json, n_train=args.n_train)
    for name in SOLVERS:
        held_s, held_scores, held_self = _run(name, task, memory, test)
        lazy_s, lazy_scores, lazy_self = _run(name, task, lazy, test)
        difference = max(float((lazy_scores - held_scores).abs().max() / held_scores.abs().max()),
                         float((lazy_self - held_self).abs().max() / held_self.abs().max()))
        out.add({"method": name, "memory_s": held_s, "lazy_s": lazy_s, "lazy_over_memory": lazy_s / held_s,
                 "largest_relative_difference": difference})


if __name__ == "__main__":
    main()
