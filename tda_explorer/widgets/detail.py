"""Detail of one training example: labels, self-influence, the test points it influences, flag/relabel."""

from __future__ import annotations

import html

import ipywidgets as W
import torch

from tda_explorer.session import Session
from tda_explorer.widgets.cards import ExampleCard
from tda_explorer.widgets.state import ExplorerState
from tda_explorer.widgets.theme import button_layout


def self_influence_rank(values: torch.Tensor, position: int) -> str:
    """Where one example's self-influence stands in the training set, in words that mean the same for every method
    (raw self-influence is in each method's own units): its rank and the share of examples at or above it."""
    rank = int((values > values[position]).sum()) + 1
    share = 100 * rank / len(values)
    return f"(rank {rank} of {len(values)}, top {share:.1f}%)" if share < 1 else \
        f"(rank {rank} of {len(values)}, top {share:.0f}%)"


def relabel_choice(label: int, predicted: int) -> int:
    """The class the relabel control starts on: the prediction where the model disagrees with the given label, else
    the given label itself (a correctly labelled example is not offered another class)."""
    return int(predicted) if int(predicted) != int(label) else int(label)


class TrainingDetail(W.VBox):
    """Shows ``state.detail_train_id``; Flag / Unflag / Relabel write to the session's store at once."""

    def __init__(self, session: Session, state: ExplorerState, n_influenced: int = 5):
        self.session, self.state = session, state
        self.image = W.Image(format="png", layout=W.Layout(width="96px", height="96px"))
        self.info = W.HTML()
        self.flag_button = W.Button(description="Flag", button_style="danger", layout=button_layout())
        self.unflag_button = W.Button(description="Unflag", layout=button_layout())
        self.relabel_to = W.Dropdown(options=[(n, c) for c, n in enumerate(session.train.class_names)],
                                     layout=W.Layout(width="auto", min_width="90px", flex="0 0 auto"))
        self.relabel_button = W.Button(description="Relabel", button_style="warning", layout=button_layout())
        for b, name in ((self.flag_button, "flag"), (self.unflag_button, "unflag"), (self.relabel_button, "relabel")):
            b.add_class(f"tda-detail-{name}")
        self.flag_button.on_click(lambda _b: self.flag(True))
        self.unflag_button.on_click(lambda _b: self.flag(False))
        self.relabel_button.on_click(lambda _b: self.relabel(self.relabel_to.value))
        self.influenced = [ExampleCard("tda-influenced-card", ("select",), width=80, image_px=40)
                           for _ in range(n_influenced)]
        for card in self.influenced:
            card.button.on_click(lambda _b, c=card: self._select_test(c.example_id))
        state.observe(lambda _c: self.refresh(), names=["detail_train_id", "method", "flags_revision"])
        super().__init__([
            W.HTML("<b>Training example</b>"),
            W.HBox([self.image, self.info]),
            W.HBox([self.flag_button, self.unflag_button, self.relabel_to, self.relabel_button],
                   layout=W.Layout(flex_flow="row wrap")),
            W.HTML("<span class='tda-muted'>test examples it influences most (by |score|)</span>"),
            W.HBox(self.influenced, layout=W.Layout(flex_flow="row wrap")),
        ], layout=W.Layout(min_width="340px", flex="0 0 340px"))
        self.add_class("tda-training-detail")
        self.refresh()

    def refresh(self) -> None:
        s, session = self.state, self.session
        self.layout.display = None if s.detail_train_id is not None else "none"
        if s.detail_train_id is None:
            return
        train = session.train
        pos = train.positions([s.detail_train_id])[0]
        png = train.thumbnail(pos)
        self.image.layout.display = None if png else "none"
        if png:
            self.image.value = png
        label, pred = int(train.labels[pos]), int(session.train_predicted[pos])
        flags = session.flags.to_dataframe().set_index("train_id")
        flagged = s.detail_train_id in flags.index and bool(flags.loc[s.detail_train_id, "flag"])
        relabel = flags.loc[s.detail_train_id, "relabel"] if s.detail_train_id in flags.index else None
        names = train.class_names
        self_inf = "".join(f"<br>self-influence ({html.escape(m)}): {float(v[pos]):.4g} "
                           f"<span class='tda-muted'>{self_influence_rank(v, pos)}</span>"
                           for m, v in session.self_influences.items())
        has_relabel = relabel is not None and str(relabel) != "<NA>"
        relabel_text = f" → relabelled {html.escape(names[int(relabel)])}" if has_relabel else ""
        text = "" if png else train.render_html(pos)
        self.info.value = (
            f"{text}<div><b>#{html.escape(str(s.detail_train_id))}</b> given label <b>{html.escape(names[label])}</b>, "
            f"predicted {html.escape(names[pred])}{relabel_text}{self_inf}<br>"
            f"{'<b>flagged</b>' if flagged else 'not flagged'}</div>"
        )
        self.relabel_to.value = relabel_choice(label, pred)
        if s.method:
            table = session.influenced_tests(s.detail_train_id, s.method, len(self.influenced))
            for card, row in zip(self.influenced, table.itertuples()):
                tpos = session.test.positions([row.test_id])[0]
                card.show(row.test_id, session.test.thumbnail(tpos), session.test.render_html(tpos),
                          f"#{row.test_id} {row.score:+.3g}")

    def flag(self, on: bool) -> None:
        if self.state.detail_train_id is None:
            return
        (self.session.flags.flag if on else self.session.flags.unflag)(self.state.detail_train_id)
        self.state.flags_revision += 1

    def relabel(self, label: int) -> None:
        if self.state.detail_train_id is None:
            return
        self.session.relabel(self.state.detail_train_id, label)
        self.state.flags_revision += 1

    def _select_test(self, test_id) -> None:
        if test_id is not None:
            self.state.test_id = test_id
