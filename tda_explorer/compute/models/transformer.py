"""A small pre-LayerNorm transformer over token ids: a text classifier or a causal language model.

Every projection is an ``nn.Linear`` (attention's query/key/value/output and the feed-forward layers), so
K-FAC/EK-FAC and LoGra see all of them, and the attention is written out (no fused kernel), so ``vmap`` takes
per-example gradients through it. Token id 0 is padding: padded keys are never attended to, and the classifier
averages over real tokens only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_positive_int

PAD = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/output ``nn.Linear`` layers."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        if d_model % n_heads:
            raise TDAError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.causal = n_heads, causal
        self.query, self.key, self.value = (nn.Linear(d_model, d_model) for _ in range(3))
        self.output = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = lambda t: t.view(batch, length, self.n_heads, -1).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.n_heads)
        allowed = real[:, None, None, :]
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        mixed = scores.softmax(-1) @ v
        return self.output(mixed.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, causal: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, causal)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), real)
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Token ids ``[B, T]`` → class logits ``[B, C]`` (``causal=False``) or next-token logits ``[B, T, V]``.

    Parameters
    ----------
    vocab_size : int
    n_outputs : int
        Classes of a classifier; for a language model, the vocabulary size.
    causal : bool
        A causal language model (each position sees only earlier ones) instead of a classifier.
    d_model, n_heads, n_layers, max_len : int
    """

    def __init__(self, vocab_size: int, n_outputs: int, causal: bool = False, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2, max_len: int = 32):
        super().__init__()
        for value, name in ((vocab_size, "vocab_size"), (n_outputs, "n_outputs"), (d_model, "d_model"),
                            (n_heads, "n_heads"), (n_layers, "n_layers"), (max_len, "max_len")):
            check_positive_int(value, name)
        self.causal, self.max_len = causal, max_len
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, causal) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_outputs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point() or ids.dim() != 2:
            raise TDAError(f"a TinyTransformer takes integer token ids [batch, length], got {ids.dtype} "
                           f"{tuple(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise TDAError(f"sequences of {ids.shape[1]} tokens exceed max_len={self.max_len}")
        real = ids != PAD
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h, real)
        h = self.norm(h)
        if self.causal:
            return self.head(h)
        weights = real.to(h.dtype).unsqueeze(-1)
        return self.head((h * weights).sum(1) / weights.sum(1).clamp_min(1))


def make_transformer(kind: str, vocab_size: int, n_classes: int | None = None, seed: int = 0,
                     **sizes: int) -> TinyTransformer:
    """A seeded ``TinyTransformer``: ``kind="classifier"`` (needs ``n_classes``) or ``kind="causal-lm"``."""
    if kind not in ("classifier", "causal-lm"):
        raise TDAError(f"kind must be 'classifier' or 'causal-lm', got {kind!r}")
    if kind == "classifier" and n_classes is None:
        raise TDAError("a classifier needs n_classes")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyTransformer(vocab_size, n_classes if kind == "classifier" else vocab_size,
                               causal=kind == "causal-lm", **sizes)
    finally:
        torch.random.set_rng_state(state)
