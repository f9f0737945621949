"""The fact-tracing scenario: a small causal LM trained here on generated fictional facts, and per-query precision,
recall and F1 of each tracing method against the facts' supporting documents.

Ranking methods (TracIn, TrackStar, BM25) need a cut-off and two-stage tracing a support decision; neither is given
by the sources, so every method is calibrated the same way, from the same choices: on the first half of the queries
(the calibration half) the rule — the top k, or an absolute score threshold — and its cut-off that maximise mean F1
are chosen, and the figures are reported on the other half. (A sentence encoder's cosines shift from query to
query, so with the MiniLM verifier the top k wins over a threshold: benchmarks/README.md.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tda_explorer._validation import TDAError, as_device, check_choice
from tda_explorer.compute.catalogue import Resources
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import TracIn, TrackStar
from tda_explorer.compute.models.transformer import TinyTransformer, make_transformer
from tda_explorer.compute.tracing.fasttrack import CachedEmbedding, TwoStageTracer
from tda_explorer.compute.tracing.verifiers import EmbeddingVerifier, GradientVerifier
from tda_explorer.compute.training.train import TrainConfig, TrainingRecord, train_model
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.facts import FactCorpus, make_fact_corpus, query_dataset
from tda_explorer.data.text import WordTokenizer, language_model_dataset

TRACING_METHODS = ("trackstar", "fasttrack", "tracin", "bm25")
VERIFIERS = ("auto", "embedding", "gradient")
CUTOFF_RULES = ("top-k", "threshold")
EMBEDDINGS = ("auto", "minilm", "minilm-int8", "model-token-idf")
FACT_TRAINING = TrainConfig(epochs=60, batch_size=32, lr=3e-3, weight_decay=0.0, optimizer="adam", n_checkpoints=5)
MAX_LEN = 16
PROJECTION_DIM = 1024


@dataclass
class FactExperiment:
    """The corpus, its tokenizer, the documents and queries as LM examples, and the trained LM's record."""

    corpus: FactCorpus
    tokenizer: WordTokenizer
    documents: AttributionDataset
    queries: AttributionDataset
    record: TrainingRecord

    @property
    def model(self) -> TinyTransformer:
        return self.record.model

    train = property(lambda self: self.documents, doc="The documents traced (``Scenario.train``).")
    test = property(lambda self: self.queries, doc="The queries (``Scenario.test``).")

    def task(self) -> AttributionTask:
        return AttributionTask(self.model, checkpoints=self.record.checkpoints)

    def resources(self, device: str = "cpu") -> Resources:
        """The run's checkpoints; its documents and queries are text."""
        return {"checkpoints": dict, "text": dict}


def build_fact_experiment(seed: int = 0, config: TrainConfig = FACT_TRAINING, device: str = "cpu") -> FactExperiment:
    corpus = make_fact_corpus(seed=seed)
    tokenizer = WordTokenizer.fit(corpus.documents + [corpus.query_text(q) for q in range(len(corpus.queries))])
    documents = language_model_dataset(corpus.documents, tokenizer, MAX_LEN, name="fact-documents")
    queries = query_dataset(corpus, tokenizer, MAX_LEN)
    factory = lambda s: make_transformer("causal-lm", tokenizer.vocab_size, seed=s, d_model=64, max_len=MAX_LEN)
    record = train_model(factory, documents.inputs, documents.labels, config, device=device)
    return FactExperiment(corpus, tokenizer, documents, queries, record)


def model_text_embedding(model: TinyTransformer, tokenizer: WordTokenizer, texts: list[str]):
    """``texts -> [n, d]``: the LM's own input token embeddings averaged with idf weights (idf over ``texts``, the
    training corpus), so rare words — names — dominate and clusters gather what is said about one entity. (The
    final hidden state, tried first, clusters by sentence template instead.)"""
    documents = [set(tokenizer.split(t)) for t in texts]
    counts: dict[str, int] = {}
    for words in documents:
        for w in words:
            counts[w] = counts.get(w, 0) + 1
    idf = torch.zeros(tokenizer.vocab_size)
    for word, count in counts.items():
        if word in tokenizer.index:
            idf[tokenizer.index[word]] = math.log(len(texts) / count)

    def embed(batch: list[str]) -> torch.Tensor:
        ids = tokenizer.encode(batch, MAX_LEN)  # unknown words become [UNK], which has idf 0
        weights = idf[ids] * (ids != tokenizer.PAD)
        with torch.no_grad():
            vectors = model.tokens.weight[ids]
        return (vectors * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)

    return embed


