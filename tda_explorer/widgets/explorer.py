"""``Explorer``: linked panels over one ``Session`` — browse, find mislabels, compare methods."""

from __future__ import annotations

import html

import ipywidgets as W

# the compute bar reads each method's needs and options from the catalogue
from tda_explorer.compute.catalogue import method_spec
from tda_explorer.compute.methods.calibration import Calibration
from tda_explorer.errors import TDAError
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


class ComputeBar(W.VBox):
    """Compute another method off the UI thread: progress, cancel, and errors shown here; *Calibrate* first chooses
    the method's damping, Fisher kind, projection and step on this model (``Session.calibrate``), then computes it.

    It offers the methods this session can run (the catalogue's needs, the session's recipe and inputs:
    ``Session.method_availability``) and says for each other one what it lacks; *options* opens the chosen method's
    options, generated from its catalogue entry (empty = default).
    """

    def __init__(self, session: Session, on_done, method_config: dict | None = None):
        self.session, self.on_done = session, on_done
        self.method_config = method_config or {}
        availability = session.method_availability()
        given = set(self.method_config)

        def filled_here(m: str) -> bool:  # lacking only needs that this bar's own options for it supply
            return (m in given and bool(method_spec(m).missing(session.resources))
                    and not method_spec(m).missing(session.resources, self.method_config[m]))

        runnable = [m for m, lacks in availability.items() if not lacks or filled_here(m)]
        self.unavailable = {m: lacks for m, lacks in availability.items() if m not in runnable}
        self.choice = W.Dropdown(options=runnable, value="tracin" if "tracin" in runnable else runnable[0],
                                 description="compute", layout=W.Layout(width="220px"))
        self.run_button = W.Button(description="Run", icon="play", layout=W.Layout(width="auto", min_width="70px"))
        self.calibrate_button = W.Button(description="Calibrate", icon="sliders",
                                         tooltip="choose the method's damping, Fisher kind, projection and step "
                                                 "against a cheap truth on this model (within budget_s), then "
                                                 "compute it with them", layout=W.Layout(width="auto",
                                                                                           min_width="90px"))
        self.budget_s: float | None = None  # calibration's budget in seconds (None: 16× the default's run)
        self.calibration_ = None  # the last calibration (Session.calibrate's Calibration)
        self.cancel_button = W.Button(description="Cancel", layout=W.Layout(width="auto", min_width="80px"),
                                      disabled=True)
        self.options_toggle = W.ToggleButton(description="options", layout=W.Layout(width="auto", min_width="80px"))
        self.progress = W.FloatProgress(value=0, min=0, max=1, layout=W.Layout(width="160px"))
        self.message = W.HTML()
        self.fields: dict[str, W.Text] = {}
        self.form = W.VBox(layout=W.Layout(display="none"))
        lacking = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape('; '.join(lacks))}</li>"
                          for m, lacks in sorted(self.unavailable.items()))
        self.lacking = W.HTML(f"<details class='tda-muted'><summary>{len(self.unavailable)} "
                              f"{'method needs' if len(self.unavailable) == 1 else 'methods need'} more than "
                              f"this session has</summary><ul>{lacking}</ul></details>" if lacking else "")
        self.job: BackgroundJob | None = None
        self.plan_ = None  # the last run's plan (Attributor.plan), shown while it computes
        self.run_button.on_click(lambda _b: self.start(self.choice.value))
        self.calibrate_button.on_click(lambda _b: self.start_calibration(self.choice.value))
        self.cancel_button.on_click(lambda _b: self.job and self.job.cancel())
        self.choice.observe(lambda _c: self._build_form(), "value")
        self.options_toggle.observe(self._toggle_form, "value")
        self._build_form()
        bar = W.HBox([self.choice, self.options_toggle, self.run_button, self.calibrate_button, self.cancel_button,
                      self.progress, self.message])
        super().__init__([bar, self.form, self.lacking])
        self.add_class("tda-compute-bar")

    def _build_form(self) -> None:
        """One text field per command-line option of the chosen method: its default as placeholder, its help as
        tooltip."""
        infos = [a for a in method_spec(self.choice.value).argument_info() if a.cli]
        self.fields = {a.name: W.Text(description=a.name, placeholder=str(a.default), tooltip=a.help,
                                      style={"description_width": "140px"}, layout=W.Layout(width="360px"))
                       for a in infos}
        self.infos = {a.name: a for a in infos}
        self.form.children = list(self.fields.values())

    def _toggle_form(self, change) -> None:
        self.form.layout.display = "flex" if change["new"] else "none"

    def options(self, method: str) -> dict:
        """The options for ``method``: the ``method_config`` given to the explorer, then the form's filled fields."""
        options = dict(self.method_config.get(method, {}))
        if method == self.choice.value:
            options.update({name: self.infos[name].parse(field.value) for name, field in self.fields.items()
                            if field.value.strip()})
        return options

    def _begin(self, method: str, doing: str) -> dict:
        """Buttons and progress for a new job on ``method``; its options, or the options' error shown (and raised)."""
        self.run_button.disabled = self.calibrate_button.disabled = True
        self.cancel_button.disabled = False
        self.progress.value, self.progress.bar_style = 0.05, "info"
        self.message.value = f"<span class='tda-muted'>{doing} {html.escape(method)}…</span>"
        try:
            return self.options(method)
        except TDAError as err:
            self.run_button.disabled = self.calibrate_button.disabled = False
            self.cancel_button.disabled = True
            self.progress.bar_style = "danger"
            self.message.value = error_html(str(err))
            raise

    def start(self, method: str) -> BackgroundJob:
        options = self._begin(method, "computing")
        self.plan_ = None
        stages = [(f"computing {method}", lambda _: self.session.compute(method, **options))]
        if not self.session.is_cached(method, **options):  # a plan first: time and memory, measured on a few batches
            stages.insert(0, (f"planning {method}", lambda _: self._keep_plan(self.session.plan(method, **options))))
        self.job = BackgroundJob(stages, self._update).start()
        return self.job

    def start_calibration(self, method: str) -> BackgroundJob:
        """Calibrate ``method`` (``Session.calibrate``, the form's options as its starting point, ``budget_s``) in the
        background, then compute it with the chosen settings; the result line says what was chosen, against which
        truth, with its score beside the default's."""
        options = self._begin(method, "calibrating")
        self.plan_ = self.calibration_ = None
        self.job = BackgroundJob([(f"calibrating {method}", lambda _: self.session.calibrate(
            method, budget_s=self.budget_s, **options))], self._update).start()
        return self.job

    def _keep_plan(self, plan) -> None:
        self.plan_ = plan

    def _update(self, job: BackgroundJob) -> None:
        self.progress.value = max(job.progress, 0.05)
        if not job.done:
            if job.label.startswith("computing") and self.plan_ is not None:
                self.message.value = f"<span class='tda-muted'>{html.escape(str(self.plan_))}</span>"
            elif job.label.startswith("calibrating"):
                self.message.value = f"<span class='tda-muted'>{html.escape(job.label)}…</span>"
            return
        self.run_button.disabled = self.calibrate_button.disabled = False
        self.cancel_button.disabled = True
        if job.state == "done":
            self.progress.bar_style = "success"
            if isinstance(job.result, Calibration):
                self.calibration_ = job.result
                self.message.value = f"<span class='tda-muted'>calibrated: {html.escape(job.result.summary())}</span>"
            else:
                planned = f" (planned: {html.escape(str(self.plan_))})" if self.plan_ is not None else ""
                self.message.value = f"<span class='tda-muted'>done{planned}</span>"
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
        self.browser.layout.flex = "1 1 auto"
        self.browser.layout.min_width = "0"
        self.tabs = W.Tab([
            W.VBox([self.picker, W.HBox([self.browser, self.detail], layout=W.Layout(width="100%"))]),
            W.VBox([self.mislabels, self.detail]),
            self.compare,
            self.selection,
            self.tracing,
        ])
        for i, title in enumerate(("Browse", "Mislabels", "Compare", "Selection", "Tracing")):
            self.tabs.set_title(i, title)
        self.tabs.observe(self._tab_changed, "selected_index")
        super().__init__([W.HTML(CSS), self.compute_bar, self.tabs])
        self.add_class("tda-explorer")
        self.state.test_id = session.test.ids[0]

    def __repr__(self) -> str:
        # What a notebook shows where the widget view is gone (reopened with the kernel still alive, or saved
        # without widget state): how to get it back.
        return (f"tda_explorer Explorer over {len(self.session.test)} test and {len(self.session.train)} training "
                f"examples ({', '.join(self.session.methods)}). The interactive view is not shown here: run "
                "display(explorer) with the variable holding it, or run this cell again.")

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)  # whole: ipywidgets cuts the text at 110 characters
        return bundle

    def _tab_changed(self, change) -> None:
        """On the Mislabels tab the detail panel shows the highlighted row, not what Browse opened last."""
        if change["new"] == 1:
            self.mislabels.refresh(follow=True)

    def refresh(self) -> None:
        """Show what was added to the session since (attributions, values, selections, tracing runs)."""
        self._methods_changed()

    def _methods_changed(self) -> None:
        self.selection.refresh()
        self.tracing.refresh()
        for dropdown in (self.browser.method, self.compare.a, self.compare.b):
            refill(dropdown, self.session.methods)
        refill(self.mislabels.method, self.session.mislabel_rankings)
