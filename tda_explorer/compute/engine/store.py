"""On-disk feature store: memory-mapped arrays keyed by a fingerprint, each with a manifest.

A key is a fingerprint of the model parameters, the task configuration, the featurisation
(projection) and the dataset, so an unchanged model is a cache hit and a changed parameter is a
miss. Arrays are written to a temporary file and renamed, so a crash never leaves a half-written
entry that looks complete; the manifest records shape, dtype and size, and an entry whose file
does not match its manifest is ignored (and recomputed).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from tda_explorer._validation import check_choice
from tda_explorer.atomic import atomic_path, load_tensors, save_tensors

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureStore:
    """Memory-mapped arrays under ``root``; ``get``/``put`` by key.

    Parameters
    ----------
    root : str or Path
        Folder of the store (created when needed).
    dtype : {"float32", "float16", "bfloat16"}
        Storage precision; features are returned as float32 tensors.
    """

    def __init__(self, root: str | Path, dtype: str = "float32"):
        self.root = Path(root)
        self.dtype = check_choice(dtype, "dtype", tuple(STORAGE_DTYPES))
        self.hits = 0
        self.misses = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.{self.dtype}.npy", self.root / f"{key}.{self.dtype}.json"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored features for ``key`` (float32), or None when missing or damaged."""
        data_path, meta_path = self._paths(key)
        if not (data_path.exists() and meta_path.exists()):
            self.misses += 1
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if data_path.stat().st_size != meta["bytes"]:
                raise ValueError(f"size {data_path.stat().st_size} != manifest {meta['bytes']}")
            array = np.load(data_path, mmap_mode="r")
            if list(array.shape) != meta["shape"]:
                raise ValueError(f"shape {array.shape} != manifest {meta['shape']}")
        except (ValueError, KeyError, OSError) as err:
            warnings.warn(f"feature store entry {key} is damaged ({err}); recomputing", stacklevel=2)
            self.misses += 1
            return None
        self.hits += 1
        tensor = torch.from_numpy(np.array(array))  # a private, writable copy
        if self.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def put(self, key: str, features: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
        """Store ``features`` under ``key``; returns them as they will be read back."""
        self.root.mkdir(parents=True, exist_ok=True)
        data_path, meta_path = self._paths(key)
        stored = features.detach().to("cpu", STORAGE_DTYPES[self.dtype]).contiguous()
        array = stored.view(torch.uint16).numpy() if self.dtype == "bfloat16" else stored.numpy()
        tmp = atomic_path(data_path).with_suffix(".npy")  # np.save appends .npy otherwise
        np.save(tmp, array)
        tmp.replace(data_path)
        manifest = {"shape": list(array.shape), "dtype": self.dtype, "bytes": data_path.stat().st_size, **(meta or {})}
        tmp_meta = atomic_path(meta_path)
        tmp_meta.write_text(json.dumps(manifest, default=repr))
        tmp_meta.replace(meta_path)
        return stored.float()

    def get_object(self, key: str):
        """A stored object of tensors (e.g. curvature factors) for ``key``, or None when missing or damaged."""
        obj = load_tensors(self.root / f"{key}.pt")
        if obj is None:
            self.misses += 1
        else:
            self.hits += 1
        return obj

    def put_object(self, key: str, obj, meta: dict | None = None) -> None:
        """Store an object of tensors, lists, dicts and strings under ``key`` (atomically, checksummed)."""
        save_tensors(obj, self.root / f"{key}.pt", meta)
