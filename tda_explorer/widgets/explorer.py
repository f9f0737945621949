"""``Explorer``: pick a test point, see its top proponents and opponents, flag training examples."""

from __future__ import annotations

import ipywidgets as W

from tda_explorer.session import Session
from tda_explorer.widgets.cards import ExampleCard
from tda_explorer.widgets.state import ExplorerState

MAX_K = 20


class TestPicker(W.VBox):
    """A paginated grid of test examples; clicking one selects it."""

    def __init__(self, session: Session, state: ExplorerState, page_size: int = 10):
        self.session, self.state, self.page_size = session, state, page_size
        self.page = 0
        self.only_errors = W.Checkbox(description="misclassified only", value=False, indent=False)
        self.prev_button = W.Button(description="◀", layout=W.Layout(width="40px"))
        self.next_button = W.Button(description="▶", layout=W.Layout(width="40px"))
        self.page_label = W.Label()
        self.cards = [ExampleCard("tda-test-card", "select") for _ in range(page_size)]
        for card in self.cards:
            card.button.on_click(lambda _b, c=card: self.select(c.example_id))
        self.prev_button.on_click(lambda _b: self.go(self.page - 1))
        self.next_button.on_click(lambda _b: self.go(self.page + 1))
        self.only_errors.observe(lambda _c: self.go(0), names="value")
        state.observe(lambda _c: self._mark_selected(), names="test_id")
        header = W.HBox([W.HTML("<b>Test examples</b>"), self.only_errors, self.prev_button,
                         self.page_label, self.next_button])
        super().__init__([header, W.HBox(self.cards, layout=W.Layout(flex_flow="row wrap"))])
        self.add_class("tda-test-picker")
        self.go(0)

    def visible_ids(self) -> list:
        table = self.session.test_table()
        if self.only_errors.value:
            table = table[table["label"] != table["predicted"]]
        return table["test_id"].tolist()

    def go(self, page: int) -> None:
        """Show page ``page`` (clamped)."""
        ids = self.visible_ids()
        n_pages = max(1, -(-len(ids) // self.page_size))
        self.page = min(max(page, 0), n_pages - 1)
        shown = ids[self.page * self.page_size : (self.page + 1) * self.page_size]
        self.page_label.value = f"page {self.page + 1}/{n_pages}"
        test = self.session.test
        for card, test_id in zip(self.cards, shown + [None] * (self.page_size - len(shown))):
            if test_id is None:
                card.hide()
                continue
            pos = test.positions([test_id])[0]
            label, pred = test.class_names[test.labels[pos]], test.class_names[self.session.test_predicted[pos]]
            card.show(test_id, test.thumbnail(pos), test.render_html(pos),
                      f"#{test_id}\nlabel {label} · pred {pred}")
        self._mark_selected()

    def select(self, test_id) -> None:
        if test_id is not None:
            self.state.test_id = test_id

    def _mark_selected(self) -> None:
        for card in self.cards:
            card.button.button_style = "info" if card.example_id == self.state.test_id else ""


class InfluenceBrowser(W.VBox):
    """Top-k proponents and opponents of the selected test point, with flag buttons."""

    def __init__(self, session: Session, state: ExplorerState):
        self.session, self.state = session, state
        self.method = W.Dropdown(options=session.methods, description="method")
        self.k = W.IntSlider(value=state.k, min=1, max=MAX_K, description="k")
        self.title = W.HTML()
        self.proponents = [ExampleCard("tda-proponent-card", "flag") for _ in range(MAX_K)]
        self.opponents = [ExampleCard("tda-opponent-card", "flag") for _ in range(MAX_K)]
        for card in self.proponents + self.opponents:
            card.button.on_click(lambda _b, c=card: self.toggle_flag(c.example_id))
        W.link((self.method, "value"), (state, "method"))
        W.link((self.k, "value"), (state, "k"))
        state.observe(lambda _c: self.refresh(), names=["test_id", "method", "k", "flags_revision"])
        row = lambda cards: W.HBox(cards, layout=W.Layout(flex_flow="row wrap"))
        self.proponent_box = row(self.proponents)
        self.opponent_box = row(self.opponents)
        self.proponent_box.add_class("tda-proponents")
        self.opponent_box.add_class("tda-opponents")
        super().__init__([
            W.HBox([self.method, self.k]), self.title,
            W.HTML("<b>Proponents</b> (score > 0: removing it would raise the test loss)"), self.proponent_box,
            W.HTML("<b>Opponents</b> (score < 0: removing it would lower the test loss)"), self.opponent_box,
        ])
        self.add_class("tda-influence-browser")

    def shown_ids(self, kind: str = "proponents") -> list:
        cards = self.proponents if kind == "proponents" else self.opponents
        return [c.example_id for c in cards if c.example_id is not None]

    def refresh(self) -> None:
        """Update the galleries for the current state (widgets are reused, never rebuilt)."""
        s, session = self.state, self.session
        if s.test_id is None or not s.method:
            self.title.value = "<i>select a test example</i>"
            for card in self.proponents + self.opponents:
                card.hide()
            return
        pos = session.test.positions([s.test_id])[0]
        label = session.test.class_names[session.test.labels[pos]]
        pred = session.test.class_names[session.test_predicted[pos]]
        self.title.value = (f"<b>test #{s.test_id}</b> — label {label}, predicted {pred}, "
                            f"loss {float(session.test_loss[pos]):.3f} · method <code>{s.method}</code>")
        flagged = set(session.flags.flagged_ids())
        attribution = session.attribution(s.method)
        train = session.train
        for kind, cards in (("proponents", self.proponents), ("opponents", self.opponents)):
            ids, scores = attribution.topk(s.test_id, s.k, kind)
            for i, card in enumerate(cards):
                if i >= len(ids):
                    card.hide()
                    continue
                tpos = train.positions([ids[i]])[0]
                tl = train.class_names[train.labels[tpos]]
                tp = train.class_names[session.train_predicted[tpos]]
                card.show(ids[i], train.thumbnail(tpos), train.render_html(tpos),
                          f"#{ids[i]} · {float(scores[i]):+.3g}\nlabel {tl} · pred {tp}")
                is_flagged = ids[i] in flagged
                card.button.description = "unflag" if is_flagged else "flag"
                card.button.button_style = "danger" if is_flagged else ""

    def toggle_flag(self, train_id) -> None:
        """Flag or unflag ``train_id`` in the session's store (saved immediately)."""
        if train_id is None:
            return
        if self.session.flags.is_flagged(train_id):
            self.session.flags.unflag(train_id)
        else:
            self.session.flags.flag(train_id)
        self.state.flags_revision += 1


class Explorer(W.VBox):
    """Linked panels over one ``Session``: a test-point picker and an influence browser.

    Parameters
    ----------
    session : Session
        Must have at least one computed attribution (``session.compute("tracin")``).
    method : str, optional
        The method shown first (default: the first computed).
    k : int
        How many proponents and opponents to show.
    """

    def __init__(self, session: Session, method: str | None = None, k: int = 5, page_size: int = 10):
        if not session.methods:
            raise ValueError("session has no attribution yet: call session.compute('tracin') first")
        self.session = session
        self.state = ExplorerState(method=method or session.methods[0], k=k)
        self.picker = TestPicker(session, self.state, page_size)
        self.browser = InfluenceBrowser(session, self.state)
        self.browser.method.value = self.state.method
        super().__init__([self.picker, self.browser])
        self.add_class("tda-explorer")
        self.state.test_id = session.test.ids[0]
