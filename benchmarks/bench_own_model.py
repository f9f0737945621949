"""Your own data as it is: featurisation through a torch ``Dataset`` + ``DataLoader``
(``AttributionDataset.from_torch``) as a ratio to the in-memory tensor path, on the same data and model, measured in
the same run (runs interleaved, best of ``--repeats``).

    python benchmarks/bench_own_model.py [--n-train 2000] [--device cpu] [--json own_model.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer.compute.engine.kfac import linear_layer_names
from tda_explorer.compute.methods import get_method


class GeneratedImages(Dataset):
    """3×32×32 images generated from a seed, returned item by item as ``(image, label)``."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=gen)
        self.labels = (self.images[:, 0].mean((1, 2)) > self.images[:, 1].mean((1, 2))).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(),
                         nn.Linear(64, 2))


def seconds(method: str, task: AttributionTask, data: AttributionDataset, device: str, **options) -> float:
    t0 = time.perf_counter()
    get_method(method, task, device=device, **options).fit(data)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    images = GeneratedImages(args.n_train)
    tensor = AttributionDataset(images.images, images.labels, name="images-tensor")
    lazy = AttributionDataset.from_torch(images, batch_size=64)
    model = cnn()
    settings = {
        "grad-dot, Rademacher k=512": ("grad-dot", AttributionTask(model), {"projection_dim": 512}),
        "grad-dot, LoGra rank 16": ("grad-dot", AttributionTask(model, parameters=linear_layer_names(model)),
                                    {"projection_dim": 16, "projection_kind": "logra"}),
    }
    rows = []
    for label, (method, task, options) in settings.items():
        best = {"tensor": float("inf"), "dataloader": float("inf")}
        for _ in range(args.repeats):  # interleaved: both paths see the same machine load
            best["tensor"] = min(best["tensor"], seconds(method, task, tensor, args.device, **options))
            best["dataloader"] = min(best["dataloader"], seconds(method, task, lazy, args.device, **options))
        rows.append({"setting": label, "n_train": args.n_train, "tensor_s": best["tensor"],
                     "dataloader_s": best["dataloader"], "ratio": best["dataloader"] / best["tensor"]})
        print(f"{label}: tensor {best['tensor']:.2f} s, DataLoader {best['dataloader']:.2f} s, "
              f"ratio {rows[-1]['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
