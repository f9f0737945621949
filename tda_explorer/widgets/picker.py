"""Test-point picker: a paginated grid with filters (misclassified, class) and jump-to-id."""

from __future__ import annotations

import ipywidgets as W

from tda_explorer.session import Session
from tda_explorer.widgets.cards import ExampleCard
from tda_explorer.widgets.state import ExplorerState


class TestPicker(W.VBox):
    """Clicking a card's *select* sets ``state.test_id``; every other panel follows."""

    def __init__(self, session: Session, state: ExplorerState, page_size: int = 10):
        self.session, self.state, self.page_size = session, state, page_size
        self.page = 0
        self._table = session.test_table()
        self.only_errors = W.Checkbox(description="misclassified only", value=False, indent=False,
                                      layout=W.Layout(width="150px"))
        self.class_filter = W.Dropdown(options=[("all classes", None)] + [
            (name, c) for c, name in enumerate(session.test.class_names)], layout=W.Layout(width="130px"))
        self.jump = W.Text(placeholder="test id", continuous_update=False, layout=W.Layout(width="90px"))
        self.jump_button = W.Button(description="go", layout=W.Layout(width="40px"))
        self.message = W.HTML()
        self.prev_button = W.Button(description="◀", layout=W.Layout(width="40px"))
        self.next_button = W.Button(description="▶", layout=W.Layout(width="40px"))
        self.page_label = W.Label()
        self.cards = [ExampleCard("tda-test-card", ("select",)) for _ in range(page_size)]
        for card in self.cards:
            card.button.on_click(lambda _b, c=card: self.select(c.example_id))
        self.prev_button.on_click(lambda _b: self.go(self.page - 1))
        self.next_button.on_click(lambda _b: self.go(self.page + 1))
        self.only_errors.observe(lambda _c: self.go(0), names="value")
        self.class_filter.observe(lambda _c: self.go(0), names="value")
        self.jump_button.on_click(lambda _b: self.jump_to(self.jump.value))
        self.jump.observe(lambda c: c["new"] and self.jump_to(c["new"]), names="value")
        state.observe(lambda _c: self._mark_selected(), names="test_id")
        header = W.HBox([W.HTML("<b>Test examples</b>"), self.only_errors, self.class_filter, self.prev_button,
                         self.page_label, self.next_button, self.jump, self.jump_button, self.message])
        super().__init__([header, W.HBox(self.cards, layout=W.Layout(flex_flow="row wrap"))])
        self.add_class("tda-test-picker")
        self.go(0)

    def visible_ids(self) -> list:
        table = self._table
        if self.only_errors.value:
            table = table[table["label"] != table["predicted"]]
        if self.class_filter.value is not None:
            table = table[table["label"] == self.class_filter.value]
        return table["test_id"].tolist()

    def go(self, page: int) -> None:
        """Show page ``page`` (clamped) of the filtered test examples."""
        ids = self.visible_ids()
        n_pages = max(1, -(-len(ids) // self.page_size))
        self.page = min(max(page, 0), n_pages - 1)
        shown = ids[self.page * self.page_size : (self.page + 1) * self.page_size]
        self.page_label.value = f"page {self.page + 1}/{n_pages} ({len(ids)})"
        test, s = self.session.test, self.session
        for i, card in enumerate(self.cards):
            if i >= len(shown):
                card.hide()
                continue
            pos = test.positions([shown[i]])[0]
            card.show_example(test, pos, int(s.test_predicted[pos]), f"#{shown[i]} loss {float(s.test_loss[pos]):.2f}")
        self._mark_selected()

    def jump_to(self, text: str) -> None:
        """Select the test example whose id is ``text`` (ints are parsed), or say it does not exist."""
        candidates = [text.strip()]
        if text.strip().lstrip("-").isdigit():
            candidates.insert(0, int(text.strip()))
        for candidate in candidates:
            if candidate in self.session.test._index:
                self.message.value = ""
                self.select(candidate)
                return
        import html

        self.message.value = f"<span class='tda-error'>no test id {html.escape(repr(text))}</span>"

    def select(self, test_id) -> None:
        if test_id is not None:
            self.state.test_id = test_id

    def _mark_selected(self) -> None:
        for card in self.cards:
            card.button.button_style = "info" if card.example_id == self.state.test_id else ""
