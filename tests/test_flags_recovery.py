"""The flag store keeps every change in two places and rebuilds a damaged one from the other (issue #25)."""

import random
import shutil
import sqlite3
import subprocess
import sys
import warnings

import numpy as np
import pytest

from tda_explorer import TDAError
from tda_explorer.flags import FlagStore, FlagStoreRecoveryWarning, _parse, journal_path

N = 120  # ids flagged (with a note) and relabelled: several database pages, no WAL checkpoint before a crash
_WRITER = """
import os, sys
from tda_explorer.flags import FlagStore
store = FlagStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    store.flag(i, note=f"looks like a {i % 10}")
    store.relabel(f"s{i}", i % 7)
store.unflag(0)
if sys.argv[3] == "crash":
    os._exit(0)  # no clean close: the WAL keeps the commits, as after a killed kernel
store.close()
"""
EXPECTED_FLAGGED = list(range(1, N))
EXPECTED_RELABELS = {f"s{i}": i % 7 for i in range(N)}
EXPECTED_ACTIONS = ["flag", "relabel"] * N + ["unflag"]


def _written(folder, how):
    db = folder / "flags.sqlite"
    folder.mkdir()
    subprocess.run([sys.executable, "-c", _WRITER, str(db), str(N), how], check=True)
    return db


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store closed cleanly (everything in the database file) and one whose writer crashed (in the WAL)."""
    root = tmp_path_factory.mktemp("stores")
    return {"closed": _written(root / "closed", "close"), "crashed": _written(root / "crashed", "crash")}


def _copy(stores, kind, tmp_path):
    shutil.copytree(stores[kind].parent, tmp_path / "s")
    return tmp_path / "s" / "flags.sqlite"


def _assert_everything_is_back(store):
    assert sorted(store.flagged_ids()) == EXPECTED_FLAGGED
    assert store.relabels() == EXPECTED_RELABELS
    assert store.history().action.tolist() == EXPECTED_ACTIONS
    df = store.to_dataframe().set_index("train_id")
    assert df.loc[7, "note"] == "looks like a 7" and not df.loc[0, "flag"]


def _integrity(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def _reopen_damaged(db, match):
    with pytest.warns(FlagStoreRecoveryWarning, match=match) as caught:
        store = FlagStore(db)
    assert store.recovery_["message"] == str(caught[0].message)
    assert store.recovery_["complete"] and "No acknowledged change was lost" in store.recovery_["message"]
    return store


def test_both_copies_intact_reopen_silently_with_everything(stores, tmp_path):
    db = _copy(stores, "crashed", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any recovery warning fails the test
        store = FlagStore(db)
    assert store.recovery_ is None
    _assert_everything_is_back(store)
    assert not list(db.parent.glob("*.damaged-*"))
    lines = journal_path(db).read_bytes().splitlines()
    assert len(lines) == 2 * N + 1 and all(_parse(line) is not None for line in lines)


def test_truncated_database_is_rebuilt_from_the_journal_and_kept_aside(stores, tmp_path):
    db = _copy(stores, "closed", tmp_path)
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    damaged = db.read_bytes()
    store = _reopen_damaged(db, r"flags\.sqlite \(database disk image is malformed\).*Rebuilt flags\.sqlite from "
                                r"the journal: 119 flags, 120 relabels, 241 changes")
    _assert_everything_is_back(store)
    assert store.recovery_["damaged"] == {str(db): "database disk image is malformed"}
    kept = [p for p in store.recovery_["kept_aside"] if p.endswith(tuple("0123456789"))]
    assert len(kept) == 1 and open(kept[0], "rb").read() == damaged
    assert _integrity(db) == "ok"
    # a change after the recovery is in both copies again: damage the new database, and it comes back
    store.flag("s3", note="after")
    store.close()
    with open(db, "r+b") as f:
        f.truncate(4096)
    again = _reopen_damaged(db, "flags.sqlite")
    assert "s3" in again.flagged_ids() and len(again.history()) == 2 * N + 2
    assert len(list(db.parent.glob("flags.sqlite.damaged-*"))) >= 2  # both damaged files are kept
    again.close()


def test_garbage_page_in_the_database_is_rebuilt_from_the_journal(stores, tmp_path):
    db = _copy(stores, "closed", tmp_path)
    pages = db.stat().st_size // 4096
    assert pages > 4
    with open(db, "r+b") as f:
        f.seek(pages // 2 * 4096)
        f.write(random.Random(0).randbytes(4096))
    damaged = db.read_bytes()
    store = _reopen_damaged(db, r"flags\.sqlite \(.*\).*Rebuilt flags\.sqlite from the journal")
    _assert_everything_is_back(store)
    kept = store.recovery_["kept_aside"][0]
    assert kept.startswith(str(db) + ".damaged-") and open(kept, "rb").read() == damaged
    assert _integrity(db) == "ok"
    store.close()


def test_deleted_wal_loses_nothing(stores, tmp_path):
    db = _copy(stores, "crashed", tmp_path)
    wal = db.with_name("flags.sqlite-wal")
    assert wal.stat().st_size > 0
    wal.unlink()  # every commit since the writer opened the store was only in the WAL
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:  # the database alone has nothing left
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'history'").fetchone()[0] == 0
    stale = db.read_bytes()
    store = _reopen_damaged(db, r"it lacks 241 changes that the journal has \(was flags\.sqlite-wal lost\?\)")
    _assert_everything_is_back(store)
    assert open(store.recovery_["kept_aside"][0], "rb").read() == stale
    store.close()


def test_damaged_journal_is_rewritten_from_the_database(stores, tmp_path):
    db = _copy(stores, "closed", tmp_path)
    journal = journal_path(db)
    data = bytearray(journal.read_bytes())
    start = data.index(b"\n", len(data) // 3) + 1  # garbage inside one line, never across a line break: the
    width = min(40, data.index(b"\n", start) - start)  # journal's lines vary in length from run to run
    data[start:start + width] = (b"\x00garbage" * 5)[:width]
    damaged = bytes(data[:-10])  # and a torn last line
    journal.write_bytes(damaged)
    store = _reopen_damaged(db, r"flags\.journal\.jsonl \(its last line is torn \(no end of line\); 1 of its 240 "
                                r"lines are unreadable or fail their checksum\)\. Rebuilt flags\.journal\.jsonl "
                                r"from the database")
    _assert_everything_is_back(store)
    assert store.recovery_["kept_aside"] == [str(journal) + store.recovery_["kept_aside"][0][len(str(journal)):]]
    assert open(store.recovery_["kept_aside"][0], "rb").read() == damaged
    store.close()
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 2 * N + 1 and all(_parse(line) is not None for line in lines)
    db.unlink()  # the rewritten journal alone brings everything back
    alone = _reopen_damaged(db, r"flags\.sqlite \(the file is missing\)")
    _assert_everything_is_back(alone)
    alone.close()


def test_deleted_journal_is_rewritten_and_an_old_store_gets_one_silently(stores, tmp_path):
    db = _copy(stores, "closed", tmp_path)
    journal_path(db).unlink()
    store = _reopen_damaged(db, r"flags\.journal\.jsonl \(the file is missing\)")
    store.close()
    assert len(journal_path(db).read_bytes().splitlines()) == 2 * N + 1
    # a store written before the journal existed (no meta table, no journal) gains one without a warning
    journal_path(db).unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = FlagStore(db)
    assert old.recovery_ is None and len(journal_path(db).read_bytes().splitlines()) == 2 * N + 1
    old.close()


def test_a_damaged_store_with_no_readable_copy_is_refused_and_left_as_it_is(stores, tmp_path):
    db = _copy(stores, "closed", tmp_path)
    journal_path(db).unlink()
    db.write_bytes(random.Random(1).randbytes(db.stat().st_size))
    before = sorted(p.name for p in db.parent.iterdir())
    with pytest.raises(TDAError, match=r"path: the flag store .*flags\.sqlite is damaged \(file is not a database\) "
                                       r"and nothing could be read from it or from its journal"):
        FlagStore(db)
    assert sorted(p.name for p in db.parent.iterdir()) == before  # nothing moved, nothing started over it


def test_flag_unflag_relabel_refuse_ids_the_store_does_not_know(tmp_path):
    store = FlagStore(tmp_path / "f.sqlite", known_ids=[0, 1, "a", 3, 4, 5, 6])
    message = (r"train_id: 'nonexistent' is not a training id of this session \(7 examples, "
               r"ids like \[0, 1, 'a', 3, 4\]\)")
    with pytest.raises(TDAError, match=message):
        store.flag("nonexistent")
    with pytest.raises(TDAError, match=r"train_id: 9 is not a training id"):
        store.unflag(9)
    with pytest.raises(TDAError, match=r"train_id: '1' is not a training id"):
        store.relabel("1", 2)  # the string "1" is not the id 1
    assert store.flagged_ids() == [] and store.relabels() == {} and store.history().empty
    store.flag(np.int64(1))  # a numpy id from a DataFrame is the same id
    store.relabel("a", np.int64(2))
    assert store.flagged_ids() == [1] and store.relabels() == {"a": 2}
    store.close()


def test_note_must_be_text(tmp_path):
    store = FlagStore(tmp_path / "f.sqlite")
    with pytest.raises(TDAError, match="note must be a str or None, got int"):
        store.flag(1, note=3)
    assert store.flagged_ids() == []
    store.close()


def test_session_flag_store_knows_the_training_ids(digits_experiment, tmp_path):
    from tda_explorer.session import Session

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    with pytest.raises(TDAError, match=r"train_id: 'nonexistent' is not a training id of this session \(300 "
                                       r"examples, ids like \[0, 1, 2, 3, 4\]\)"):
        session.flags.flag("nonexistent")
    with pytest.raises(TDAError, match="train_id: 300 is not a training id"):
        session.flags.unflag(300)
    session.flags.flag(session.train.ids[5])
    assert session.flags.flagged_ids() == [5]