def stage1_embedding(experiment: FactExperiment, embedding: str = "auto", device: str = "cpu"):
    """The stage-1 encoder and its name: ``embedding`` "minilm" (the packaged MiniLM), "minilm-int8" (its int8
    Linear layers, CPU only: see ``quantize_linear_int8``), "model-token-idf" (the LM's own idf-weighted token
    embeddings) or "auto" (MiniLM when installed — int8 on the CPU — else the LM's)."""
    check_choice(embedding, "embedding", EMBEDDINGS)
    if embedding == "model-token-idf":
        return model_text_embedding(experiment.model, experiment.tokenizer, experiment.corpus.documents), embedding
    from tda_explorer.compute.models.pretrained import minilm_embedding

    if embedding == "auto":
        try:
            quantize = as_device(device).type == "cpu"
            return minilm_embedding(quantize=quantize, device=device), "minilm-int8" if quantize else "minilm"
        except (TDAError, ImportError):
            return stage1_embedding(experiment, "model-token-idf", device)
    return minilm_embedding(quantize=embedding == "minilm-int8", device=device), embedding


def make_verifier(experiment: FactExperiment, verifier: str, embed: CachedEmbedding, embedding: str,
                  device: str = "cpu"):
    """``verifier``: "embedding" (the stage-1 encoder's cosine; needs MiniLM), "gradient" (the LM's answer-aligned
    gradient cosine) or "auto" (embedding when MiniLM is installed, else gradient)."""
    check_choice(verifier, "verifier", VERIFIERS)
    if verifier == "auto":
        verifier = "embedding" if embedding.startswith("minilm") else "gradient"
    if verifier == "gradient":
        return GradientVerifier(experiment.model, experiment.tokenizer, MAX_LEN, device=device)
    if not embedding.startswith("minilm"):
        raise TDAError("verifier='embedding' needs the MiniLM sentence encoder (pip install 'tda_explorer[text]'); "
                       "without it use verifier='gradient'")
    return EmbeddingVerifier(embed, name=f"embedding-cosine:{embedding}")


def _f1(selected: list[set], gold: list[list[int]]) -> tuple[float, float, float]:
    p, r, f = [], [], []
    for chosen, truth in zip(selected, gold):
        hits = len(chosen & set(truth))
        precision = hits / len(chosen) if chosen else 0.0
        recall = hits / len(truth)
        p.append(precision)
        r.append(recall)
        f.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    return float(np.mean(p)), float(np.mean(r)), float(np.mean(f))


def _select(scores: torch.Tensor, rule: str, cutoff: float) -> list[set]:
    if rule == "top-k":
        return [set(row.topk(int(cutoff)).indices[row.topk(int(cutoff)).values > -np.inf].tolist()) for row in scores]
    return [set(torch.nonzero(row >= cutoff).flatten().tolist()) for row in scores]


def _cutoffs(scores: torch.Tensor, rule: str) -> list[float]:
    if rule == "top-k":
        return list(range(1, min(20, scores.shape[1]) + 1))
    finite = scores[torch.isfinite(scores)]
    return sorted(set(np.quantile(finite.numpy(), np.linspace(0, 1, 101)).tolist())) if finite.numel() else []


def calibrated_f1(scores: torch.Tensor, gold: list[list[int]], rules: str | Sequence[str] = CUTOFF_RULES
                  ) -> dict[str, Any]:
    """Choose the cut-off rule among ``rules`` — "top-k" or "threshold" (score ≥ t) — and its cut-off that maximise
    mean F1 on the first half of the queries; precision, recall and F1 (macro over queries) on the second half."""
    rules = [rules] if isinstance(rules, str) else list(rules)
    for rule in rules:
        check_choice(rule, "rule", CUTOFF_RULES)
    half = len(gold) // 2
    if half == 0:
        raise TDAError("calibrating a cut-off needs at least two queries")
    options = [(rule, c) for rule in rules for c in _cutoffs(scores[:half], rule)]
    rule, best = max(options, key=lambda o: _f1(_select(scores[:half], *o), gold[:half])[2])
    precision, recall, f1 = _f1(_select(scores[half:], rule, best), gold[half:])
    return {"precision": precision, "recall": recall, "f1": f1, "cutoff_rule": rule, "cutoff": best,
            "calibration_queries": half, "evaluation_queries": len(gold) - half}


