"""Text generated here (nothing is downloaded): short product and film reviews with a sentiment label, a word
tokenizer, and the two views a transformer needs — classification examples and causal language-model
sequences with next-token targets.

The reviews have structure an attribution should find: negation flips a sentence's sentiment ("the soup was
not bland"), and in "A, but B" sentences the clause after "but" decides.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.data.dataset import IGNORE, AttributionDataset, DataSplit
from tda_explorer.data.noise import flip_labels
from tda_explorer.data.renderers import TextRenderer

SUBJECTS = ("the film", "the plot", "the pasta", "the soup", "this phone", "the battery", "the hotel", "our room",
            "the service", "the camera", "the concert", "the book")
POSITIVE = ("great", "wonderful", "excellent", "superb", "delightful", "lovely", "brilliant", "charming")
NEGATIVE = ("awful", "terrible", "dreadful", "horrible", "boring", "bland", "disappointing", "clumsy")
INTENSIFIERS = ("", "really ", "truly ", "very ", "quite ", "absolutely ")
SENTIMENTS = ["negative", "positive"]


class WordTokenizer:
    """Lower-cased words and punctuation marks; ids 0–3 are ``[PAD] [UNK] [BOS] [EOS]``."""

    SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
    PAD, UNK, BOS, EOS = range(4)

    def __init__(self, words: Sequence[str]):
        self.vocabulary = list(self.SPECIAL) + [w for w in words if w not in self.SPECIAL]
        self.index = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def fit(cls, texts: Sequence[str]) -> WordTokenizer:
        """A vocabulary of every word in ``texts``, most frequent first."""
        counts = Counter(w for t in texts for w in cls.split(t))
        return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, texts: Sequence[str], max_len: int, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """Token ids ``[n, max_len]``, cut at ``max_len`` and padded with ``[PAD]``."""
        max_len = check_positive_int(max_len, "max_len")
        out = torch.full((len(texts), max_len), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.BOS] * bos + [self.index.get(w, self.UNK) for w in self.split(text)] + [self.EOS] * eos
            ids = ids[:max_len]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        """The words of one row of ids, padding and markers left out."""
        return " ".join(self.vocabulary[i] for i in ids.tolist() if i >= len(self.SPECIAL))


def make_reviews(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """``n`` generated reviews and their sentiment (0 negative, 1 positive)."""
    n = check_positive_int(n, "n")
    gen = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=gen))
        words = POSITIVE if label else NEGATIVE
        subject, intensity = pick(SUBJECTS), pick(INTENSIFIERS)
        form = int(torch.randint(5, (1,), generator=gen))
        if form == 0:
            text = f"{subject} was {intensity}{pick(words)}."
        elif form == 1:
            text = f"i found {subject} {intensity}{pick(words)}."
        elif form == 2:  # negation: the adjective has the opposite sentiment
            text = f"{subject} was not {pick(NEGATIVE if label else POSITIVE)}."
        elif form == 3:  # contrast: the clause after "but" decides
            text = f"{subject} was {pick(NEGATIVE if label else POSITIVE)}, but {pick(SUBJECTS)} was {pick(words)}."
        else:
            text = f"honestly, {subject} is {intensity}{pick(words)}!"
        texts.append(text)
        labels.append(label)
    return texts, torch.tensor(labels)


@dataclass
class TextSplit(DataSplit):
    """A ``DataSplit`` of token ids with the tokenizer that made them."""

    tokenizer: WordTokenizer | None = None


def load_reviews_split(n_train: int = 600, n_test: int = 200, noise: float = 0.0, seed: int = 0,
                       max_len: int = 16) -> TextSplit:
    """Generated reviews as a sentiment-classification split of token ids ``[n, max_len]``.

    The tokenizer is fitted on the training texts; ``noise`` flips that fraction of training labels (mask kept).
    """
    n_train, n_test = check_positive_int(n_train, "n_train"), check_positive_int(n_test, "n_test")
    texts, labels = make_reviews(n_train + n_test, seed)
    tokenizer = WordTokenizer.fit(texts[:n_train])
    ids = tokenizer.encode(texts, max_len)
    clean = labels[:n_train]
    noisy, flipped = flip_labels(clean, noise, 2, seed=seed + 1)
    train = AttributionDataset(ids[:n_train], noisy, list(range(n_train)), SENTIMENTS,
                               TextRenderer(texts[:n_train]), "reviews-train")
    test = AttributionDataset(ids[n_train:], labels[n_train:], list(range(n_test)), SENTIMENTS,
                              TextRenderer(texts[n_train:]), "reviews-test")
    return TextSplit(train, test, flipped, clean, tokenizer)


def next_token_examples(texts: Sequence[str], tokenizer: WordTokenizer, max_len: int,
                        prompt_words: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[BOS] w1 … w_{T-1}`` and next-token targets ``w1 … w_T [EOS]`` ``[n, max_len]``, padding ``IGNORE``.

    With ``prompt_words`` (one count per text) the targets of each text's first that-many words are ``IGNORE`` too,
    and no ``[EOS]`` is scored: the loss is on the continuation (an answer) alone.
    """
    full = tokenizer.encode(texts, check_positive_int(max_len, "max_len") + 1, bos=True, eos=prompt_words is None)
    inputs, targets = full[:, :-1].clone(), full[:, 1:].clone()
    for row, n in enumerate(prompt_words or []):
        targets[row, :n] = IGNORE  # targets[t] is token t+1 of [BOS] prompt answer
    targets[targets == tokenizer.PAD] = IGNORE
    return inputs, targets


def language_model_dataset(texts: Sequence[str], tokenizer: WordTokenizer, max_len: int = 16,
                           ids: Sequence[Any] | None = None, name: str = "text-lm") -> AttributionDataset:
    """Causal language-model examples: inputs ``[BOS] w1 … w_{T-1}`` and targets ``w1 … w_T [EOS]``
    (padding positions get ``IGNORE``), so each example's loss is its mean next-token loss."""
    if not texts:
        raise TDAError("texts must hold at least one text")
    inputs, targets = next_token_examples(texts, tokenizer, max_len)
    return AttributionDataset(inputs, targets, ids, tokenizer.vocabulary, TextRenderer(list(texts)), name)
