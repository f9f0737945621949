"""What a user sees, checked without a browser: the method asked for, labels and units that mean something, charts
that say what they show or say why they are empty, and a way back to a lost view."""

import numpy as np
import pandas as pd
import pytest
import torch

from tda_explorer.widgets import Explorer
from tda_explorer.widgets.detail import relabel_choice, self_influence_rank
from tda_explorer.widgets.mislabel import histogram_axis, padded_range


@pytest.fixture
def session(session_with):
    return session_with("grad-dot", "tracin")


def test_explorer_opens_on_the_method_asked_for_not_the_first_computed(session):
    assert session.methods[0] == "grad-dot"
    explorer = Explorer(session, method="tracin", k=10)
    assert explorer.state.method == "tracin" and explorer.browser.method.value == "tracin"
    assert explorer.compare.a.value == "tracin" and explorer.compare.b.value == "grad-dot"
    assert "tracin" in explorer.browser.title.value


def test_relabel_starts_on_the_given_label_unless_the_model_disagrees():
    assert relabel_choice(label=3, predicted=3) == 3
    assert relabel_choice(label=3, predicted=5) == 5


def test_detail_shows_self_influence_rank_in_the_training_set(session):
    values = torch.tensor([5.0, 1.0, 3.0, 9.0])
    assert self_influence_rank(values, 3) == "(rank 1 of 4, top 25%)"
    assert self_influence_rank(values, 1) == "(rank 4 of 4, top 100%)"
    explorer = Explorer(session, method="tracin")
    explorer.state.detail_train_id = session.train.ids[0]
    assert explorer.detail.info.value.count("(rank ") == len(session.self_influences)


def test_histogram_axis_names_the_ranking_and_goes_log_on_skewed_scores(session):
    explorer = Explorer(session, method="tracin")
    for method in ("grad-dot", "tracin"):
        explorer.mislabels.method.value = method
        assert explorer.mislabels.histogram.figure.layout.xaxis.title.text.startswith(f"{method} score")
    skewed = np.concatenate([np.full(990, 1.0), np.logspace(2, 6, 10)])
    x, log = histogram_axis(skewed)
    assert log and np.allclose(x, np.log10(skewed))
    x, log = histogram_axis(np.array([-1.0, 0.5, 2.0]))
    assert not log and list(x) == [-1.0, 0.5, 2.0]


def test_flagged_examples_are_marked_on_the_histogram(session):
    explorer = Explorer(session, method="tracin")
    explorer.mislabels.method.value = "tracin"
    flagged = session.train.ids[:3]
    for i in flagged:
        session.flags.flag(i)
    explorer.state.flags_revision += 1
    assert len(explorer.mislabels.histogram.figure.data[1].x) == 3


def test_embedding_axes_hold_every_point_and_the_colours_have_a_legend(session):
    explorer = Explorer(session, method="tracin")
    scatter = explorer.mislabels.scatter.figure
    points = scatter.data[0]
    for axis, values in ((scatter.layout.xaxis, points.x), (scatter.layout.yaxis, points.y)):
        low, high = axis.range
        assert low <= min(values) and max(values) <= high
    assert points.marker.showscale and list(points.marker.colorbar.ticktext) == list(session.train.class_names)
    assert padded_range(np.array([0.0, 1.79])) == pytest.approx([-0.0895, 1.8795])


def test_compare_says_why_the_further_training_chart_is_empty_then_draws_it(session):
    explorer = Explorer(session, method="tracin")
    compare = explorer.compare
    assert compare.curve_box.layout.display == "none"
    assert "further_training_curve" in compare.curve_note.value
    session.further_training = pd.DataFrame({"method": ["tracin", "tracin"], "epochs": [1, 2],
                                             "cosine": [0.5, 0.6]})
    compare.refresh()
    assert compare.curve_box.layout.display is None and compare.curve_note.value == ""
    assert list(compare.curve.figure.data[0].y) == [0.5, 0.6]


def test_mislabels_tab_shows_the_highlighted_row_in_the_detail(session):
    explorer = Explorer(session, method="tracin")
    explorer.browser.open_detail(session.train.ids[7])  # opened from Browse
    explorer.tabs.selected_index = 1
    highlighted = explorer.mislabels.table()["train_id"].iloc[explorer.state.mislabel_index]
    assert explorer.state.detail_train_id == highlighted


def test_a_lost_view_says_how_to_show_the_explorer_again(session):
    explorer = Explorer(session, method="tracin")
    text = explorer._repr_mimebundle_()["text/plain"] if hasattr(explorer, "_repr_mimebundle_") else repr(explorer)
    assert "display(explorer)" in text and "run this cell again" in text


def test_explorer_opens_on_a_lazily_read_torch_dataset(tmp_path):
    from torch import nn
    from torch.utils.data import Dataset

    from tda_explorer import AttributionDataset, AttributionTask
    from tda_explorer.session import Session

    class Images(Dataset):
        def __init__(self, n, seed):
            gen = torch.Generator().manual_seed(seed)
            self.x = torch.randn(n, 3, 8, 8, generator=gen)
            self.y = (self.x.mean((1, 2, 3)) > 0).long()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    train, test = AttributionDataset.from_torch(Images(64, 0)), AttributionDataset.from_torch(Images(16, 1))
    session = Session(train, test, AttributionTask(model), tmp_path)
    session.compute("grad-dot")
    explorer = Explorer(session, k=3)
    explorer.picker.cards[1].button.click()
    expected = session.attribution("grad-dot").topk(explorer.state.test_id, 3, signed=True)[0]
    assert explorer.browser.shown_ids() == expected
    assert session.embedding_source == "predicted probabilities"
    assert "training predicted probabilities (PCA)" in explorer.mislabels.scatter.figure.layout.title.text
    assert len(explorer.mislabels.table()) == 64
