"""Explorer logic without a browser: simulated clicks, value changes and plot selections."""

from types import SimpleNamespace

import ipywidgets as W
import pandas as pd
import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask
from tda_explorer._validation import TDAError
from tda_explorer.data import TextRenderer
from tda_explorer.session import Session
from tda_explorer.widgets import Explorer


@pytest.fixture
def session(session_with):
    return session_with("tracin", "grad-dot")


@pytest.fixture
def explorer(session):
    return Explorer(session, method="tracin", k=4)


def test_proponents_shown_equal_topk_after_click(explorer):
    attribution = explorer.session.attribution("tracin")
    assert explorer.browser.shown_ids() == attribution.topk(explorer.state.test_id, 4)[0]
    card = explorer.picker.cards[5]
    card.button.click()
    assert explorer.state.test_id == card.example_id
    assert explorer.browser.shown_ids() == attribution.topk(card.example_id, 4)[0]
    assert explorer.browser.shown_ids("opponents") == attribution.topk(card.example_id, 4, "opponents")[0]
    assert card.button.button_style == "info"
    bars = explorer.browser.bars.figure.data
    assert list(bars[0].y) == [f"#{i}" for i in explorer.browser.shown_ids()]
    assert all(x > 0 for x in bars[0].x) and all(x < 0 for x in bars[1].x)


def test_method_and_k_changes_update_in_place(explorer):
    cards_before = list(explorer.browser.proponents)
    explorer.browser.method.value = "grad-dot"
    explorer.browser.k.value = 7
    expected = explorer.session.attribution("grad-dot").topk(explorer.state.test_id, 7)[0]
    assert explorer.state.method == "grad-dot" and explorer.state.k == 7
    assert explorer.browser.shown_ids() == expected
    assert explorer.browser.proponents == cards_before  # same widgets, new content


def test_flag_click_persists_and_survives_new_explorer(explorer):
    card = explorer.browser.proponents[0]
    train_id = card.example_id
    card.buttons["flag"].click()
    assert card.buttons["flag"].description == "unflag"
    assert explorer.session.flags.is_flagged(train_id)
    s = explorer.session
    fresh = Session(s.train, s.test, s.task, folder=s.folder)  # as after a kernel restart
    fresh.compute("tracin")
    assert fresh.flags.flagged_ids() == [train_id]
    other = Explorer(fresh, method="tracin", k=4)
    other.state.test_id = explorer.state.test_id
    assert other.browser.proponents[0].buttons["flag"].description == "unflag"
    card.buttons["flag"].click()
    assert not explorer.session.flags.is_flagged(train_id)


def test_open_detail_relabel_and_jump_to_influenced_test(explorer):
    card = explorer.browser.opponents[1]
    card.buttons["open"].click()
    train_id = card.example_id
    assert explorer.state.detail_train_id == train_id
    assert f"#{train_id}" in explorer.detail.info.value
    expected = explorer.session.influenced_tests(train_id, "tracin", 5).test_id.tolist()
    assert [c.example_id for c in explorer.detail.influenced] == expected
    explorer.detail.relabel_to.value = 3
    explorer.detail.relabel_button.click()
    assert explorer.session.flags.relabels() == {train_id: 3}
    assert explorer.session.corrected_labels()[explorer.session.train.positions([train_id])[0]] == 3
    assert "relabelled 3" in explorer.detail.info.value
    explorer.detail.influenced[2].button.click()
    assert explorer.state.test_id == expected[2]


def test_mislabel_panel_navigation_flags_and_histogram(explorer):
    panel = explorer.mislabels
    ranking = explorer.session.mislabel_ranking("tracin")
    assert explorer.state.mislabel_method == "tracin"
    assert explorer.state.detail_train_id == ranking.train_id.iloc[0]
    panel.next_button.click()
    panel.next_button.click()
    panel.prev_button.click()
    assert explorer.state.detail_train_id == ranking.train_id.iloc[1]
    assert "tda-current-row" in panel.list.value
    explorer.detail.flag_button.click()
    assert explorer.session.flags.flagged_ids() == [ranking.train_id.iloc[1]]
    assert list(panel.histogram.figure.data[1].x) == [pytest.approx(ranking.score.iloc[1])]
    explorer.detail.unflag_button.click()
    assert len(panel.histogram.figure.data[1].x) == 0
    assert len(panel.histogram.figure.data[0].x) == len(explorer.session.train)


def test_lasso_selection_fills_the_list(explorer):
    panel = explorer.mislabels
    chosen = [5, 17, 42]
    panel._on_lasso(panel.scatter.figure.data[0], SimpleNamespace(point_inds=chosen), None)
    ids = [explorer.session.train.ids[i] for i in chosen]
    assert sorted(panel.table().train_id) == sorted(ids)
    assert explorer.state.detail_train_id in ids
    assert "3 selected" in panel.status.value
    panel.clear_button.click()
    assert len(panel.table()) == len(explorer.session.train)


