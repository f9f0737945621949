"""A session at scale, the way a user's own model arrives: generated 3×32×32 images read item by item through a torch
``Dataset``, a small ResNet trained in a plain loop, three methods computed, then the explorer opened again from
what the session folder stores.

Reported: ``peak_rss_mb`` (the whole process's peak resident memory: data, training, featurisation, scoring and the
explorer), ``first_panel_s`` (from the stored features and scores to the explorer's first complete panel: a new
``Session`` on the folder, the three methods loaded, ``Explorer`` built with its Browse panel filled), one training
epoch's time (timed over ``TRAIN_ROWS`` images, scaled to ``n_train``), and each method's time as a multiple of it.

    tda-explorer bench session [--n-train 50000] [--n-test 10000] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

METHODS = ("grad-dot", "grad-cos", "trak")
#: Each method's options: gradients projected to 512 features, per-sample gradients in chunks of at most 64 MB.
OPTIONS = {"projection_dim": 512, "max_memory": 2**26}
N_CLASSES = 10
#: The model is trained for one epoch over at most this many of the training images (the session is what is
#: measured, not training); ``epoch_s`` is that epoch's time scaled to all ``n_train`` (an epoch is linear in n).
TRAIN_ROWS = 10_000


class GeneratedImages(Dataset):
    """``n`` 3×32×32 images drawn item by item from ``(seed, index)``: a class-coloured square at a random place on
    noise; nothing is held but the labels."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.labels = torch.randint(0, N_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))
        self.colours = torch.rand(N_CLASSES, 3, generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        image = 0.3 * torch.rand(3, 32, 32, generator=gen)
        y = int(self.labels[i])
        size = 6 + y % 3 * 4
        r, c = torch.randint(0, 32 - size, (2,), generator=gen).tolist()
        image[:, r:r + size, c:c + size] += self.colours[y].view(3, 1, 1)
        return image, self.labels[i]


class Block(nn.Module):
    """A residual block: two 3×3 convolutions with BatchNorm, a strided 1×1 shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(width: int = 16) -> nn.Module:
    """A small ResNet for 32×32 images: a stem, three residual stages (width, 2·width, 4·width), pooling, a head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, N_CLASSES))


def train_one_epoch(model: nn.Module, data: Dataset, device: str) -> float:
    """One epoch of SGD with momentum through a ``DataLoader`` over ``data``; returns its seconds."""
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t0 = time.perf_counter()
    for x, y in DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model.eval()
    return time.perf_counter() - t0


def tracked_parameters(model: nn.Module) -> list[str]:
    """The last residual stage and the head (three quarters of the parameters): what is attributed at this scale,
    as TRAK and LoGra do, so per-sample backward passes stop before the full-resolution stages."""
    return [name for name, _ in model.named_parameters() if name.startswith(("5.", "8."))]


def map_large_buffers() -> bool:
    """glibc only: every allocation of 1 MB or more gets its own mapping (``mallopt(M_MMAP_THRESHOLD)``), so the
    tensors freed between blocks and phases leave the process instead of fragmenting its heap (identical runs peaked
    anywhere from 2.1 to 3.0 GB without it). The same holds for any user process with
    ``MALLOC_MMAP_THRESHOLD_=1048576`` in its environment. False where the C library has no ``mallopt``."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_session(n_train: int = 50_000, n_test: int = 10_000, device: str = "cpu", folder: str | None = None,
                  log=None) -> dict:
    """Train, compute ``METHODS`` in a session, then time reopening it up to the first complete panel."""
    from tda_explorer import AttributionDataset, AttributionTask, Session
    from tda_explorer.data import ImageRenderer
    from tda_explorer.widgets import Explorer

    def say(message: str) -> None:
        if log is not None:
            print(message, file=log, flush=True)

    mapped = map_large_buffers()
    folder = folder or tempfile.mkdtemp(prefix="tda-bench-session-")
    images_train, images_test = GeneratedImages(n_train, seed=0), GeneratedImages(n_test, seed=1)
    names, renderer = [f"class {c}" for c in range(N_CLASSES)], ImageRenderer((3, 32, 32), vmax=1.3)

    def datasets():
        return (AttributionDataset.from_torch(images_train, labels=images_train.labels, class_names=names,
                                              renderer=renderer, batch_size=256),
                AttributionDataset.from_torch(images_test, labels=images_test.labels, class_names=names,
                                              renderer=renderer, batch_size=256))

    model = resnet()
    trained_on = min(n_train, TRAIN_ROWS)
    epoch_s = train_one_epoch(model, Subset(images_train, range(trained_on)), device) * n_train / trained_on
    say(f"one training epoch over {n_train} images: {epoch_s:.1f} s (timed over {trained_on})")
    peaks = {"training": peak_rss_mb()}  # the process's peak after each phase: which one set it
    train, test = datasets()
    t0 = time.perf_counter()
    task = AttributionTask(model, parameters=tracked_parameters(model))
    session = Session(train, test, task, folder=folder, device=device)
    predict_s = time.perf_counter() - t0
    peaks["predictions"] = peak_rss_mb()
    seconds = {}
    for method in METHODS:
        t0 = time.perf_counter()
        session.compute(method, **OPTIONS, store=f"{folder}/features")
        seconds[method] = time.perf_counter() - t0
        peaks[method] = peak_rss_mb()
        say(f"{method}: {seconds[method]:.1f} s, peak {peaks[method]:.0f} MB")
    del session
    gc.collect()

    t0 = time.perf_counter()
    train, test = datasets()
    session = Session(train, test, AttributionTask(model, parameters=tracked_parameters(model)), folder=folder,
                      device=device)
    for method in METHODS:
        session.compute(method, **OPTIONS, store=f"{folder}/features")
    explorer = Explorer(session, k=10)
    shown = explorer.browser.shown_ids()
    first_panel_s = time.perf_counter() - t0
    want = session.attribution(explorer.state.method).topk(test.ids[0], 10, signed=True)[0]
    if not shown or shown != want:
        raise RuntimeError(f"the first panel shows {shown[:3]}…, not the top-10 proponents {want[:3]}…")
    return {
        "n_train": n_train, "n_test": n_test, "device": device, "model": "ResNet (3 stages, width 16)",
        "parameters": sum(p.numel() for p in model.parameters()), "trained_on": trained_on, "methods": list(METHODS),
        "attributed_parameters": sum(p.numel() for n, p in model.named_parameters()
                                     if n in tracked_parameters(model)),
        "options": OPTIONS, "large_buffers_mapped": mapped, "epoch_s": epoch_s, "predict_s": predict_s,
        "method_s": seconds, "method_epochs": {m: s / epoch_s for m, s in seconds.items()},
        "first_panel_s": first_panel_s, "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_after": peaks,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_session(log=sys.stderr), indent=1))
