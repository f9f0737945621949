import sqlite3

import pytest
import torch

from tda_explorer import TDAError
from tda_explorer.flags import FlagStore
from tda_explorer.session import Session


def test_flags_persist_across_store_instances_with_history(tmp_path):
    store = FlagStore(tmp_path / "f.sqlite")
    store.flag(3)
    store.flag("abc", note="looks like a 7")
    store.relabel(3, 7)
    store.unflag("abc")
    store.close()
    again = FlagStore(tmp_path / "f.sqlite")
    assert again.flagged_ids() == [3]
    assert again.relabels() == {3: 7}
    df = again.to_dataframe().set_index("train_id")
    assert bool(df.loc[3, "flag"]) and df.loc[3, "relabel"] == 7
    assert not bool(df.loc["abc", "flag"]) and df.loc["abc", "note"] == "looks like a 7"
    history = again.history()
    assert history.action.tolist() == ["flag", "flag", "relabel", "unflag"]
    assert '"flagged": true' in history.previous.iloc[3]
    with sqlite3.connect(tmp_path / "f.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_bad_flag_arguments(tmp_path):
    store = FlagStore(tmp_path / "f.sqlite")
    with pytest.raises(TDAError, match="train_id must be an int or str"):
        store.flag(1.5)
    with pytest.raises(TDAError, match="label must be a non-negative int"):
        store.relabel(1, -2)
    assert store.flagged_ids() == []


def test_session_tables_and_cache(digits_experiment, tmp_path):
    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    attribution = session.compute("tracin")
    assert len(list((tmp_path / "attributions").glob("tracin-*.pt"))) == 1
    ranking = session.ranking(5, "tracin", k=3)
    assert list(ranking.columns) == ["test_id", "train_id", "rank", "score", "method", "label", "predicted", "flag",
                                     "training_loss"]
    assert ranking.train_id.tolist()[:3] == attribution.topk(5, 3)[0]
    session.flags.flag(ranking.train_id.iloc[0])
    mis = session.mislabel_ranking("tracin")
    assert mis.score.is_monotonic_decreasing
    assert (mis.suggested != mis.label).all()
    assert mis.set_index("train_id").loc[ranking.train_id.iloc[0], "flag"]
    # a new session over the same folder reloads the attribution from the cache and the flags from disk
    reloaded = Session.from_experiment(digits_experiment, folder=tmp_path)
    again = reloaded.compute("tracin")
    assert (again.scores == attribution.scores).all()
    assert reloaded.flags.flagged_ids() == [ranking.train_id.iloc[0]]
    with pytest.raises(TDAError, match="test_id: \\[9999\\] not in dataset"):
        session.ranking(9999, "tracin")
    with pytest.raises(TDAError, match="has not been computed"):
        session.ranking(5, "grad-cos")


@pytest.mark.slow  # trains models
def test_experiment_sessions_supply_trajectories_and_recordings(digits_experiment, tmp_path):
    from tda_explorer.session import Session

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    synset = session.compute("synset-loo", per_class=3, distill_steps=30)
    dvemb = session.compute("dvemb")
    assert synset.scores.shape == dvemb.scores.shape == (len(session.test), len(session.train))
    assert set(session.self_influences) == {"synset-loo", "dvemb"}
    again = Session.from_experiment(digits_experiment, folder=tmp_path).compute("synset-loo", per_class=3,
                                                                                distill_steps=30)
    assert torch.equal(again.scores, synset.scores)  # read back from the session's cache
