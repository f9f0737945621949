"""Loading checkpoints from disk safely: tensors only, unless the caller explicitly trusts the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from tda_explorer.errors import TDAError


def load_checkpoint(path: str | Path, *, allow_pickle: bool = False, map_location: str = "cpu") -> dict:
    """A state dict from ``path``, loaded with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    path : str or Path
    allow_pickle : bool
        Unpickle arbitrary objects. A pickle can run any code when loaded: pass True only for a file
        you created yourself or fully trust.
    map_location : str
        Where tensors are loaded.

    Returns
    -------
    dict
        The state dict (a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped).
    """
    path = Path(path)
    if not path.exists():
        raise TDAError(f"path: checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise TDAError(
            f"path: {str(path)!r} holds more than tensors (it needs pickle: {str(err).splitlines()[0]}). "
            "Loading a pickle can run arbitrary code; if you created or trust this file, pass "
            "allow_pickle=True, or re-save it as a plain state dict (torch.save(model.state_dict(), path))"
        ) from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TDAError(f"path: {str(path)!r} does not hold a state dict of tensors")
    return obj
