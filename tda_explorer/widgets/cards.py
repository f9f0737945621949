"""An example card: thumbnail (or escaped text), caption and one button; updated in place."""

from __future__ import annotations

import html

import ipywidgets as W

_BLANK_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
    b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
)


class ExampleCard(W.VBox):
    """Shows one example; ``show`` replaces its content without creating widgets."""

    def __init__(self, css_class: str, button_label: str = "select", width: int = 96):
        self.image = W.Image(value=_BLANK_PNG, format="png", layout=W.Layout(width="48px", height="48px"))
        self.text = W.HTML(layout=W.Layout(max_width=f"{width * 2}px"))
        self.caption = W.HTML()
        self.button = W.Button(description=button_label, layout=W.Layout(width=f"{width}px"))
        self.button.add_class(f"{css_class}-button")
        self.example_id = None
        super().__init__([self.image, self.text, self.caption, self.button],
                         layout=W.Layout(width=f"{width + 12}px", margin="2px", padding="2px",
                                         align_items="center"))
        self.add_class(css_class)
        self.add_class("tda-card")

    def show(self, example_id, png: bytes | None, text_html: str, caption: str) -> None:
        """Display an example: ``caption`` is plain text and gets escaped here."""
        self.example_id = example_id
        self.image.layout.display = None if png else "none"
        if png:
            self.image.value = png
        self.text.value = text_html if not png else ""
        self.caption.value = (
            "<div style='font-size:11px;line-height:1.2;text-align:center;"
            f"color:var(--jp-ui-font-color1)'>{html.escape(caption).replace(chr(10), '<br>')}</div>"
        )
        self.layout.display = None

    def hide(self) -> None:
        self.example_id = None
        self.layout.display = "none"