def test_compare_panel_overlap_scatter_metrics_and_stability(explorer):
    s = explorer.session
    panel = explorer.compare
    assert (explorer.state.compare_a, explorer.state.compare_b) == ("tracin", "grad-dot")
    test_id = explorer.state.test_id
    a, b = s.attribution("tracin"), s.attribution("grad-dot")
    expected = len(set(a.topk(test_id, 4)[0]) & set(b.topk(test_id, 4)[0])) / 4
    assert panel.overlap()["proponents"] == expected
    top = set()
    for att in (a, b):
        for kind in ("proponents", "opponents"):
            top.update(att.topk(test_id, 4, kind)[0])
    assert len(panel.scatter.figure.data[1].x) == len(top)
    assert "no ground truth" in panel.metrics.value
    s.metrics = pd.DataFrame({"method": ["tracin"], "lds": [0.53]})
    mean = a.scores
    s.add_stability("tracin", mean, torch.full_like(mean, 1e-9))
    explorer.state.test_id = s.test.ids[3]
    assert "0.530" in panel.metrics.value and "stable" in panel.stability.value and "p = 0" in panel.stability.value
    frame = s.stability_frame("tracin", s.test.ids[3])
    assert list(frame.columns) == ["train_id", "mean", "std", "z", "p_value", "stable"] and frame["stable"].all()
    s.add_stability("tracin", mean, mean.abs() * 10 + 1e-12)  # spread far larger than the mean: noise
    explorer.state.test_id = s.test.ids[4]
    assert "noisy" in panel.stability.value and ">stable<" not in panel.stability.value


def test_export_buttons_write_csv(explorer):
    explorer.browser.export_button.click()
    explorer.mislabels.export_button.click()
    files = sorted((explorer.session.folder / "exports").glob("*.csv"))
    assert len(files) == 2
    ranking = pd.read_csv(next(f for f in files if f.name.startswith("ranking")))
    assert list(ranking.columns) == ["test_id", "train_id", "rank", "score", "method", "label", "predicted", "flag",
                                     "training_loss"]
    assert len(ranking) == 8


def test_compute_bar_runs_in_background_and_shows_errors(explorer):
    job = explorer.compute_bar.start("grad-cos")
    job.join(120)
    assert job.state == "done" and "grad-cos" in explorer.session.methods
    assert "grad-cos" in explorer.browser.method.options and "grad-cos" in explorer.mislabels.method.options
    assert explorer.compute_bar.progress.bar_style == "success"
    explorer.compute_bar.method_config = {"if-cg": {"damping": -1.0}}  # bad input: a clear error, shown
    failing = explorer.compute_bar.start("if-cg")
    failing.join(60)
    assert failing.state == "failed"
    assert "damping must be a number in [0, inf), got -1.0" in explorer.compute_bar.message.value
    assert not explorer.compute_bar.run_button.disabled


def test_static_fallback_renders_without_figurewidget(session):
    explorer = Explorer(session, interactive=False)
    assert isinstance(explorer.browser.bars.widget, W.Output)
    explorer.state.test_id = session.test.ids[2]
    assert explorer.browser.shown_ids() == session.attribution("tracin").topk(session.test.ids[2], 5)[0]


def test_picker_filters_and_jump(explorer):
    picker = explorer.picker
    first = [c.example_id for c in picker.cards]
    picker.next_button.click()
    assert picker.page == 1 and [c.example_id for c in picker.cards] != first
    picker.only_errors.value = True
    table = explorer.session.test_table()
    errors = table[table.label != table.predicted].test_id.tolist()
    assert [c.example_id for c in picker.cards if c.example_id is not None] == errors[:10] and picker.page == 0
    picker.only_errors.value = False
    picker.class_filter.value = 7
    shown = [c.example_id for c in picker.cards if c.example_id is not None]
    assert shown and all(explorer.session.test.labels[i] == 7 for i in shown)
    picker.jump.value = "12"
    assert explorer.state.test_id == 12
    picker.jump.value = "<b>nope"
    assert "no test id" in picker.message.value and "<b>" not in picker.message.value


def test_text_data_is_shown_escaped(tmp_path):
    texts = ["<script>alert(1)</script> great", "<img src=x onerror=alert(2)> bad", "fine", "meh"]
    x = torch.arange(4, dtype=torch.float32).unsqueeze(1)
    train = AttributionDataset(x, torch.tensor([0, 1, 0, 1]), class_names=["<b>pos</b>", "neg"],
                               renderer=TextRenderer(texts))
    test = AttributionDataset(x[:2], torch.tensor([0, 1]), class_names=["<b>pos</b>", "neg"],
                              renderer=TextRenderer(texts[:2]))
    model = torch.nn.Linear(1, 2)
    session = Session(train, test, AttributionTask(model), folder=tmp_path)
    session.compute("grad-dot")
    explorer = Explorer(session, k=2)
    html_out = " ".join(c.caption.value for c in explorer.browser.proponents + explorer.picker.cards) + \
        explorer.browser.title.value + explorer.mislabels.list.value + explorer.detail.info.value
    assert "&lt;script&gt;" in html_out and "<script>" not in html_out
    assert "<img src=x" not in html_out and "<b>pos</b>" not in html_out


