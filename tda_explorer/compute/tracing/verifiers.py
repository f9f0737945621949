"""Verifiers for two-stage fact tracing: ``verify(query, texts) -> scores`` (higher = more supportive).

- ``GradientVerifier``: the attributed model's own gradient similarity — the cosine between the query's loss
  gradient (on its target tokens when the query is a ``(prompt, target)`` pair) and each candidate's gradient,
  optionally projected; candidate gradients are cached, so a text shared by several queries costs once. With
  ``answer_aligned`` (the default) a candidate's gradient is that of its loss on the positions where it predicts
  the query's answer tokens, and a candidate that never predicts them scores −1 (the lowest cosine). A document's
  full-loss gradient is dominated by tokens that say nothing about the fact (the entity's name after the start of
  the text costs the most), so full-loss cosines could not tell a supporting paraphrase from another sentence
  about the same entity (benchmarks/README.md, "Design choices measured").
- ``EmbeddingVerifier``: a sentence encoder as a semantic judge — the cosine between the query's embedding (prompt
  and answer as one sentence) and each text's. With the shipped MiniLM it tells "X was born in Y" from "X once
  visited Y" where the fact LM's gradients cannot, because the encoder knows English; it is the source's LLM
  verifier scaled down to what ships offline. Share a ``CachedEmbedding`` with stage 1 and nothing is embedded
  twice.
- ``HuggingFaceVerifier``: a Hugging Face model the user already has on disk (never downloaded): an NLI
  cross-encoder's entailment probability (text as premise, query as hypothesis), or a causal LM's probability of
  " yes" against " no" after a support question.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tda_explorer._validation import TDAError, as_device, check_choice
from tda_explorer.compute.engine.featurize import make_projector
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.tracing.fasttrack import Embedder, Query, checked_embeddings, query_text, unit_rows
from tda_explorer.data.dataset import IGNORE
from tda_explorer.data.text import WordTokenizer, next_token_examples


class GradientVerifier:
    """Cosine of per-example loss gradients of a causal LM between a query and candidate texts.

    Parameters
    ----------
    model : nn.Module
        A causal LM over ``tokenizer``'s ids (token ids ``[B, T]`` → logits ``[B, T, V]``).
    tokenizer : WordTokenizer
    max_len : int
    parameters : list of str, optional
        Parameter prefixes whose gradients are compared (default all trainable).
    projection_dim : int, optional
        Random projection of the gradients (None: exact).
    device : str or torch.device
    """

    def __init__(self, model: nn.Module, tokenizer: WordTokenizer, max_len: int = 16,
                 parameters: Sequence[str] | None = None, projection_dim: int | None = None,
                 answer_aligned: bool = True, device: str | torch.device | None = None):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.answer_aligned = answer_aligned
        self.name = "model-gradient-cosine" + ("-answer-aligned" if answer_aligned else "")
        self.task = AttributionTask(model, parameters=parameters)
        self.names = self.task.tracked_names()
        self.device = as_device(device)
        self.projector = make_projector(self.task, projection_dim, "rademacher", 0, self.device)
        self.cache: dict[str, torch.Tensor] = {}
        self.gradients_computed = 0

    def _unit_gradients(self, pairs: Sequence[tuple[str, str | None]], answer: list[int] | None = None
                        ) -> torch.Tensor:
        texts = [p if t is None else f"{p} {t}" for p, t in pairs]
        prompts = None if pairs[0][1] is None else [len(self.tokenizer.split(p)) for p, _ in pairs]
        inputs, targets = next_token_examples(texts, self.tokenizer, self.max_len, prompts)
        if answer is not None:  # only the positions predicting the answer's tokens
            targets[~torch.isin(targets, torch.tensor(answer))] = IGNORE
        chunks = []
        for _, g in iter_per_sample_gradients(self.model, self.names, inputs, targets, cross_entropy,
                                              device=self.device, argument="verifier texts"):
            chunks.append(self.projector.project(g) if self.projector is not None else g)
        self.gradients_computed += len(pairs)
        g = torch.cat(chunks).double()
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def __call__(self, query: Query, texts: list[str]) -> list[float]:
        pair = (query, None) if isinstance(query, str) else tuple(query)
        answer = None
        if self.answer_aligned and pair[1] is not None:
            answer = [self.tokenizer.index[w] for w in self.tokenizer.split(pair[1]) if w in self.tokenizer.index]
            if not answer:  # an answer the model has no word for: no text can predict it
                return [-1.0] * len(texts)
        key = lambda text: (text, None if answer is None else tuple(answer))
        if answer is not None:
            ids = self.tokenizer.encode(texts, self.max_len + 1, bos=True, eos=True)[:, 1:] if texts else None
            has = torch.isin(ids, torch.tensor(answer)).any(1).tolist() if texts else []
        else:
            has = [True] * len(texts)
        missing = [t for t in dict.fromkeys(t for t, h in zip(texts, has) if h) if key(t) not in self.cache]
        if missing:
            for text, g in zip(missing, self._unit_gradients([(t, None) for t in missing], answer)):
                self.cache[key(text)] = g
        q = self._unit_gradients([pair])[0]
        return [float(self.cache[key(t)] @ q) if h else -1.0 for t, h in zip(texts, has)]


class EmbeddingVerifier:
    """Cosine between sentence embeddings of the query and of each candidate text.

    Parameters
    ----------
    embed : callable texts -> [n, d]
        A sentence encoder, e.g. ``minilm_embedding()``, ideally wrapped in a ``CachedEmbedding`` shared with the
        tracer's stage 1.
    name : str
        Recorded beside every score.
    """

    def __init__(self, embed: Embedder, name: str = "embedding-cosine"):
        if not callable(embed):
            raise TDAError(f"embed must be a callable texts -> [n, d], got {type(embed).__name__}")
        self.embed, self.name = embed, name

    def __call__(self, query: Query, texts: list[str]) -> list[float]:
        if not texts:
            return []
        candidates = unit_rows(checked_embeddings(self.embed, list(texts)))
        return (candidates @ unit_rows(checked_embeddings(self.embed, [query_text(query)], "query"))[0]).tolist()


class HuggingFaceVerifier:
    """A local Hugging Face model as a verifier (loaded with ``local_files_only``; nothing is downloaded).

    Parameters
    ----------
    path : str or Path
        A folder with the model and its tokenizer (``save_pretrained`` output).
    kind : {"nli", "causal-lm"}
        ``nli``: a sequence-classification model whose labels include "entailment"; the score is its probability
        with the text as premise and the query as hypothesis. ``causal-lm``: the probability of " yes" against
        " no" after ``Document: … Does the document support: …? Answer:``.
    device : str or torch.device
    """

    def __init__(self, path: str | Path, kind: str = "nli", device: str | torch.device | None = None):
        self.kind = check_choice(kind, "kind", ("nli", "causal-lm"))
        path = Path(path)
        if not path.is_dir():
            raise TDAError(f"path must be a local folder holding a Hugging Face model, got {str(path)!r}; "
                           "models are never downloaded here")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import transformers
        except ImportError as err:
            raise TDAError("HuggingFaceVerifier needs transformers: pip install 'tda_explorer[text]'") from err
        self.device = as_device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        loader = (transformers.AutoModelForSequenceClassification if kind == "nli"
                  else transformers.AutoModelForCausalLM)
        self.model = loader.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.name = f"hf-{kind}:{path.name}"
        if kind == "nli":
            labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
            if "entailment" not in labels:
                raise TDAError(f"{path} has labels {sorted(labels)}; an NLI verifier needs an 'entailment' label")
            self.entailment = labels["entailment"]
        else:
            ids = [self.tokenizer.encode(w, add_special_tokens=False) for w in (" yes", " no")]
            if any(len(i) == 0 for i in ids):
                raise TDAError(f"the tokenizer of {path} cannot encode ' yes' and ' no'")
            self.yes_no = [i[0] for i in ids]

    @torch.no_grad()
    def __call__(self, query: Query, texts: list[str]) -> list[float]:
        if not texts:
            return []
        claim = query_text(query)
        if self.kind == "nli":
            batch = self.tokenizer(list(texts), [claim] * len(texts), padding=True, truncation=True,
                                   return_tensors="pt").to(self.device)
            return self.model(**batch).logits.softmax(-1)[:, self.entailment].tolist()
        scores = []
        for text in texts:
            prompt = f"Document: {text}\nDoes the document support: {claim}? Answer:"
            batch = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits[0, -1, self.yes_no]
            scores.append(float(logits.softmax(-1)[0]))
        return scores
