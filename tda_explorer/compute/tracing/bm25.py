"""BM25 lexical retrieval as a fact-tracing baseline, through the ``rank-bm25`` package (a benchmark/dev extra)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import Family, register
from tda_explorer.data.text import WordTokenizer


@dataclass
class BM25Arguments:
    """BM25 takes no options (k1 = 1.5 and b = 0.75 are rank-bm25's Okapi defaults)."""


@register("bm25", Family.TRACING, BM25Arguments, needs=("text",))
def bm25_scores(queries: Sequence[str], documents: Sequence[str]) -> torch.Tensor:
    """Okapi BM25 lexical retrieval: every document's score for every query, on lower-cased words.

    Returns ``[n_queries, n_documents]`` (k1 = 1.5, b = 0.75). ``rank-bm25`` is imported on the first call only.
    """
    try:
        from rank_bm25 import BM25Okapi
    except ImportError as err:
        raise TDAError("the BM25 baseline needs rank-bm25: pip install 'tda_explorer[bench]' (or rank-bm25)") from err
    if not documents:
        raise TDAError("documents must hold at least one text")
    index = BM25Okapi([WordTokenizer.split(d) for d in documents])
    return torch.from_numpy(np.array([index.get_scores(WordTokenizer.split(q)) for q in queries], dtype=np.float64))
