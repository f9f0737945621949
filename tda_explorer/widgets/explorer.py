"""``Explorer``: linked panels over one ``Session`` — browse, find mislabels, compare methods."""

from __future__ import annotations

import html

import ipywidgets as W

from tda_explorer.compute.methods import available_methods
from tda_explorer.jobs import BackgroundJob
from tda_explorer.session import Session
from tda_explorer.widgets.browser import InfluenceBrowser
from tda_explorer.widgets.compare import ComparePanel
from tda_explorer.widgets.detail import TrainingDetail
from tda_explorer.widgets.mislabel import MislabelPanel
from tda_explorer.widgets.picker import TestPicker
from tda_explorer.widgets.selection import SelectionPanel
from tda_explorer.widgets.state import ExplorerState, refill
from tda_explorer.widgets.theme import CSS, error_html
from tda_explorer.widgets.tracing import TracingPanel


class ComputeBar(W.HBox):
    """Compute another method off the UI thread: progress, cancel, and errors shown here."""

    def __init__(self, session: Session, on_done, method_config: dict | None = None):
        self.session, self.on_done = session, on_done
        self.method_config = method_config or {}
        methods = available_methods()
        self.choice = W.Dropdown(options=methods, value="tracin" if "tracin" in methods else methods[0],
                                 description="compute", layout=W.Layout(width="220px"))
        self.run_button = W.Button(description="Run", icon="play", layout=W.Layout(width="70px"))
        self.cancel_button = W.Button(description="Cancel", layout=W.Layout(width="70px"), disabled=True)
        self.progress = W.FloatProgress(value=0, min=0, max=1, layout=W.Layout(width="160px"))
        self.message = W.HTML()
        self.job: BackgroundJob | None = None
        self.run_button.on_click(lambda _b: self.start(self.choice.value))
        self.cancel_button.on_click(lambda _b: self.job and self.job.cancel())
        super().__init__([self.choice, self.run_button, self.cancel_button, self.progress, self.message])
        self.add_class("tda-compute-bar")

    def start(self, method: str) -> BackgroundJob:
        self.run_button.disabled, self.cancel_button.disabled = True, False
        self.progress.value, self.progress.bar_style = 0.05, "info"
        self.message.value = f"<span class='tda-muted'>computing {html.escape(method)}…</span>"
        self.job = self.session.compute_async(method, on_update=self._update, **self.method_config.get(method, {}))
        return self.job

    def _update(self, job: BackgroundJob) -> None:
        self.progress.value = max(job.progress, 0.05)
        if not job.done:
            return
        self.run_button.disabled, self.cancel_button.disabled = False, True
        if job.state == "done":
            self.progress.bar_style = "success"
            self.message.value = "<span class='tda-muted'>done</span>"
            self.on_done()
        else:
            self.progress.bar_style = "danger"
            self.message.value = error_html(job.label)


class Explorer(W.VBox):
    """The explorer: test-point picker, influence browser, training-example detail, mislabel panel and
    method comparison, all observing one ``ExplorerState``.

    Parameters
    ----------
    session : Session
        Must hold at least one computed attribution (``session.compute("tracin")``).
    method : str, optional
        The method shown first (default: the first computed).
    k : int
        How many proponents and opponents to show.
    interactive : bool, optional
        Live plotly ``FigureWidget`` s (default where they render) or static figures (VS Code, Colab).
    method_config : dict, optional
        Options per method for the compute bar, e.g. ``{"suspicion": {"model_factory": ..., ...}}``.
    """

    def __init__(self, session: Session, method: str | None = None, k: int = 5, page_size: int = 10,
                 interactive: bool | None = None, method_config: dict | None = None):
        if not session.methods:
            raise ValueError("session has no attribution yet: call session.compute('tracin') first")
        if method is not None and method not in session.methods:
            raise ValueError(f"method {method!r} has not been computed; computed: {session.methods}")
        self.session = session
        self.state = ExplorerState(method=method or session.methods[0], k=k)
        self.picker = TestPicker(session, self.state, page_size)
        self.browser = InfluenceBrowser(session, self.state, interactive)
        self.detail = TrainingDetail(session, self.state)
        self.mislabels = MislabelPanel(session, self.state, interactive)
        self.compare = ComparePanel(session, self.state, interactive)
        self.selection = SelectionPanel(session)
        self.tracing = TracingPanel(session)
        self.compute_bar = ComputeBar(session, self._methods_changed, method_config)
        self.browser.method.value = self.state.method
        self.tabs = W.Tab([
            W.VBox([self.picker, W.HBox([self.browser, self.detail])]),
            W.VBox([self.mislabels, self.detail]),
            self.compare,
            self.selection,
            self.tracing,
        ])
        for i, title in enumerate(("Browse", "Mislabels", "Compare", "Selection", "Tracing")):
            self.tabs.set_title(i, title)
        super().__init__([W.HTML(CSS), self.compute_bar, self.tabs])
        self.add_class("tda-explorer")
        self.state.test_id = session.test.ids[0]

    def refresh(self) -> None:
        """Show what was added to the session since (attributions, values, selections, tracing runs)."""
        self._methods_changed()

    def _methods_changed(self) -> None:
        self.selection.refresh()
        self.tracing.refresh()
        for dropdown in (self.browser.method, self.compare.a, self.compare.b):
            refill(dropdown, self.session.methods)
        refill(self.mislabels.method, list(self.session.self_influences))
