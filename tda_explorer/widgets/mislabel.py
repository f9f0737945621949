"""Mislabel panel: training examples ranked by suspicion, flag / unflag / relabel, histogram and embedding."""

from __future__ import annotations

import base64
import html
from typing import Any

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from tda_explorer.jobs import BackgroundJob
from tda_explorer.session import ADDS_LITTLE, TRAINING_LOSS, Session
from tda_explorer.widgets.state import ExplorerState
from tda_explorer.widgets.theme import FigureView, button_layout

PAGE = 10
#: Table heads of the baseline columns shown beside every ranking's score.
BASELINE_HEADS = {"training_loss": "training loss", "oof_confidence": "out-of-fold p(given)"}
CHART_WIDTH = 520  # px: two side by side in a notebook's width, wrapping below each other where it is narrower


def seed_noise(std: float, unit: str = "") -> str:
    """" ± s across seeds" for a spread that was measured (nothing for NaN): shown beside every what-if change."""
    return "" if std != std else f" ± {std:.4g}{unit} across seeds"


def padded_range(values: np.ndarray, pad: float = 0.05) -> list[float]:
    """An axis range holding every value with ``pad`` of the span on each side (plotly's autorange can leave
    points outside a figure that is later resized)."""
    low, high = float(np.min(values)), float(np.max(values))
    span = high - low or max(abs(high), 1.0)
    return [low - pad * span, high + pad * span]