def test_explorer_needs_an_attribution(digits_experiment, tmp_path):
    with pytest.raises(ValueError, match="no attribution yet"):
        Explorer(Session.from_experiment(digits_experiment, folder=tmp_path))


def test_what_if_i_remove_the_flagged_retrains_and_reports(explorer, digits_experiment):
    panel, s = explorer.mislabels, explorer.session
    panel.what_if_button.click()
    assert "flag some training examples first" in panel.what_if.value
    flipped = [s.train.ids[i] for i in torch.nonzero(digits_experiment.split.flipped).flatten().tolist()]
    for train_id in flipped:
        s.flags.flag(train_id)
    panel.what_if_button.click()
    job = panel.what_if_job.join(300)
    assert job.state == "done", job.label
    effect = job.result
    assert effect.groups[0] == s.flags.flagged_ids() and len(effect.seeds) == 2
    assert float(effect.delta[0].mean()) < 0  # dropping the mislabeled examples lowers the test loss
    assert f"removing {len(flipped)} flagged examples" in panel.what_if.value
    assert "mean test loss" in panel.what_if.value and not panel.what_if_button.disabled
    s.retrainer = None
    panel.what_if_button.click()
    assert "cannot retrain" in panel.what_if.value


def test_selection_tab_shows_cards_flags_and_exports(explorer):
    session = explorer.session
    assert "no selection yet" in explorer.selection.summary.value
    ids = list(session.train.ids[10:16])
    table = pd.DataFrame({"rank": range(1, 7), "train_id": ids, "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                          "best_subtask": ["3"] * 6})
    session.add_selection("less-3s", table)
    explorer.refresh()
    assert explorer.selection.choice.value == "less-3s"
    shown = [c.example_id for c in explorer.selection.cards if c.layout.display != "none"]
    assert shown == ids
    explorer.selection.cards[2].button.click()
    assert session.flags.is_flagged(ids[2])
    explorer.selection.export.click()
    exported = pd.read_csv(explorer.selection.exported)
    assert exported["train_id"].tolist() == ids and exported["flag"].tolist()[2]
    assert {"label", "predicted", "score", "best_subtask"} <= set(exported.columns)
    with pytest.raises(TDAError, match="table.train_id"):
        session.add_selection("bad", pd.DataFrame({"train_id": [10**9], "score": [1.0]}))
    with pytest.raises(TDAError, match="missing"):
        session.add_selection("bad", pd.DataFrame({"id": [1]}))


def test_tracing_tab_shows_a_query_supporting_first_escaped(explorer):
    session = explorer.session
    ids = list(session.train.ids[:3])
    table = pd.DataFrame({"query_id": [0, 0, 0, 1], "query": ["<b>q0</b>"] * 3 + ["q1"],
                          "train_id": ids + ids[:1], "text": ["<script>x</script>", "plain", "other", "q1 doc"],
                          "verifier_score": [0.1, 0.9, 0.5, 0.3], "supported": [False, True, True, False],
                          "verifier": ["oracle"] * 4})
    session.add_tracing("run", table)
    explorer.refresh()
    panel = explorer.tracing
    assert [v for _, v in panel.query.options] == [0, 1]
    out = panel.table.value
    assert "&lt;script&gt;" in out and "<script>" not in out and "&lt;b&gt;q0" in out
    assert out.index("plain") < out.index("other") < out.index("&lt;script&gt;")  # supporting first, by score
    assert "2 supporting of 3" in out and "oracle" in out
    panel.query.value = 1
    assert "q1 doc" in panel.table.value and "plain" not in panel.table.value
    panel.export.click()
    assert pd.read_csv(panel.exported)["verifier_score"].tolist() == [0.1, 0.9, 0.5, 0.3]
    with pytest.raises(TDAError, match="verifier"):
        session.add_tracing("bad", table.drop(columns="verifier"))


def test_the_compute_bar_offers_only_what_runs_on_this_session(tmp_path):
    """A digits recipe trained with Adam: MAGIC and dvemb (which follow SGD steps) are not offered, and the bar's list
    of what cannot run says why; the methods the session meets are offered."""
    from tda_explorer.experiments import build_experiment

    session = Session.from_experiment(build_experiment("lr", n_train=120, n_test=20, epochs=20), folder=tmp_path)
    session.compute("grad-dot")
    bar = Explorer(session, method="grad-dot", k=4).compute_bar
    assert "magic" not in bar.choice.options and "dvemb" not in bar.choice.options
    assert "tracin" in bar.choice.options and "if-ekfac" in bar.choice.options
    assert "SGD steps" in bar.unavailable["magic"][0]
    assert "<b>magic</b>: magic differentiates SGD steps" in bar.lacking.value