def trace_scores(experiment: FactExperiment, method: str, device: str = "cpu", verifier: str = "auto",
                 embedding: str = "auto") -> tuple[torch.Tensor, dict]:
    """Scores ``[n_queries, n_documents]`` of ``method`` (−inf outside two-stage candidates) and what it reports;
    ``verifier`` and ``embedding`` pick the two-stage method's verifier and encoder (see ``make_verifier`` and
    ``stage1_embedding``)."""
    check_choice(method, "method", TRACING_METHODS)
    corpus, info = experiment.corpus, {}
    if method == "bm25":
        from tda_explorer.compute.tracing.bm25 import bm25_scores

        texts = [corpus.query_text(q) for q in range(len(corpus.queries))]
        return bm25_scores(texts, corpus.documents), info
    if method in ("tracin", "trackstar"):
        cls = TracIn if method == "tracin" else TrackStar
        attributor = cls(experiment.task(), projection_dim=PROJECTION_DIM, device=device)
        scores = attributor.fit(experiment.documents).attribute(experiment.queries).scores.double()
        if method == "trackstar":
            info["query_mix"] = attributor.query_mix_
        return scores, info
    encoder, info["embedding"] = stage1_embedding(experiment, embedding, device)
    embed = CachedEmbedding(encoder)
    judge = make_verifier(experiment, verifier, embed, info["embedding"], device)
    tracer = TwoStageTracer(embed, judge, threshold=-np.inf).fit(corpus.documents)
    table = tracer.trace(corpus.queries)
    scores = torch.full((len(corpus.queries), len(corpus.documents)), -np.inf, dtype=torch.float64)
    rows, columns = (torch.tensor(table[c].to_numpy(copy=True)) for c in ("query_id", "train_id"))
    scores[rows, columns] = torch.tensor(table["verifier_score"].to_numpy(copy=True))
    candidates = [set(table.loc[table["query_id"] == q, "train_id"]) for q in range(len(corpus.queries))]
    info.update(verifier=tracer.verifier_name, clusters=len(tracer.clusters_), seconds_index=tracer.fit_seconds_,
                stage1_recall=float(np.mean([len(c & set(g)) / len(g) for c, g in zip(candidates, corpus.gold)])),
                candidates_per_query=float(np.mean([len(c) for c in candidates])))
    if isinstance(judge, GradientVerifier):
        info["gradients_computed"] = judge.gradients_computed
    return scores, info


def evaluate_tracing(method: str, seed: int = 0, device: str = "cpu", verifier: str = "auto",
                     embedding: str = "auto", experiment: FactExperiment | None = None) -> dict[str, Any]:
    """Train the fact LM (or take ``experiment``, already trained) and evaluate ``method``: ``precision``,
    ``recall``, ``f1`` (macro over evaluation queries), ``seconds`` (tracing every query over the corpus from
    scratch — loading an encoder, embedding and clustering included — training excluded) and, for two-stage
    tracing, ``stage1_recall``, ``seconds_index`` (embedding and clustering the corpus, reusable across queries) and
    the ``verifier``."""
    experiment = experiment if experiment is not None else build_fact_experiment(seed, device=device)
    corpus = experiment.corpus
    t0 = time.perf_counter()
    scores, info = trace_scores(experiment, method, device=device, verifier=verifier, embedding=embedding)
    seconds = time.perf_counter() - t0
    result = {"method": method, "scenario": "facts", "documents": len(corpus.documents),
              "facts": len(corpus.facts), "queries": len(corpus.queries), "supporting_per_fact": len(corpus.gold[0]),
              "seconds": seconds, **calibrated_f1(scores, corpus.gold), **info}
    return result
