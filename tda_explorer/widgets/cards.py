"""An example card: thumbnail (or escaped text), caption with a score bar, and buttons; updated in place."""

from __future__ import annotations

import html

import ipywidgets as W

_BLANK_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
    b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
)


class ExampleCard(W.VBox):
    """Shows one example; ``show`` replaces its content without creating widgets.

    Parameters
    ----------
    css_class : str
        Class of the card (its buttons get ``<css_class>-button`` and ``<css_class>-<label>``).
    buttons : sequence of str
        Button labels, e.g. ``("open", "flag")``.
    """

    def __init__(self, css_class: str, buttons: tuple[str, ...] = ("select",), width: int = 96, image_px: int = 48):
        self.image = W.Image(value=_BLANK_PNG, format="png", layout=W.Layout(width=f"{image_px}px",
                                                                              height=f"{image_px}px"))
        self.caption = W.HTML(layout=W.Layout(max_width=f"{width * 2}px"))
        self.buttons = {}
        for label in buttons:
            b = W.Button(description=label, layout=W.Layout(width=f"{width}px", height="24px"))
            b.add_class(f"{css_class}-button")
            b.add_class(f"{css_class}-{label}")
            self.buttons[label] = b
        self.button = next(iter(self.buttons.values()))
        self.example_id = None
        super().__init__([self.image, self.caption, *self.buttons.values()],
                         layout=W.Layout(width=f"{width + 12}px", margin="2px", padding="2px", align_items="center"))
        self.add_class(css_class)
        self.add_class("tda-card")

    def show(self, example_id, png: bytes | None, text_html: str, caption: str,
             bar: float | None = None) -> None:
        """Display an example. ``caption`` is plain text (escaped here); ``text_html`` must be escaped
        already (renderers escape); ``bar`` in [-1, 1] draws a signed score bar."""
        self.example_id = example_id
        self.image.layout.display = None if png else "none"
        if png:
            self.image.value = png
        bar_html = ""
        if bar is not None:
            width = max(2, int(round(abs(bar) * 100)))
            bar_html = f"<div class='tda-bar {'tda-pos' if bar >= 0 else 'tda-neg'}' style='width:{width}%'></div>"
        text = "" if png else text_html
        self.caption.value = (
            f"{text}<div style='font-size:11px;line-height:1.2;text-align:center;color:var(--jp-ui-font-color1)'>"
            f"{html.escape(caption).replace(chr(10), '<br>')}</div>{bar_html}"
        )
        self.layout.display = None

    def hide(self) -> None:
        self.example_id = None
        self.layout.display = "none"

    def mark(self, current: bool) -> None:
        (self.add_class if current else self.remove_class)("tda-current")
