"""Fingerprints of models and configurations: equal inputs, equal key; a changed parameter, a new key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def model_fingerprint(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes and values)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BatchNorm's step
    return h.hexdigest()[:16]


def _stable(value: Any) -> Any:
    """A session-independent stand-in for values JSON cannot hold (no memory addresses)."""
    import dataclasses

    fingerprint = getattr(value, "fingerprint", None)
    if callable(fingerprint) and not isinstance(value, type):  # datasets, recordings: a hash of their contents
        return {"fingerprint": f"{type(value).__qualname__}:{fingerprint()}"}
    if isinstance(value, nn.Module):
        return {"module": model_fingerprint(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields go through this function in turn
        return {"dataclass": type(value).__qualname__,
                **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)}}
    if isinstance(value, torch.Tensor):
        return {"tensor": hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]}
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return repr(value)


def config_fingerprint(*parts: Any) -> str:
    """Hash of JSON-able parts (dicts are key-sorted; callables by name, dataclasses by fields)."""
    blob = json.dumps(parts, sort_keys=True, default=_stable)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
