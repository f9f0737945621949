"""The Tracing tab: one query of a fact-tracing run with the documents traced to it (escaped text), each with the
verifier's score, its support decision and which verifier produced it."""

from __future__ import annotations

import html

import ipywidgets as W

from tda_explorer.session import Session
from tda_explorer.widgets.state import refill


class TracingPanel(W.VBox):
    """Pick a tracing run (``session.add_tracing``) and a query; the table lists its candidates, supporting first.
    *export* writes the run as CSV (``exported`` holds the path)."""

    def __init__(self, session: Session, max_rows: int = 30):
        self.session, self.max_rows = session, max_rows
        self.run = W.Dropdown(description="run", layout=W.Layout(width="220px"))
        self.query = W.Dropdown(description="query", layout=W.Layout(width="460px"))
        self.export = W.Button(description="export CSV", layout=W.Layout(width="120px"))
        self.export.add_class("tda-tracing-export")
        self.table = W.HTML()
        self.table.add_class("tda-table")
        self.exported = None
        self.run.observe(lambda _c: self._queries(), names="value")
        self.query.observe(lambda _c: self.show(), names="value")
        self.export.on_click(lambda _b: self._export())
        super().__init__([W.HBox([self.run, self.query, self.export]), self.table])
        self.add_class("tda-tracing-panel")
        self.refresh()

    def refresh(self) -> None:
        """Pick up tracing runs added to the session since."""
        refill(self.run, list(self.session.tracings))
        self._queries()

    def _queries(self) -> None:
        if self.run.value is None:
            self.query.options = []
            self.show()
            return
        frame = self.session.tracings[self.run.value]
        pairs = frame[["query_id", "query"]].drop_duplicates("query_id")
        current = self.query.value
        self.query.options = [(f"{q}: {text}", q) for q, text in zip(pairs["query_id"], pairs["query"])]
        self.query.value = current if current in set(pairs["query_id"]) else pairs["query_id"].iloc[0]
        self.show()

    def show(self) -> None:
        if self.run.value is None or self.query.value is None:
            self.table.value = ("<span class='tda-muted'>no tracing yet: add one with "
                                "session.add_tracing(name, TwoStageTracer(...).trace(queries))</span>")
            return
        frame = self.session.tracings[self.run.value]
        rows = frame[frame["query_id"] == self.query.value].sort_values(
            ["supported", "verifier_score"], ascending=[False, False], kind="stable").head(self.max_rows)
        renderer = self.session.train.renderer
        snippet = getattr(renderer, "snippet", lambda t: f"training example {t}")
        text = (lambda i, _t: str(frame.at[i, "text"])) if "text" in frame else (lambda _i, t: snippet(t))
        body = "".join(
            f"<tr class='{'tda-supported' if r.supported else ''}'><td>{html.escape(str(r.train_id))}</td>"
            f"<td>{html.escape(text(i, r.train_id))}</td><td>{r.verifier_score:.3f}</td>"
            f"<td>{'yes' if r.supported else 'no'}</td>"
            f"<td>{html.escape(str(r.verifier))}</td></tr>"
            for i, r in zip(rows.index, rows.itertuples()))
        n_supported = int(rows["supported"].sum())
        self.table.value = (f"<div><b>{html.escape(str(rows['query'].iloc[0]))}</b> — {n_supported} supporting of "
                            f"{len(rows)} candidates</div><table><tr><th>id</th><th>document</th><th>score</th>"
                            f"<th>supports</th><th>verifier</th></tr>{body}</table>")

    def _export(self) -> None:
        if self.run.value is None:
            return
        self.exported = self.session.export_csv(self.session.tracings[self.run.value], f"tracing-{self.run.value}")
