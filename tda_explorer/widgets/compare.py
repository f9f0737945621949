"""Method comparison: two methods' scores for the selected test point, top-k overlap, metrics, stability."""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from tda_explorer.session import Session
from tda_explorer.widgets.state import ExplorerState
from tda_explorer.widgets.theme import FigureView

MAX_POINTS = 2000  # the scatter shows every top-k example plus a fixed random sample of the rest


def _access(attribution) -> str:
    """What the model behind an attribution was: ``full``, or the access level of the proxy it was computed on."""
    return str((attribution.config.get("task") or {}).get("access", "full"))


def _trust(session: Session, method: str) -> str:
    """The model-randomization correlation where checked (``session.check_trust``)."""
    if method not in session.trust:
        return ""
    return f", model-randomization ρ {session.trust[method]:.2f} (lower is better)"


class ComparePanel(W.VBox):
    """Scatter of method A against method B for ``state.test_id``, their top-k overlap, the metrics
    table (LDS, mislabel AUC) when ground truth exists, and mean ± std marks where stability exists."""

    def __init__(self, session: Session, state: ExplorerState, interactive: bool | None = None):
        self.session, self.state = session, state
        first = state.method if state.method in session.methods else None
        self.a = W.Dropdown(options=session.methods, value=first, description="A", layout=W.Layout(width="200px"))
        self.b = W.Dropdown(options=session.methods, description="B", layout=W.Layout(width="200px"))
        W.link((self.a, "value"), (state, "compare_a"))
        W.link((self.b, "value"), (state, "compare_b"))
        self.summary = W.HTML()
        self.metrics = W.HTML()
        self.metrics.add_class("tda-table")
        self.stability = W.HTML()
        self.stability.add_class("tda-table")
        self.scatter = FigureView(go.Figure(
            [go.Scattergl(mode="markers", marker=dict(size=4, color="#7a7a7a"), name="others"),
             go.Scattergl(mode="markers", marker=dict(size=7, color="#1565c0"), name="top-k of A or B")],
            layout=dict(height=300, showlegend=True),
        ), interactive)
        self.curve = FigureView(go.Figure(layout=dict(
            height=260, xaxis_title="epochs of further training", yaxis_title="cosine with further training",
            title=dict(text="agreement with further training from the final model", x=0))), interactive)
        self.curve_note = W.HTML()
        self.curve_box = W.Box([self.curve.widget])  # FigureWidget's own layout is plotly's: hide its box
        n = len(session.train)
        gen = torch.Generator().manual_seed(0)
        self._sample = torch.randperm(n, generator=gen)[: min(n, MAX_POINTS)]
        state.observe(lambda _c: self.refresh(), names=["test_id", "compare_a", "compare_b", "k"])
        super().__init__([W.HBox([self.a, self.b]), self.summary, W.HBox([self.scatter.widget, self.metrics]),
                          self.stability, self.curve_note, self.curve_box])
        self.add_class("tda-compare-panel")
        others = [m for m in session.methods if m != self.a.value]
        if others:
            self.b.value = others[0]
        self.refresh()

    def overlap(self) -> dict:
        """Top-k overlap (proponents, opponents) and Spearman of the two methods for the selected test point."""
        s = self.state
        a, b = self.session.attribution(s.compare_a), self.session.attribution(s.compare_b)
        out = {}
        for kind in ("proponents", "opponents"):
            ids_a, ids_b = set(a.topk(s.test_id, s.k, kind, signed=True)[0]), set(b.topk(s.test_id, s.k, kind,
                                                                                           signed=True)[0])
            out[kind] = len(ids_a & ids_b) / max(len(ids_a), len(ids_b), 1)
        out["spearman"] = float(spearmanr(a.row(s.test_id).numpy(), b.row(s.test_id).numpy()).statistic)
        return out

    def refresh(self) -> None:
        s, session = self.state, self.session
        if s.test_id is None or not s.compare_a or not s.compare_b:
            self.summary.value = "<i>compute two methods to compare them</i>"
            return
        a, b = session.attribution(s.compare_a), session.attribution(s.compare_b)
        row_a, row_b = a.row(s.test_id), b.row(s.test_id)
        top = set()
        for att in (a, b):
            for kind in ("proponents", "opponents"):
                top.update(session.train.positions(att.topk(s.test_id, s.k, kind)[0]))
        top_idx = torch.tensor(sorted(top), dtype=torch.long)
        rest = self._sample[~torch.isin(self._sample, top_idx)]
        ov = self.overlap()
        access = " · ".join(f"{html.escape(name)}: {html.escape(_access(att))} access{_trust(session, name)}"
                            for name, att in ((s.compare_a, a), (s.compare_b, b)))
        self.summary.value = (
            f"test #{html.escape(str(s.test_id))}: top-{s.k} overlap — proponents {ov['proponents']:.0%}, "
            f"opponents {ov['opponents']:.0%}; Spearman over all {len(row_a)} training examples "
            f"{ov['spearman']:.3f}<br><span class='tda-muted'>{access}</span>"
        )

        def draw(fig):
            fig.data[0].x, fig.data[0].y = row_a[rest].numpy(), row_b[rest].numpy()
            fig.data[1].x, fig.data[1].y = row_a[top_idx].numpy(), row_b[top_idx].numpy()
            fig.data[1].text = [html.escape(f"#{session.train.ids[i]}") for i in top_idx.tolist()]
            fig.layout.xaxis.title = f"{html.escape(s.compare_a)} score"
            fig.layout.yaxis.title = f"{html.escape(s.compare_b)} score"

        self.scatter.update(draw)
        self.metrics.value = ("<b>metrics</b><br>" + session.metrics.to_html(index=False, float_format="%.3f")
                              if session.metrics is not None else
                              "<span class='tda-muted'>no ground truth attached (session.metrics)</span>")
        self._stability(s.compare_a)
        self._curve()

    def _curve(self) -> None:
        """One line per method from ``session.further_training`` (``session.further_training_curve()``)."""
        frame = self.session.further_training
        empty = frame is None or frame.empty
        self.curve_box.layout.display = "none" if empty else None
        self.curve_note.value = ("<span class='tda-muted'>agreement with further training from the final model: run "
                                 "<code>session.further_training_curve()</code> to compare the methods with it</span>"
                                 if empty else "")
        if empty:
            return

        def draw(fig):
            fig.data = []
            for method, part in frame.groupby("method", sort=False):
                fig.add_scatter(x=part["epochs"].tolist(), y=part["cosine"].tolist(), mode="lines+markers",
                                name=html.escape(str(method)))

        self.curve.update(draw)

    def _stability(self, method: str) -> None:
        if method not in self.session.stability:
            self.stability.value = "<span class='tda-muted'>no stability data for this method</span>"
            return
        frame = self.session.stability_frame(method, self.state.test_id)
        top = frame.sort_values("mean", ascending=False).head(self.state.k)
        rows = "".join(
            f"<tr><td>#{html.escape(str(r.train_id))}</td><td>{r.mean:.3g} ± {r.std:.2g}</td>"
            f"<td>p = {r.p_value:.2g}</td><td>{'stable' if r.stable else 'noisy'}</td></tr>"
            for r in top.itertuples()
        )
        self.stability.value = (f"<b>stability of {html.escape(method)}</b> (mean ± std across seeds)"
                                f"<table>{rows}</table>")
