"""An example card: thumbnail (or escaped text), caption with a score bar, and buttons; updated in place.

Cards are light: one HTML widget (the thumbnail is inlined as a data URI) and their buttons, with
layouts and styles shared between cards, so a page of them stays a few dozen widget models.
"""

from __future__ import annotations

import base64
import html
from functools import cache

import ipywidgets as W

CHAR_PX = 6.4  # width of one caption character at 11 px (digits are the widest)


def shorten(text: str, chars: int) -> str:
    """``text`` in at most ``chars`` characters, cut in the middle (ids differ at their ends: "#train-im…00054")."""
    if len(text) <= chars:
        return text
    head = (chars - 1) // 2
    return text[:head] + "…" + text[len(text) - (chars - 1 - head):]


def fit_head(line: str, example_id, chars: int) -> list[str]:
    """A caption's first line ("#<id> …") as the lines that show it in ``chars`` each: itself when it fits, else the
    id on a line of its own (shortened in the middle) and the rest below it, whole."""
    token = f"#{example_id}"
    if len(line) <= chars or not line.startswith(token):
        return [shorten(line, chars)]
    rest = line[len(token):].lstrip(" ·")
    return ["#" + shorten(str(example_id), chars - 1), shorten(rest, chars)]


@cache
def _shared(kind: str, width: int):
    """One Layout / Style object per kind and width, shared by every card that uses it."""
    if kind == "button_layout":
        return W.Layout(width=f"{width}px", height="24px")
    if kind == "button_style":
        return W.ButtonStyle()
    if kind == "html_layout":
        return W.Layout(width=f"{width}px")
    from ipywidgets.widgets.widget_string import HTMLStyle

    return HTMLStyle()


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
        self.image_px = image_px
        self.chars = max(8, int(width / CHAR_PX))
        self.caption = W.HTML(layout=_shared("html_layout", width), style=_shared("html_style", width))
        self.buttons = {}
        for label in buttons:
            b = W.Button(description=label, layout=_shared("button_layout", width),
                         style=_shared("button_style", width))
            b.add_class(f"{css_class}-button")
            b.add_class(f"{css_class}-{label}")
            self.buttons[label] = b
        self.button = next(iter(self.buttons.values()))
        self.example_id = None
        super().__init__([self.caption, *self.buttons.values()],
                         layout=W.Layout(width=f"{width + 12}px", margin="2px", padding="2px", align_items="center"))
        self.add_class(css_class)
        self.add_class("tda-card")

    def show(self, example_id, png: bytes | None, text_html: str, caption: str,
             bar: float | None = None) -> None:
        """Display an example. ``caption`` is plain text (escaped here); ``text_html`` must be escaped
        already (renderers escape); ``bar`` in [-1, 1] draws a signed score bar."""
        self.example_id = example_id
        bar_html = ""
        if bar is not None:
            width = max(2, int(round(abs(bar) * 100)))
            bar_html = f"<div class='tda-bar {'tda-pos' if bar >= 0 else 'tda-neg'}' style='width:{width}%'></div>"
        if png:
            px = self.image_px
            visual = (f"<div style='text-align:center'><img class='tda-thumb' width='{px}' height='{px}' "
                      f"style='image-rendering:pixelated' src='data:image/png;base64,"
                      f"{base64.b64encode(png).decode('ascii')}'/></div>")
        else:
            visual = text_html
        first, *others = caption.split("\n")
        shown = fit_head(first, example_id, self.chars) + [shorten(line, self.chars) for line in others]
        title = html.escape(caption, quote=True)  # the whole caption on hover
        lines = "".join(f"<div class='tda-caption-line' title='{title}'>{html.escape(text)}</div>" for text in shown)
        self.caption.value = (
            f"{visual}<div style='font-size:11px;line-height:1.2;text-align:center;color:var(--jp-ui-font-color1)'>"
            f"{lines}</div>{bar_html}"
        )
        self.layout.display = None

    def show_example(self, dataset, position: int, predicted: int, head: str, bar: float | None = None) -> None:
        """Show row ``position`` of ``dataset`` with ``head`` over its given and predicted labels."""
        names = dataset.class_names
        self.show(dataset.ids[position], dataset.thumbnail(position), dataset.render_html(position),
                  f"{head}\nlabel {names[dataset.labels[position]]} · pred {names[predicted]}", bar=bar)

    def hide(self) -> None:
        self.example_id = None
        self.layout.display = "none"

    def mark(self, current: bool) -> None:
        (self.add_class if current else self.remove_class)("tda-current")
