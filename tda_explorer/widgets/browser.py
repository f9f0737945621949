"""Influence browser: the selected test point's top-k proponents and opponents, side by side."""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from tda_explorer.session import Session
from tda_explorer.widgets.cards import ExampleCard
from tda_explorer.widgets.state import ExplorerState
from tda_explorer.widgets.theme import FigureView, button_layout

MAX_K = 15


class InfluenceBrowser(W.VBox):
    """Galleries of proponents and opponents with score bars, a signed bar chart, and CSV export.

    *open* on a card shows the training example's detail; *flag* toggles its flag at once.
    """

    def __init__(self, session: Session, state: ExplorerState, interactive: bool | None = None):
        self.session, self.state = session, state
        # the dropdown starts on the state's method: a link copies the dropdown's value into the state first
        start = state.method if state.method in session.methods else None
        self.method = W.Dropdown(options=session.methods, value=start, description="method",
                                 layout=W.Layout(width="220px"))
        self.k = W.IntSlider(value=state.k, min=1, max=MAX_K, description="k", layout=W.Layout(width="260px"))
        self.export_button = W.Button(description="Save CSV", icon="download", layout=button_layout())
        self.export_button.add_class("tda-export-ranking")
        self.export_status = W.HTML()
        self.title = W.HTML()
        self.proponents = [ExampleCard("tda-proponent-card", ("open", "flag")) for _ in range(MAX_K)]
        self.opponents = [ExampleCard("tda-opponent-card", ("open", "flag")) for _ in range(MAX_K)]
        for card in self.proponents + self.opponents:
            card.buttons["open"].on_click(lambda _b, c=card: self.open_detail(c.example_id))
            card.buttons["flag"].on_click(lambda _b, c=card: self.toggle_flag(c.example_id))
        self.bars = FigureView(go.Figure(
            [go.Bar(orientation="h", name="proponents", marker_color="#2e7d32"),
             go.Bar(orientation="h", name="opponents", marker_color="#c62828")],
            layout=dict(xaxis_title="score (positive: removing it would raise the test loss)",
                        yaxis=dict(type="category", autorange="reversed"), showlegend=False, height=320),
        ), interactive)
        W.link((self.method, "value"), (state, "method"))
        W.link((self.k, "value"), (state, "k"))
        self.export_button.on_click(lambda _b: self.export())
        state.observe(lambda _c: self.refresh(), names=["test_id", "method", "k", "flags_revision"])
        grid = lambda cards, cls: W.Box(cards, layout=W.Layout(flex_flow="row wrap"))
        self.proponent_box = grid(self.proponents, "tda-proponents")
        self.opponent_box = grid(self.opponents, "tda-opponents")
        self.proponent_box.add_class("tda-proponents")
        self.opponent_box.add_class("tda-opponents")
        column = lambda title, box: W.VBox([W.HTML(title), box], layout=W.Layout(width="50%", min_width="0"))
        super().__init__([
            W.HBox([self.method, self.k, self.export_button, self.export_status]),
            self.title,
            W.HBox([
                column("<b>Proponents</b> <span class='tda-muted'>(score &gt; 0: removing it would raise the "
                       "test loss)</span>", self.proponent_box),
                column("<b>Opponents</b> <span class='tda-muted'>(score &lt; 0: removing it would lower the "
                       "test loss)</span>", self.opponent_box),
            ]),
            self.bars.widget,
        ])
        self.add_class("tda-influence-browser")

    def shown_ids(self, kind: str = "proponents") -> list:
        cards = self.proponents if kind == "proponents" else self.opponents
        return [c.example_id for c in cards if c.example_id is not None]

    def refresh(self) -> None:
        """Update galleries and bars for the current state (widgets are reused, never rebuilt)."""
        s, session = self.state, self.session
        if s.test_id is None or not s.method or s.method not in session.attributions:
            self.title.value = "<i>select a test example and a computed method</i>"
            for card in self.proponents + self.opponents:
                card.hide()
            return
        pos = session.test.positions([s.test_id])[0]
        names = session.test.class_names
        label, pred = names[session.test.labels[pos]], names[session.test_predicted[pos]]
        png = session.test.thumbnail(pos)
        thumb = ""
        if png:
            import base64

            thumb = (f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' width=40 height=40 "
                     "style='vertical-align:middle;margin-right:6px'/>")
        else:
            thumb = session.test.render_html(pos)
        self.title.value = (
            f"{thumb}<b>test #{html.escape(str(s.test_id))}</b> — label {html.escape(label)}, predicted "
            f"{html.escape(pred)}, loss {float(session.test_loss[pos]):.3f} · "
            f"method <code>{html.escape(s.method)}</code>"
        )
        flagged = set(session.flags.flagged_ids())
        attribution = session.attribution(s.method)
        train = session.train
        shown = {}
        for kind, cards in (("proponents", self.proponents), ("opponents", self.opponents)):
            ids, scores = attribution.topk(s.test_id, s.k, kind, signed=True)  # a proponent raises the loss
            shown[kind] = (ids, scores.tolist())
            scale = max(float(scores.abs().max()) if len(scores) else 1.0, 1e-12)
            for i, card in enumerate(cards):
                if i >= len(ids):
                    card.hide()
                    continue
                tpos = train.positions([ids[i]])[0]
                head = f"#{ids[i]} · {float(scores[i]):+.3g}"
                card.show_example(train, tpos, int(session.train_predicted[tpos]), head, bar=float(scores[i]) / scale)
                card.buttons["flag"].description = "unflag" if ids[i] in flagged else "flag"
                card.buttons["flag"].button_style = "danger" if ids[i] in flagged else ""
                card.mark(ids[i] == s.detail_train_id)

        def draw(fig):
            for trace, kind in zip(fig.data, ("proponents", "opponents")):
                ids, scores = shown[kind]
                trace.x, trace.y = scores, [html.escape(f"#{i}") for i in ids]  # plotly renders some HTML

        self.bars.update(draw)

    def open_detail(self, train_id) -> None:
        """Show ``train_id`` in the detail panel."""
        if train_id is not None:
            self.state.detail_train_id = train_id

    def toggle_flag(self, train_id) -> None:
        """Flag or unflag ``train_id`` in the session's store (saved immediately)."""
        if train_id is None:
            return
        if self.session.flags.is_flagged(train_id):
            self.session.flags.unflag(train_id)
        else:
            self.session.flags.flag(train_id)
        self.state.flags_revision += 1

    def table(self):
        """The ranking on screen as a tidy DataFrame."""
        return self.session.ranking(self.state.test_id, self.state.method, self.state.k)

    def export(self) -> None:
        path = self.session.export_csv(self.table(), f"ranking-test{self.state.test_id}-{self.state.method}")
        self.export_status.value = f"<span class='tda-muted'>saved {html.escape(str(path))}</span>"
