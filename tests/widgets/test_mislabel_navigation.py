"""Stepping through the Mislabels list reuses its ranking (a rebuild at 50,000 examples costs most of a second) and
still shows every change: a flag, another method. Driven without a browser."""

from tda_explorer import AttributionTask
from tda_explorer.session import TRAINING_LOSS, Session
from tda_explorer.widgets.mislabel import MislabelPanel
from tda_explorer.widgets.state import ExplorerState


def test_navigation_reuses_the_ranking_and_a_flag_or_method_change_rebuilds_it(tiny_data, tiny_mlp, tmp_path,
                                                                               monkeypatch):
    train, test = tiny_data
    session = Session(train, test, AttributionTask(tiny_mlp), folder=tmp_path)
    session.compute("grad-dot")
    built = []
    original = session.mislabel_ranking

    def counted(method):
        built.append(method)
        return original(method)

    monkeypatch.setattr(session, "mislabel_ranking", counted)
    state = ExplorerState()
    panel = MislabelPanel(session, state, interactive=False)
    histogram = panel.histogram.figure.data[0].x
    for _ in range(5):
        panel.move(+1)
    assert len(built) == 1 and state.mislabel_index == 5
    assert panel.histogram.figure.data[0].x is histogram  # the histogram of the whole ranking is not redrawn
    sixth = panel.table()["train_id"].iloc[5]
    session.flags.flag(sixth)
    panel.move(+1)
    assert len(built) == 2 and panel.table().set_index("train_id").loc[sixth, "flag"]
    assert "⚑" in panel.list.value
    state.mislabel_method = "grad-dot"
    assert built[-1] == "grad-dot" and panel.table()["train_id"].tolist() == \
        original("grad-dot")["train_id"].tolist()
    state.mislabel_method = TRAINING_LOSS
    assert built[-1] == TRAINING_LOSS
