"""Top-k latency and memory on a large generated feature store (``tda-explorer bench topk``)."""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tda_explorer._validation import as_device, check_positive_int
from tda_explorer.compute.engine.topk import topk_scores


def write_random_store(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 16384) -> Path:
    """A float16 ``[n, dim]`` .npy of seeded Gaussian features, appended chunk by chunk (bounded memory)."""
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                 "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, chunk):
            f.write(torch.randn(min(chunk, n - start), dim, generator=gen).half().numpy().tobytes())
    return path


def bench_topk(n_train: int = 1_000_000, dim: int = 1024, k: int = 10, batch: int = 16,
               max_memory: int = 16 * 2**20, folder: str | None = None, repeats: int = 3,
               device: str | torch.device | None = None) -> dict:
    """Seconds per query for one query and for a batch sharing the pass (best of ``repeats``, the file in the OS
    page cache as after its first read), and the process's peak RSS (the store is streamed, never mapped); on
    CUDA also the peak device memory."""
    check_positive_int(n_train, "n_train")
    check_positive_int(dim, "dim")
    device = as_device(device)
    score = lambda q: topk_scores(store, q, k, max_memory, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t0 = time.perf_counter()
        store = write_random_store(Path(tmp) / "features.npy", n_train, dim)
        write_seconds = time.perf_counter() - t0
        queries = torch.randn(batch, dim, generator=torch.Generator().manual_seed(1))
        single = min(_timed(lambda: score(queries[:1])) for _ in range(repeats))
        batched = min(_timed(lambda: score(queries)) for _ in range(repeats))
    return {
        "device": str(device), "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda" else None,
        "n_train": n_train, "dim": dim, "dtype": "float16", "k": k, "max_memory_mb": max_memory / 2**20,
        "seconds_per_query": single, "seconds_per_query_batched": batched / batch, "batch": batch,
        "store_mb": n_train * dim * 2 / 2**20, "write_seconds": write_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
