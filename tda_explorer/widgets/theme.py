"""Look and feel: CSS on JupyterLab's theme variables (legible in dark mode) and plotly figures that are
interactive where ``FigureWidget`` renders, static (plotly's own mime bundle) where it cannot."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import ipywidgets as W
import plotly.graph_objects as go

CSS = """
<style>
.tda-explorer { color: var(--jp-ui-font-color1); }
.tda-card { border: 1px solid var(--jp-border-color2); border-radius: 4px; background: var(--jp-layout-color1); }
.tda-card.tda-current { border: 2px solid var(--jp-brand-color1); }
.tda-muted { color: var(--jp-ui-font-color2); font-size: 11px; }
.tda-bar { height: 6px; border-radius: 2px; margin: 2px auto 0 auto; }
.tda-pos { background: var(--jp-success-color1, #2e7d32); }
.tda-neg { background: var(--jp-error-color1, #c62828); }
.tda-error { color: var(--jp-error-color1, #c62828); white-space: pre-wrap; font-family: var(--jp-code-font-family); }
.tda-table { width: 100%; }
.tda-table table { border-collapse: collapse; font-size: 12px; color: var(--jp-ui-font-color1); width: 100%; }
.tda-caption-line { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tda-explorer .widget-button, .tda-explorer .jupyter-button { flex-shrink: 0; }
.tda-table td, .tda-table th { padding: 2px 6px; border-bottom: 1px solid var(--jp-border-color2); }
.tda-table tr.tda-current-row { background: var(--jp-layout-color3); }
</style>
"""

#: Plotly cannot read CSS variables: transparent backgrounds and a mid-grey font read in both themes.
LAYOUT = dict(
    paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", font=dict(color="#8a8a8a", size=11),
    margin=dict(l=50, r=10, t=30, b=40), height=260,
)
AXIS = dict(gridcolor="rgba(128,128,128,0.25)", zerolinecolor="rgba(128,128,128,0.6)")


def button_layout(min_width: str = "70px") -> W.Layout:
    """A button as wide as its label (never clipped when a neighbour grows), at least ``min_width``."""
    return W.Layout(width="auto", min_width=min_width, flex="0 0 auto")


def interactive_default() -> bool:
    """FigureWidget renders in JupyterLab and Notebook; VS Code and Colab get the static fallback."""
    return not ("google.colab" in sys.modules or "VSCODE_PID" in os.environ)


def styled(fig: go.Figure) -> go.Figure:
    fig.update_layout(**LAYOUT)
    fig.update_xaxes(**AXIS)
    fig.update_yaxes(**AXIS)
    return fig


class FigureView:
    """A plotly figure shown as a live ``FigureWidget`` or, as a fallback, re-displayed in an ``Output``.

    ``update(fn)`` applies ``fn(figure)`` in one batch either way, so views never care which it is.
    """

    def __init__(self, fig: go.Figure, interactive: bool | None = None):
        self.interactive = interactive_default() if interactive is None else interactive
        styled(fig)
        if self.interactive:
            self.figure = go.FigureWidget(fig)
            self.widget: W.DOMWidget = self.figure
        else:
            self.figure = fig
            self.widget = W.Output()
            self._render()

    def update(self, fn: Callable[[go.Figure], None]) -> None:
        if self.interactive:
            with self.figure.batch_update():
                fn(self.figure)
        else:
            fn(self.figure)
            self._render()

    def _render(self) -> None:
        from IPython.display import display

        with self.widget:
            self.widget.clear_output(wait=True)
            display(self.figure)


def error_html(message: str) -> str:
    import html

    return f"<div class='tda-error'>{html.escape(message)}</div>"
