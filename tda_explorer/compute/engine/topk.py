"""Top-k proponents and opponents over a large stored feature matrix, streamed in chunks.

Scores of a batch of queries against ``features`` (``[n, d]``: an array, or the path of a ``.npy`` file of
float32, float16, or bfloat16 stored as uint16) are computed a chunk of rows at a time and merged into running
top-k lists, so peak memory is set by ``max_memory`` — never by n — and all queries of a batch share one pass
over the store. A path is read chunk by chunk into one reused buffer (no memory map, so the file's pages never
count against the process); chunks are sized to stay in cache while they are converted and multiplied.
``topk_scores`` returns the same indices as a dense ``scores.topk`` (ties aside).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tda_explorer._validation import TDAError, as_device, check_positive_int


def _chunk_rows(dim: int, n_queries: int, max_memory: int) -> int:
    """Rows per chunk so that the chunk in float32 plus its scores fit ``max_memory`` bytes."""
    per_row = 4 * (dim + n_queries) + 2 * dim  # float32 copy + scores + the stored row itself
    return max(1, max_memory // per_row)


def _as_float(block: np.ndarray, bfloat16: bool, work: torch.Tensor) -> torch.Tensor:
    """``block`` widened to float32 in the reused buffer ``work`` (on the scoring device): the block travels in
    its stored precision and is converted in place, with no fresh allocation per chunk."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(np.ascontiguousarray(block))
    out = work[: len(tensor)]
    out.copy_(tensor.view(torch.bfloat16) if bfloat16 else tensor)
    return out


def _chunks(features: np.ndarray | str | Path, rows: int):
    """Yield ``(start, block)`` over the rows of an array or of a ``.npy`` file (read into a reused buffer)."""
    if not isinstance(features, (str, Path)):
        for start in range(0, features.shape[0], rows):
            yield start, features[start : start + rows]
        return
    with open(features, "rb") as f:
        shape, fortran, dtype = _header(f)
        if fortran:
            raise TDAError(f"{features}: Fortran-ordered arrays are not supported; save it C-ordered")
        buffer = np.empty((rows, shape[1]), dtype=dtype)
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            got = f.readinto(memoryview(buffer[:count]).cast("B"))
            if got != count * shape[1] * dtype.itemsize:
                raise TDAError(f"{features} is truncated at row {start} (expected {shape[0]} rows)")
            yield start, buffer[:count]


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an open ``.npy`` file, leaving it at the first data byte."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def _shape(features: np.ndarray | str | Path) -> tuple[int, ...]:
    if isinstance(features, (str, Path)):
        with open(features, "rb") as f:
            return _header(f)[0]
    return tuple(features.shape)


def topk_scores(features: np.ndarray | str | Path, queries: torch.Tensor, k: int, max_memory: int = 16 * 2**20,
                bfloat16: bool = False, device: str | torch.device | None = None,
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Streaming top-k of ``queries @ features.T``.

    Parameters
    ----------
    features : array ``[n, d]``, or the path of a ``.npy`` file (streamed)
    queries : tensor ``[q, d]``
    k : int
        Entries kept per query and side.
    max_memory : int
        Bytes one chunk may take (float32 copy and its scores).
    bfloat16 : bool
        The array holds bfloat16 bits as uint16 (the feature store's bfloat16 format).
    device : str or torch.device, optional
        Where chunks are scored and merged (default CPU); results come back on the CPU.

    Returns
    -------
    dict ``{"proponents": (scores [q, k], rows [q, k]), "opponents": (...)}``, proponents by decreasing score,
    opponents by increasing score.
    """
    device = as_device(device)
    shape = _shape(features)
    if len(shape) != 2:
        raise TDAError(f"features must be [n, d], got shape {shape}")
    queries = torch.as_tensor(queries, dtype=torch.float32).to(device)
    if queries.dim() == 1:
        queries = queries[None]
    if queries.shape[1] != shape[1]:
        raise TDAError(f"queries have {queries.shape[1]} features but the store has {shape[1]}")
    k = min(check_positive_int(k, "k"), shape[0])
    rows = _chunk_rows(shape[1], len(queries), check_positive_int(max_memory, "max_memory"))
    best = {side: (torch.empty(len(queries), 0, device=device), torch.empty(len(queries), 0, dtype=torch.long,
                                                                             device=device))
            for side in ("proponents", "opponents")}
    work = torch.empty(min(rows, shape[0]), shape[1], device=device)
    for start, block in _chunks(features, rows):
        scores = queries @ _as_float(block, bfloat16, work).T  # [q, chunk]
        index = torch.arange(start, start + scores.shape[1], device=device).expand(len(queries), -1)
        for side, largest in (("proponents", True), ("opponents", False)):
            values, idx = best[side]
            values = torch.cat([values, scores], dim=1)
            idx = torch.cat([idx, index], dim=1)
            top = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
            best[side] = (top.values, torch.gather(idx, 1, top.indices))
    return {side: (values.cpu(), idx.cpu()) for side, (values, idx) in best.items()}