def histogram_axis(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """The values a score histogram is drawn over: log10 of the scores when they are all positive and the largest is
    over a hundred times the median (equal-width bins then put nearly every example in the first bar), else the
    scores; and whether it is log."""
    positive = scores[np.isfinite(scores)]
    if len(positive) and (positive > 0).all() and positive.max() > 100 * np.median(positive):
        return np.log10(scores), True
    return scores, False


def baseline_text(method: str, comparison: dict[str, float]) -> str:
    """One line (HTML) putting ``method``'s ranking beside the training-loss baseline: its Spearman correlation with
    the loss (saying so when it adds little beyond it) and, when the flipped labels are known, its ROC-AUC and
    recall@10% beside the loss's (``Session.baseline_comparison``)."""
    flips = "auc" in comparison
    if method == TRAINING_LOSS:
        text = "the baseline: training examples by the model's loss at their given label, highest first"
        if flips:
            text += (f" · on the known flipped labels: ROC-AUC {comparison['auc']:.3f}, recall@10% "
                     f"{comparison['recall_at_10']:.2f}")
        return f"<span class='tda-muted'>{html.escape(text)}</span>"
    rho = comparison["spearman"]
    if rho != rho:
        text = "rank correlation with training loss: undefined (a constant score)"
    else:
        text = f"rank correlation with training loss: {rho:.2f}"
        if rho >= ADDS_LITTLE:
            text += " — this method adds little beyond the loss"
    if flips:
        text += (f" · on the known flipped labels: ROC-AUC {comparison['auc']:.3f} vs {comparison['loss_auc']:.3f} "
                 f"for the loss ({comparison['auc_minus_loss']:+.3f}), recall@10% {comparison['recall_at_10']:.2f} vs "
                 f"{comparison['loss_recall_at_10']:.2f} ({comparison['recall_at_10_minus_loss']:+.2f})")
    return f"<span class='tda-muted'>{html.escape(text)}</span>"


class MislabelPanel(W.VBox):
    """Ranks the training set by a self-influence / suspicion score of the chosen method, or by a baseline (the
    training loss, always offered; the out-of-fold confidence when known), with the chosen ranking's agreement with
    the training-loss baseline on a line of its own.

    The current row (next / previous) is shown in the shared training-example detail, where Flag,
    Unflag and Relabel act; a lasso on the embedding restricts the list to the selected examples.
    """

    def __init__(self, session: Session, state: ExplorerState, interactive: bool | None = None):
        self.session, self.state = session, state
        self.method = W.Dropdown(options=session.mislabel_rankings, description="rank by",
                                 layout=W.Layout(width="240px"))
        self.prev_button = W.Button(description="◀ previous", layout=button_layout())
        self.next_button = W.Button(description="next ▶", layout=button_layout())
        self.clear_button = W.Button(description="clear lasso", layout=button_layout())
        self.export_button = W.Button(description="Save CSV", icon="download", layout=button_layout())
        self.what_if_button = W.Button(description="What if I remove the flagged?", icon="refresh",
                                       layout=button_layout(),
                                       tooltip="retrain without the flagged examples (paired seeds) and compare")
        self.what_if = W.HTML()
        self.what_if_progress = W.FloatProgress(value=0, min=0, max=1, layout=W.Layout(width="160px", display="none"))
        self.what_if_cancel = W.Button(description="Cancel", layout=button_layout(), disabled=True)
        self.what_if_cancel.on_click(lambda _b: self.what_if_job and self.what_if_job.cancel())
        self.what_if_job = None
        for b, name in ((self.prev_button, "prev"), (self.next_button, "next"), (self.export_button, "export"),
                        (self.what_if_button, "what-if")):
            b.add_class(f"tda-mislabel-{name}")
        self.status = W.HTML()
        self.baseline = W.HTML()  # the chosen ranking beside the training-loss baseline
        self.baseline.add_class("tda-mislabel-baseline")
        self._baseline_for: tuple | None = None  # (method, its score tensor) the line was computed for
        self._ranking_for: tuple | None = None  # (key, score tensor, ranking) of the last ranking built
        self.list = W.HTML()
        self.list.add_class("tda-table")
        self.histogram = FigureView(go.Figure(
            [go.Histogram(name="all", marker_color="#7a7a7a", nbinsx=60),
             go.Scatter(name="flagged", mode="markers", marker=dict(color="#c62828", symbol="triangle-up", size=9),
                        hoverinfo="x")],
            layout=dict(yaxis_title="examples", showlegend=True, height=260, width=CHART_WIDTH,
                        legend=dict(orientation="h", y=1.12, x=0)),
        ), interactive)
        emb = session.embedding().numpy()
        labels = session.train.labels.numpy()
        names = session.train.class_names
        self.scatter = FigureView(go.Figure(
            [go.Scattergl(x=emb[:, 0], y=emb[:, 1], mode="markers",
                          marker=dict(color=labels, colorscale="Turbo", size=4, opacity=0.7, cmin=0,
                                      cmax=max(len(names) - 1, 1), showscale=True,
                                      colorbar=dict(title="given label", tickvals=list(range(len(names))),
                                                    ticktext=[html.escape(str(n)) for n in names], thickness=10)),
                          text=[html.escape(f"#{i} label {names[c]}") for i, c in zip(session.train.ids, labels)],
                          hoverinfo="text")],
            layout=dict(dragmode="lasso", xaxis=dict(title="PC 1", range=padded_range(emb[:, 0])),
                        yaxis=dict(title="PC 2", range=padded_range(emb[:, 1])), height=300, width=CHART_WIDTH,
                        title=dict(text=f"training {session.embedding_source} (PCA), coloured by given label — lasso "
                                        "to filter", x=0)),
        ), interactive)
        if self.scatter.interactive:
            self.scatter.figure.data[0].on_selection(self._on_lasso)
        W.link((self.method, "value"), (state, "mislabel_method"))
        self.prev_button.on_click(lambda _b: self.move(-1))
        self.next_button.on_click(lambda _b: self.move(+1))
        self.clear_button.on_click(lambda _b: self.select_ids([]))
        self.export_button.on_click(lambda _b: self.export())
        self.what_if_button.on_click(lambda _b: self.run_what_if())
        state.observe(lambda _c: self.refresh(follow=True), names=["mislabel_method", "mislabel_index", "selection"])
        state.observe(lambda _c: self.refresh(), names=["flags_revision"])
        super().__init__([
            W.HBox([self.method, self.prev_button, self.next_button, self.clear_button, self.export_button]),
            self.status, self.baseline, self.list,
            W.HBox([self.histogram.widget, self.scatter.widget], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.what_if_button, self.what_if_cancel, self.what_if_progress]), self.what_if,
        ])
        self.add_class("tda-mislabel-panel")
        if self.method.options:
            state.mislabel_method = self.method.options[0]
        self.refresh(follow=state.detail_train_id is None)

    # -- logic (testable without a browser) ------------------------------------------------------
    def table(self, ranking=None):
        """The ranking on screen (restricted to the lasso selection when there is one)."""
        if not self.state.mislabel_method:
            return None
        df = self.ranking()[0] if ranking is None else ranking
        if self.state.selection:
            df = df[df["train_id"].isin(set(self.state.selection))]
        return df.reset_index(drop=True)

    def ranking(self) -> tuple[Any, bool]:
        """The chosen method's whole ranking and whether it was rebuilt now: it is rebuilt only when the method, its
        scores, the flags or the session's columns changed, so stepping through it reuses it (at 50,000 training
        examples a rebuild costs most of a second)."""
        method = self.state.mislabel_method
        if not method:
            return None, False
        score = self.session.ranking_score(method)
        key = (method, tuple(self.session.flags.flagged_ids()), tuple(self.session.values),
               self.session.oof_probabilities is not None)
        if self._ranking_for is None or self._ranking_for[0] != key or self._ranking_for[1] is not score:
            self._ranking_for = (key, score, self.session.mislabel_ranking(method))
            return self._ranking_for[2], True
        return self._ranking_for[2], False

    def move(self, step: int) -> None:
        """Go to the next / previous example of the ranking."""
        df = self.table()
        if df is None or df.empty:
            return
        self.state.mislabel_index = int(np.clip(self.state.mislabel_index + step, 0, len(df) - 1))

    def select_ids(self, ids: list) -> None:
        """Restrict the list to ``ids`` (what a lasso does); an empty list shows everything."""
        self.state.mislabel_index = 0
        self.state.selection = list(ids)

    def _on_lasso(self, trace, points, selector) -> None:
        self.select_ids([self.session.train.ids[i] for i in points.point_inds])

    def run_what_if(self):
        """Retrain without the flagged examples in the background; the summary appears when it is done."""
        flagged = self.session.flags.flagged_ids()
        if self.session.retrainer is None:
            self.what_if.value = ("<span class='tda-muted'>this session cannot retrain: give it your training "
                                  "function, Session(..., retrain=fn) with fn(train_ids, seed) -> model</span>")
            return None
        if not flagged:
            self.what_if.value = "<span class='tda-muted'>flag some training examples first</span>"
            return None
        self.what_if.value = f"<span class='tda-muted'>retraining without {len(flagged)} flagged examples…</span>"
        self.what_if_button.disabled, self.what_if_cancel.disabled = True, False
        self.what_if_progress.value, self.what_if_progress.layout.display = 0.02, None
        self.what_if_job = BackgroundJob([("retraining", lambda _: self.session.what_if_removed(flagged))],
                                         on_update=self._show_what_if).start()
        return self.what_if_job

    def _show_what_if(self, job) -> None:
        self.what_if_progress.value = max(job.progress, 0.02)
        if not job.done:
            if job.label.startswith("retrained"):
                self.what_if.value = f"<span class='tda-muted'>{html.escape(job.label)}…</span>"
            return
        self.what_if_button.disabled, self.what_if_cancel.disabled = False, True
        self.what_if_progress.layout.display = "none"
        if job.state == "cancelled":
            self.what_if.value = "<span class='tda-muted'>retraining cancelled</span>"
            return
        if job.state != "done":
            self.what_if.value = f"<span class='tda-error'>retraining failed: {html.escape(job.label)}</span>"
            return
        effect = job.result
        delta = effect.delta[0]
        before, after = float(effect.full.mean()), float((effect.full + delta).mean())
        acc_before = effect.accuracy_full
        acc_after = acc_before + float(effect.accuracy_delta[0])
        noise = effect.summary(0)
        order = delta.abs().argsort(descending=True)[:5].tolist()
        rows = "".join(f"<tr><td>#{html.escape(str(effect.test_ids[j]))}</td><td>{float(effect.full[j]):.3f} → "
                       f"{float(effect.full[j] + delta[j]):.3f}</td></tr>" for j in order)
        self.what_if.value = (
            f"<b>removing {len(effect.groups[0])} flagged examples</b> ({len(effect.seeds)} paired seeds): "
            f"mean test loss {before:.4f} → {after:.4f} "
            f"({after - before:+.4f}{seed_noise(noise['loss_delta_seed_std'])}), test accuracy "
            f"{100 * acc_before:.1f}% → {100 * acc_after:.1f}%"
            f"{seed_noise(100 * noise['accuracy_delta_seed_std'], ' points')}"
            f"<table><tr><th>most changed test points</th><th>loss</th></tr>{rows}</table>"
        )

    def show_baseline(self) -> None:
        """The line comparing the chosen ranking with the training-loss baseline (recomputed only when the ranking
        or its scores change, not on every navigation)."""
        method = self.state.mislabel_method
        if not method:
            self.baseline.value, self._baseline_for = "", None
            return
        score = self.session.ranking_score(method)
        if self._baseline_for is not None and self._baseline_for[0] == method and self._baseline_for[1] is score:
            return
        self.baseline.value = baseline_text(method, self.session.baseline_comparison(method))
        self._baseline_for = (method, score)

    def export(self) -> None:
        df = self.table()
        if df is not None:
            path = self.session.export_csv(df, f"mislabel-{self.state.mislabel_method}")
            self.status.value = f"<span class='tda-muted'>saved {html.escape(str(path))}</span>"

    # -- view ------------------------------------------------------------------------------------
    def refresh(self, follow: bool = False) -> None:
        """Redraw; with ``follow`` (navigation moved) also show the current row in the detail panel."""
        all_scores, rebuilt = self.ranking()
        if rebuilt:  # the histogram is of the whole ranking: navigation leaves it as it is
            self._draw_histogram(all_scores)
        self.show_baseline()
        df = self.table(all_scores)
        if df is None or df.empty:
            self.list.value = "<i>no ranking: compute a method first</i>" if df is None else "<i>empty selection</i>"
            return
        index = min(self.state.mislabel_index, len(df) - 1)
        if follow:
            current = df["train_id"].iloc[index]
            self.state.detail_train_id = current.item() if hasattr(current, "item") else current
        start = (index // PAGE) * PAGE
        names, train = self.session.train.class_names, self.session.train
        value_columns = [c for c in df.columns if c.startswith("value:")]
        baseline_columns = [c for c in ("training_loss", "oof_confidence") if c in df.columns]
        rows = []
        for i in range(start, min(start + PAGE, len(df))):
            r = df.iloc[i]
            pos = train.positions([r["train_id"]])[0]
            png = train.thumbnail(pos)
            thumb = (f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' width=24 height=24/>"
                     if png else train.render_html(pos))
            cls = " class='tda-current-row'" if i == index else ""
            rows.append(
                f"<tr{cls}><td>{r['rank']}</td><td>{thumb}</td><td>#{html.escape(str(r['train_id']))}</td>"
                f"<td>{html.escape(names[r['label']])}</td><td>{html.escape(names[r['predicted']])}</td>"
                f"<td>{html.escape(names[r['suggested']])}</td><td>{r['score']:.4g}</td>"
                + "".join(f"<td>{r[c]:.4g}</td>" for c in baseline_columns + value_columns)
                + f"<td>{'⚑' if r['flag'] else ''}</td></tr>"
            )
        scope = f"{len(df)} selected" if self.state.selection else f"{len(df)} training examples"
        self.status.value = f"<span class='tda-muted'>{scope} · showing {index + 1} of {len(df)}</span>"
        value_heads = "".join(f"<th>{BASELINE_HEADS[c]}</th>" for c in baseline_columns)
        value_heads += "".join(f"<th>{html.escape(c[len('value:'):])}</th>" for c in value_columns)
        self.list.value = ("<table><tr><th>rank</th><th></th><th>id</th><th>given</th><th>predicted</th>"
                           f"<th>suggested</th><th>score</th>{value_heads}<th>flag</th></tr>" + "".join(rows)
                           + "</table>")

    def _draw_histogram(self, all_scores) -> None:
        x, log = histogram_axis(all_scores["score"].to_numpy())
        flagged = x[all_scores["flag"].to_numpy(dtype=bool)]
        title = f"{self.state.mislabel_method} score" + (" (log10: the scores span decades)" if log else "")

        def draw(fig):
            fig.data[0].x = x
            fig.data[1].x, fig.data[1].y = flagged, np.zeros(len(flagged))
            fig.layout.xaxis.title = html.escape(title)

        self.histogram.update(draw)
