"""Atomic, verifiable cache files.

``save_tensors`` writes beside the target under a name unique to this process, renames it into place
under a file lock (``filelock``), and records a manifest (size and SHA-256). ``load_tensors`` returns None —
with a warning — for a file that is missing, truncated, altered or unreadable, so callers recompute
instead of using it. Loading is always ``weights_only=True``: caches never unpickle code.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from filelock import FileLock


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on ``<path>.lock`` across processes and threads (``filelock``: POSIX and Windows)."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(lock)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def save_tensors(obj: Any, path: str | Path, meta: dict | None = None) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with a manifest of its size and checksum."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_manifest = atomic_path(path), atomic_path(_manifest_path(path))
    try:
        torch.save(obj, tmp)
        manifest = {"bytes": tmp.stat().st_size, "sha256": _digest(tmp), **(meta or {})}
        tmp_manifest.write_text(json.dumps(manifest, default=str))
        with file_lock(path):
            tmp.replace(path)
            tmp_manifest.replace(_manifest_path(path))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return path


def load_tensors(path: str | Path) -> Any | None:
    """The object saved at ``path``, or None (with a warning when the file exists but is damaged)."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    with file_lock(path):
        try:
            manifest = json.loads(_manifest_path(path).read_text())
            if path.stat().st_size != manifest["bytes"] or _digest(path) != manifest["sha256"]:
                raise ValueError("size or checksum differs from its manifest")
            return torch.load(path, weights_only=True)
        except Exception as err:  # any damage means: do not use it
            warnings.warn(f"cache entry {path} is damaged or incomplete ({err}); recomputing it", stacklevel=2)
            return None
