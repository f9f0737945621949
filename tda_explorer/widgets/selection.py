"""The Selection tab: a targeted selection (LESS) as cards with scores, and its export."""

from __future__ import annotations

import html

import ipywidgets as W

from tda_explorer.session import Session
from tda_explorer.widgets.cards import ExampleCard
from tda_explorer.widgets.state import refill


class SelectionPanel(W.VBox):
    """Pick a selection added with ``session.add_selection``; its first ``page_size`` examples are shown as cards
    (rank, score, best subtask), and *export* writes the whole selection as CSV (``exported`` holds the path)."""

    def __init__(self, session: Session, page_size: int = 12):
        self.session = session
        self.choice = W.Dropdown(description="selection", layout=W.Layout(width="260px"))
        self.export = W.Button(description="export CSV", layout=W.Layout(width="120px"))
        self.export.add_class("tda-selection-export")
        self.summary = W.HTML()
        self.cards = [ExampleCard("tda-selection-card", ("flag",)) for _ in range(page_size)]
        for card in self.cards:
            card.button.on_click(lambda _b, c=card: self._flag(c))
            card.hide()
        self.exported = None
        self.choice.observe(lambda _c: self.show(), names="value")
        self.export.on_click(lambda _b: self._export())
        super().__init__([W.HBox([self.choice, self.export]), self.summary, W.HBox(self.cards,
                          layout=W.Layout(flex_flow="row wrap"))])
        self.add_class("tda-selection-panel")
        self.refresh()

    def refresh(self) -> None:
        """Pick up selections added to the session since."""
        refill(self.choice, list(self.session.selections))
        self.show()

    def show(self) -> None:
        name = self.choice.value
        if name is None:
            self.summary.value = ("<span class='tda-muted'>no selection yet: add one with "
                                  "session.add_selection(name, tda_explorer.select(...))</span>")
            for card in self.cards:
                card.hide()
            return
        frame = self.session.selection_frame(name)
        self.summary.value = (f"<b>{html.escape(str(name))}</b>: {len(frame)} examples selected "
                              f"({len(frame) / len(self.session.train):.1%} of the training data)")
        positions = self.session.train.positions(frame["train_id"].tolist()[: len(self.cards)])
        for card, (_, row), position in zip(self.cards, frame.iterrows(), positions):
            head = f"#{row['rank'] if 'rank' in row else ''} id {row['train_id']} · {row['score']:.3g}"
            if "best_subtask" in row:
                head += f"\nfor {row['best_subtask']}"
            card.show_example(self.session.train, position, int(self.session.train_predicted[position]), head)
        for card in self.cards[len(positions):]:
            card.hide()

    def _flag(self, card: ExampleCard) -> None:
        if card.example_id is not None:
            self.session.flags.flag(card.example_id, note="from the selection panel")

    def _export(self) -> None:
        if self.choice.value is None:
            return
        self.exported = self.session.export_csv(self.session.selection_frame(self.choice.value),
                                                f"selection-{self.choice.value}")
        self.summary.value += f"<br><span class='tda-muted'>exported to {html.escape(str(self.exported))}</span>"
