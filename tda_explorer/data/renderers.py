"""Renderers turn one example into something a view can show: a PNG thumbnail or escaped HTML."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from tda_explorer._validation import TDAError


class Renderer(Protocol):
    """Shows one example; every view uses this and never needs to know the data's kind."""

    kind: str

    def to_html(self, x: torch.Tensor) -> str:
        """An HTML fragment (escaped) showing ``x`` (a ``"text"`` renderer is given the example's id)."""

    def to_png(self, x: torch.Tensor) -> bytes | None:
        """A PNG thumbnail of ``x``, or None for non-image data."""


class ImageRenderer:
    """Grey-scale (H, W) or colour (C, H, W) images, upscaled with nearest neighbours."""

    kind = "image"

    def __init__(self, shape: tuple[int, ...], size: int = 48, vmin: float = 0.0, vmax: float = 1.0):
        self.shape = tuple(shape)
        self.size = size
        self.vmin, self.vmax = vmin, vmax

    def to_array(self, x: torch.Tensor) -> np.ndarray:
        """``x`` as a uint8 (H, W) or (H, W, 3) array."""
        arr = x.detach().cpu().float().reshape(self.shape).numpy()
        arr = np.clip((arr - self.vmin) / max(self.vmax - self.vmin, 1e-12), 0.0, 1.0)
        if arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)
        return (255 - 255 * arr).astype(np.uint8) if arr.ndim == 2 else (255 * arr).astype(np.uint8)

    def to_png(self, x: torch.Tensor) -> bytes:
        from PIL import Image

        img = Image.fromarray(self.to_array(x))
        img = img.resize((self.size, self.size), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def to_html(self, x: torch.Tensor) -> str:
        data = base64.b64encode(self.to_png(x)).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" width="{self.size}" height="{self.size}"/>'


class TextRenderer:
    """Text examples stored beside the tensors, looked up by example id; shows an escaped snippet.

    ``texts`` is a mapping id → text, or a list in the dataset's row order (bound to its ids when the
    dataset is built, so subsets keep showing the right text).
    """

    kind = "text"

    def __init__(self, texts: Sequence[str] | Mapping[Any, str], max_chars: int = 200):
        self.texts = dict(texts) if isinstance(texts, Mapping) else list(texts)
        self.max_chars = max_chars

    def bind(self, ids: Sequence[Any]) -> TextRenderer:
        """This renderer keyed by ``ids``; refuse a list of the wrong length or a mapping missing ids."""
        if isinstance(self.texts, dict):
            missing = [i for i in ids if i not in self.texts]
            if missing:
                raise TDAError(f"renderer: no text for ids {missing[:5]}")
            return self
        if len(self.texts) != len(ids):
            raise TDAError(f"renderer: {len(self.texts)} texts for {len(ids)} examples; give one text per example")
        return TextRenderer(dict(zip(ids, self.texts)), self.max_chars)

    def snippet(self, example_id: Any) -> str:
        text = self.texts[example_id]
        return text if len(text) <= self.max_chars else text[: self.max_chars - 1] + "…"

    def to_html(self, example_id: Any) -> str:
        return f"<span class='tda-text'>{html.escape(self.snippet(example_id))}</span>"

    def to_png(self, x: torch.Tensor) -> None:
        return None


class RowRenderer:
    """Tabular rows: the first few feature values, escaped."""

    kind = "row"

    def __init__(self, feature_names: list[str] | None = None, max_features: int = 6):
        self.feature_names = feature_names
        self.max_features = max_features

    def to_html(self, x: torch.Tensor) -> str:
        values = x.detach().cpu().flatten().tolist()[: self.max_features]
        names = self.feature_names or [f"x{i}" for i in range(len(values))]
        cells = ", ".join(f"{html.escape(str(n))}={v:.3g}" for n, v in zip(names, values))
        return f"<code>{cells}</code>"

    def to_png(self, x: torch.Tensor) -> None:
        return None
