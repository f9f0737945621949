"""Sharded, resumable featurisation with ``torch.distributed`` (run under ``torchrun``; one process works too).

The training set is cut into fixed-size shards (independent of the world size, so a run can resume with another
number of processes); shard i goes to rank i mod world size. Each shard's projected per-sample gradients are
written atomically as ``shard-XXXXX.npy`` with a small JSON manifest; a shard whose manifest carries the run's
fingerprint is skipped, so a killed run resumes where it stopped. ``manifest.json`` records the fingerprint
(model parameters, task, projection, data); a folder written for another fingerprint is refused with both shown.
``load_sharded`` reads the shards back in order and names any that is missing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tda_explorer._validation import TDAError, as_device, check_positive_int
from tda_explorer.atomic import atomic_path
from tda_explorer.compute.engine.featurize import Projector, iter_features, make_projector
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset


def _world() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launch_device(device: str | torch.device | None) -> torch.device:
    """The device of this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per rank)."""
    device = as_device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA with this rank's GPU as the current device); False
    when not launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def gather_summaries(summary: dict) -> list[dict] | None:
    """Every rank's summary in rank order on rank 0, None on the others; ``[summary]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [summary]
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, summary)
    return ranks if dist.get_rank() == 0 else None


def close_distributed(wait: bool = True) -> None:
    """Leave the process group. With ``wait`` every rank passes a barrier first, so none closes its connections while
    a peer is still inside a collective; a failing rank leaves without it (its peers would wait forever)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def store_fingerprint(task: AttributionTask, projector: Projector | None, train: AttributionDataset) -> str:
    """What a feature store was computed from: model parameters, task, projection and data."""
    return config_fingerprint(model_fingerprint(task.model), task.config(),
                              projector.config() if projector else None, train.fingerprint())


def _write_json(path: Path, data: dict) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def featurize_sharded(task: AttributionTask, train: AttributionDataset, folder: str | Path,
                      projection_dim: int | None = 1024, projection_seed: int = 0, shard_rows: int = 4096,
                      device: str | torch.device | None = None, stop_after: int | None = None,
                      projection_kind: str = "rademacher") -> dict:
    """Write this rank's shards of projected per-sample training gradients under ``folder``.

    Parameters
    ----------
    projection_dim, projection_seed, projection_kind
        As for attributors (``make_projector``); ``"logra"`` for large layers.
    stop_after : int, optional
        Stop after writing this many shards (simulates a crash; the next run resumes).

    Returns
    -------
    dict with the fingerprint, the shards this rank wrote and the ones it found done, the rows it wrote and the
    seconds its shard loop took (for throughput).
    """
    device = as_device(device)
    shard_rows = check_positive_int(shard_rows, "shard_rows")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for n, p in task.model.named_parameters() if n in task.tracked_names())
    projector = make_projector(task, projection_dim, projection_kind, projection_seed, device)
    fingerprint = store_fingerprint(task, projector, train)
    n_shards = -(-len(train) // shard_rows)
    manifest = {"fingerprint": fingerprint, "n": len(train), "dim": projector.dim_out if projector else n_params,
                "shard_rows": shard_rows, "n_shards": n_shards, "dtype": "float32",
                "projection": projector.config() if projector else None}
    rank, world = _world()
    path = folder / "manifest.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") != fingerprint or existing.get("shard_rows") != shard_rows:
            raise TDAError(
                f"{folder} holds features of another run (fingerprint {existing.get('fingerprint')}, shard_rows "
                f"{existing.get('shard_rows')}); this run is {fingerprint} with shard_rows {shard_rows}: use "
                "another folder or delete that one"
            )
    elif rank == 0:
        _write_json(path, manifest)
    written, found, rows_written = [], [], 0
    start_time = time.perf_counter()
    for shard in range(rank, n_shards, world):
        done = folder / f"shard-{shard:05d}.json"
        if done.exists() and json.loads(done.read_text()).get("fingerprint") == fingerprint:
            found.append(shard)
            continue
        if stop_after is not None and len(written) >= stop_after:
            break
        rows = list(range(shard * shard_rows, min((shard + 1) * shard_rows, len(train))))
        part = train.subset(rows)
        chunks = [g.float() for _, g in iter_features(task, part, task.train_loss, projector, device=device)]
        array = torch.cat(chunks).cpu().numpy().astype(np.float32)
        target = folder / f"shard-{shard:05d}.npy"
        tmp = atomic_path(target).with_suffix(".npy")
        np.save(tmp, array)
        tmp.replace(target)
        _write_json(done, {"fingerprint": fingerprint, "rows": [rows[0], rows[-1] + 1], "rank": rank})
        written.append(shard)
        rows_written += len(rows)
    seconds = time.perf_counter() - start_time
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return {"fingerprint": fingerprint, "rank": rank, "world_size": world, "written": written, "found": found,
            "n_shards": n_shards, "rows_written": rows_written, "seconds": seconds}


def load_sharded(folder: str | Path) -> torch.Tensor:
    """All shards of a finished run, in training order ``[n, dim]``; a missing shard is named."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        raise TDAError(f"{folder} has no manifest.json: run `tda-explorer featurize --out {folder}` first")
    manifest = json.loads(path.read_text())
    def done(i: int) -> bool:
        path = folder / f"shard-{i:05d}.json"
        return path.exists() and json.loads(path.read_text()).get("fingerprint") == manifest["fingerprint"]

    missing = [i for i in range(manifest["n_shards"]) if not done(i)]
    if missing:
        raise TDAError(f"{folder}: shards {missing[:10]} of {manifest['n_shards']} are missing or from another run; "
                       "run featurize again on the same folder to finish them")
    return torch.cat([torch.from_numpy(np.load(folder / f"shard-{i:05d}.npy")) for i in range(manifest["n_shards"])])
