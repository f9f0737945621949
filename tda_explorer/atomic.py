"""Atomic file writes: write beside the target under a name unique to this process, then rename.

A reader sees the old file or the new one, never half of one; two processes writing the same entry
at once each rename a complete file of their own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def save_tensors(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically (load it with ``weights_only=True``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
