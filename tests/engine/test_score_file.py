"""Score matrices on disk: rankings from the stored top-k equal the in-memory ones; sessions past DENSE_LIMIT."""

import numpy as np
import pandas as pd
import pytest
import torch

import tda_explorer.session as session_module
from tda_explorer.compute import Attribution, AttributionTask
from tda_explorer.compute.engine.score_file import ScoreFile, ScoreFileWriter
from tda_explorer.data import AttributionDataset
from tda_explorer.session import Session


def _matrix(n_test=37, n_train=53, seed=0):
    scores = torch.randn(n_test, n_train, generator=torch.Generator().manual_seed(seed))
    scores[3, :10] = 0.0  # exact zeros and ties are ranked like the in-memory path
    scores[4] = scores[4].abs()  # a row without opponents
    scores[5, 7] = scores[5, 9]
    return scores


def _write(path, scores, block=8, top_k=20):
    writer = ScoreFileWriter(path, tuple(scores.shape), top_k=top_k)
    for start in range(0, len(scores), block):
        writer.write(scores[start:start + block])
    return writer.close()


def test_rows_and_rankings_from_disk_equal_the_matrix_in_memory(tmp_path):
    scores = _matrix()
    test_ids, train_ids = [f"t{i}" for i in range(37)], list(range(100, 153))
    on_disk = Attribution(_write(tmp_path / "s.npy", scores), test_ids, train_ids, "m")
    dense = Attribution(scores, test_ids, train_ids, "m")
    assert torch.equal(on_disk.row("t11"), scores[11]) and torch.equal(on_disk.matrix(), scores)
    assert torch.equal(on_disk.column(6), scores[:, 6])
    assert np.array_equal(np.load(tmp_path / "s.npy", mmap_mode="r"), scores.numpy())  # a plain .npy
    for t in ("t0", "t3", "t4", "t5", "t36"):
        for kind in ("proponents", "opponents"):
            for signed in (False, True):
                for k in (1, 7, 20, 40):  # 40 > top_k: ranked from the row
                    got, want = on_disk.topk(t, k, kind, signed), dense.topk(t, k, kind, signed)
                    assert got[0] == want[0] and torch.equal(got[1], want[1]), (t, kind, signed, k)
    for k in (5, 20, 30, None):
        pd.testing.assert_frame_equal(on_disk.to_dataframe(k), dense.to_dataframe(k))
    for j in (0, 6, 52):
        for k in (3, 20, 37):
            got, want = on_disk.influenced(j, k), dense.influenced(j, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_an_unfinished_or_damaged_file_is_never_read_as_finished(tmp_path):
    scores = _matrix()
    writer = ScoreFileWriter(tmp_path / "s.npy", tuple(scores.shape))
    writer.write(scores[:10])
    assert ScoreFile.open(tmp_path / "s.npy") is None  # nothing under the final name while writing
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    short = ScoreFileWriter(tmp_path / "s.npy", tuple(scores.shape))
    short.write(scores[:10])
    with pytest.raises(Exception, match="got 10 of 37 rows"):
        short.close()
    _write(tmp_path / "s.npy", scores)
    with open(tmp_path / "s.npy", "r+b") as f:
        f.truncate(1000)
    assert ScoreFile.open(tmp_path / "s.npy") is None
    _write(tmp_path / "s.npy", scores)
    (tmp_path / "s.topk.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="damaged"):
        assert ScoreFile.open(tmp_path / "s.npy") is None


def test_a_session_past_the_dense_limit_keeps_scores_on_disk_and_reopens_from_its_cache(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 6, generator=gen), torch.randint(0, 3, (90,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    train, test = AttributionDataset(x[:60], y[:60]), AttributionDataset(x[60:], y[60:])
    dense = Session(train, test, AttributionTask(model), folder=tmp_path / "dense")
    want = dense.compute("grad-dot")
    monkeypatch.setattr(session_module, "DENSE_LIMIT", 100)
    monkeypatch.setattr(session_module, "BLOCK_SCORES", 7 * 60)  # blocks of 7 test rows
    large = Session(train, test, AttributionTask(model), folder=tmp_path / "large")
    got = large.compute("grad-dot")
    assert isinstance(got.scores, ScoreFile)
    torch.testing.assert_close(got.matrix(), want.scores)
    assert large.ranking(test.ids[4], "grad-dot", k=5)["train_id"].tolist() == \
        dense.ranking(test.ids[4], "grad-dot", k=5)["train_id"].tolist()
    assert large.influenced_tests(train.ids[2], "grad-dot", k=4)["test_id"].tolist() == \
        dense.influenced_tests(train.ids[2], "grad-dot", k=4)["test_id"].tolist()
    torch.testing.assert_close(large.self_influences["grad-dot"], dense.self_influences["grad-dot"])

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed what the folder holds")

    monkeypatch.setattr(session_module, "predict", refuse)
    monkeypatch.setattr(session_module, "get_method", refuse)
    again = Session(train, test, AttributionTask(model), folder=tmp_path / "large")  # predictions from the cache
    assert torch.equal(again.train_predicted, large.train_predicted)
    assert torch.equal(again.compute("grad-dot").row(test.ids[0]), got.row(test.ids[0]))
