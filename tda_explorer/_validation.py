"""Shared ``check_*`` helpers: validate at the public boundary, name the argument in every error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tda_explorer.errors import TDAError


def check_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    """Return ``value`` as an int, or raise if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TDAError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    low = 0 if allow_zero else 1
    if value < low:
        raise TDAError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_fraction(value: Any, name: str, *, inclusive_zero: bool = False) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1] with ``inclusive_zero``)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TDAError(f"{name} must be a number in (0, 1], got {value!r}") from None
    ok = (0.0 <= value <= 1.0) if inclusive_zero else (0.0 < value <= 1.0)
    if not ok or not np.isfinite(value):
        bounds = "[0, 1]" if inclusive_zero else "(0, 1]"
        raise TDAError(f"{name} must be in {bounds}, got {value}")
    return value


def check_nonnegative(value: Any, name: str, *, allow_zero: bool = True, optional: bool = False) -> float | None:
    """Return ``value`` as a finite float ≥ 0 (> 0 without ``allow_zero``); None passes with ``optional``."""
    if value is None and optional:
        return None
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TDAError(f"{name} must be a number {bound}, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise TDAError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise list them in the error."""
    if value not in choices:
        raise TDAError(f"unknown {name} {value!r}; expected one of: {', '.join(map(str, choices))}")
    return value


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating ``tensor`` has no NaN or inf: its sum is finite (one read, no mask the tensor's size), else,
    since a sum of finite values can overflow, every element checked."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(tensor: torch.Tensor, name: str, ids: Sequence[Any] | None = None) -> torch.Tensor:
    """Raise if ``tensor`` has NaN or inf; with ``ids`` (one per row) name the offending rows."""
    if tensor.is_floating_point() and not all_finite(tensor):
        if ids is not None and tensor.dim() >= 1:
            bad_rows = (~torch.isfinite(tensor.reshape(len(tensor), -1))).any(dim=1)
            bad = [ids[i] for i in torch.nonzero(bad_rows).flatten().tolist()[:10]]
            raise TDAError(f"{name} has non-finite values for ids {bad}")
        raise TDAError(f"{name} has non-finite values")
    return tensor


def non_finite_ids(tensor: torch.Tensor, ids: Sequence[Any] | None = None, limit: int = 10) -> tuple[list, int]:
    """The first ``limit`` ids (row positions without ``ids``) of rows of ``tensor`` with NaN or inf, and how many
    such rows there are; ``([], 0)`` for a finite or non-floating tensor."""
    if not tensor.is_floating_point() or tensor.dim() == 0 or len(tensor) == 0 or all_finite(tensor):
        return [], 0
    bad_rows = (~torch.isfinite(tensor.reshape(len(tensor), -1))).any(dim=1)
    if not bad_rows.any():
        return [], 0
    rows = torch.nonzero(bad_rows).flatten().tolist()
    return [rows[i] if ids is None else ids[rows[i]] for i in range(min(limit, len(rows)))], len(rows)


def check_finite_rows(tensor: torch.Tensor, argument: str, ids: Sequence[Any] | None = None,
                      what: str = "inputs") -> torch.Tensor:
    """Raise naming ``argument`` and the first offending ids (row positions without ``ids``) if a row of
    ``tensor`` (the ``what`` of ``argument``) has NaN or inf."""
    bad, count = non_finite_ids(tensor, ids)
    if count:
        more = f" and {count - len(bad)} more" if count > len(bad) else ""
        label = "ids" if ids is not None else "rows"
        raise TDAError(f"{argument}: {what} have non-finite values (NaN or inf) for {label} {bad}{more}; "
                       "fix or drop these examples")
    return tensor


def _check_accelerator(device: Any, dev: torch.device, name: str, available: bool, count: int) -> None:
    if not available:
        raise TDAError(f"device {device!r} requested but {name} is not available on this machine; use device='cpu'")
    if dev.index is not None and dev.index >= count:
        raise TDAError(f"device {device!r} does not exist: this machine has {count} {name} device(s), "
                       f"{dev.type}:0..{dev.type}:{count - 1}")


def as_device(device: str | torch.device | None) -> torch.device:
    """Resolve ``device`` ('cpu', 'cuda', 'cuda:1', 'mps', 'xpu', a torch.device or None for CPU), refusing an
    accelerator this machine does not have."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TDAError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda":
        available = torch.cuda.is_available()
        _check_accelerator(device, dev, "CUDA", available, torch.cuda.device_count() if available else 0)
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        available = mps is not None and mps.is_available()
        _check_accelerator(device, dev, "MPS (Apple GPU)", available, 1)
    elif dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        available = xpu is not None and xpu.is_available()
        _check_accelerator(device, dev, "XPU (Intel GPU)", available, xpu.device_count() if available else 0)
    elif dev.type not in ("cpu", "meta"):
        raise TDAError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'mps' or 'xpu'")
    return dev
