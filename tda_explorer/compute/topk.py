"""Top-k proponents and opponents over a large stored feature matrix, streamed in chunks.

Scores of a batch of queries against ``features`` (``[n, d]``, any array a memory map can back: float32,
float16, or bfloat16 stored as uint16) are computed a chunk of rows at a time and merged into running top-k
lists, so peak memory is set by ``max_memory`` — never by n — and all queries of a batch share one pass over
the store. ``topk_scores`` returns the same indices as a dense ``scores.topk`` (ties aside).
"""

from __future__ import annotations

import numpy as np
import torch

from tda_explorer._validation import TDAError, check_positive_int


def _chunk_rows(dim: int, n_queries: int, max_memory: int) -> int:
    """Rows per chunk so that the chunk in float32 plus its scores fit ``max_memory`` bytes."""
    per_row = 4 * (dim + n_queries) + 2 * dim  # float32 copy + scores + the stored row itself
    return max(1, max_memory // per_row)


def _as_float(block: np.ndarray, bfloat16: bool) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(block))
    return tensor.view(torch.bfloat16).float() if bfloat16 else tensor.float()


def topk_scores(features: np.ndarray, queries: torch.Tensor, k: int, max_memory: int = 256 * 2**20,
                bfloat16: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Streaming top-k of ``queries @ features.T``.

    Parameters
    ----------
    features : array ``[n, d]`` (e.g. ``np.load(path, mmap_mode="r")``)
    queries : tensor ``[q, d]``
    k : int
        Entries kept per query and side.
    max_memory : int
        Bytes one chunk may take (float32 copy and its scores).
    bfloat16 : bool
        The array holds bfloat16 bits as uint16 (the feature store's bfloat16 format).

    Returns
    -------
    dict ``{"proponents": (scores [q, k], rows [q, k]), "opponents": (...)}``, proponents by decreasing score,
    opponents by increasing score.
    """
    if features.ndim != 2:
        raise TDAError(f"features must be [n, d], got shape {features.shape}")
    queries = torch.as_tensor(queries, dtype=torch.float32)
    if queries.dim() == 1:
        queries = queries[None]
    if queries.shape[1] != features.shape[1]:
        raise TDAError(f"queries have {queries.shape[1]} features but the store has {features.shape[1]}")
    n = features.shape[0]
    k = min(check_positive_int(k, "k"), n)
    rows = _chunk_rows(features.shape[1], len(queries), check_positive_int(max_memory, "max_memory"))
    best = {side: (torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long))
            for side in ("proponents", "opponents")}
    for start in range(0, n, rows):
        scores = queries @ _as_float(features[start : start + rows], bfloat16).T  # [q, chunk]
        index = torch.arange(start, start + scores.shape[1]).expand(len(queries), -1)
        for side, largest in (("proponents", True), ("opponents", False)):
            values, idx = best[side]
            values = torch.cat([values, scores], dim=1)
            idx = torch.cat([idx, index], dim=1)
            top = values.topk(min(k, values.shape[1]), dim=1, largest=largest)
            best[side] = (top.values, torch.gather(idx, 1, top.indices))
    return best
