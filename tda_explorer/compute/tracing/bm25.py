"""BM25 lexical retrieval as a fact-tracing baseline, through the ``rank-bm25`` package (a benchmark/dev extra)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tda_explorer._validation import TDAError
from tda_explorer.data.text import WordTokenizer


def bm25_scores(queries: Sequence[str], documents: Sequence[str]) -> torch.Tensor:
    """Okapi BM25 (k1 = 1.5, b = 0.75) of every document for every query ``[n_queries, n_documents]``, on
    lower-cased words."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError as err:
        raise TDAError("the BM25 baseline needs rank-bm25: pip install 'tda_explorer[bench]' (or rank-bm25)") from err
    if not documents:
        raise TDAError("documents must hold at least one text")
    index = BM25Okapi([WordTokenizer.split(d) for d in documents])
    return torch.from_numpy(np.array([index.get_scores(WordTokenizer.split(q)) for q in queries], dtype=np.float64))
