"""Crash-safety check of the flag store: SIGKILL a writer at random points, then audit both copies.

A child process writes ``writes`` operations (flag a new id, then relabel it) and prints each one's
id only after the call returned — the moment a user would believe it saved. The parent kills the
child with SIGKILL after a random number of acknowledgements plus a random delay (so the kill lands
inside a later transaction), then checks that every acknowledged write is in the database, that
``PRAGMA integrity_check`` passes, and that the journal (the second copy) holds every one too.

With ``damage=True`` each trial then damages one file before the audit, in turn: the database truncated
at a random byte, random pages of it overwritten with garbage, its ``-wal`` deleted, random bytes of the
journal overwritten, the journal truncated at a random byte (a torn line). For the first two, three in four
trials checkpoint the WAL into the database first, so the damage lands on committed data. The store is
then reopened (which must notice, set the damaged file aside and rebuild it from the other copy), and
both copies are audited again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

_CHILD = """
import sys
from tda_explorer.flags import FlagStore
store = FlagStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    if i % 2 == 0:
        store.flag(i // 2, note="stress")
    else:
        store.relabel(i // 2, (i // 2) % 10)
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
"""

DAMAGE_KINDS = ("truncate", "garbage-pages", "delete-wal", "journal-garbage", "journal-truncate")
_PAGE = 4096


def _missing(rows: dict, acknowledged: int) -> set[int]:
    """The acknowledged writes (by number) missing from ``rows`` (train_id -> (flagged, relabel))."""
    missing = set()
    for i in range(acknowledged):
        flagged, relabel = rows.get(i // 2, (0, None))
        if (i % 2 == 0 and flagged != 1) or (i % 2 == 1 and relabel != (i // 2) % 10):
            missing.add(i)
    return missing


def _db_rows(db: Path) -> tuple[dict, bool]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {json.loads(k): (f, r) for k, f, r in conn.execute("SELECT train_id, flagged, relabel FROM flags")}
    finally:
        conn.close()
    return rows, ok


def _journal_rows(db: Path) -> dict:
    """The flags the journal of ``db`` holds, read on its own (as a rebuild would read it)."""
    from tda_explorer.flags import _parse, journal_path

    path = journal_path(db)
    entries = {}
    if path.exists():
        for line in path.read_bytes().split(b"\n"):
            entry = _parse(line)
            if entry is not None:
                entries[entry[0]] = entry
    rows = {}
    for hid in sorted(entries):
        value = json.loads(entries[hid][4])
        rows[json.loads(entries[hid][1])] = (int(value["flagged"]), value["relabel"])
    return rows


def _audit(db: Path, acknowledged: int) -> tuple[int, bool]:
    """(lost acknowledged writes, integrity ok) for a database after a crash."""
    rows, ok = _db_rows(db)
    return len(_missing(rows, acknowledged)), ok


def _damage(db: Path, kind: str, rng: random.Random) -> str:
    """Damage one file of the store at ``db``; returns what was done."""
    from tda_explorer.flags import journal_path

    if kind in ("truncate", "garbage-pages") and rng.random() < 0.75:
        conn = sqlite3.connect(db)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # committed pages move from the WAL into the database
        finally:
            conn.close()
        checkpointed = " (after a checkpoint)"
    else:
        checkpointed = ""
    if kind == "truncate":
        size = db.stat().st_size
        cut = rng.randrange(size)
        os.truncate(db, cut)
        return f"database truncated from {size} to {cut} bytes{checkpointed}"
    if kind == "garbage-pages":
        pages = max(1, db.stat().st_size // _PAGE)
        chosen = sorted(rng.sample(range(pages), min(pages, rng.randint(1, 3))))
        with open(db, "r+b") as f:
            for page in chosen:
                f.seek(page * _PAGE)
                f.write(rng.randbytes(_PAGE))
        return f"database pages {[p + 1 for p in chosen]} of {pages} overwritten with garbage{checkpointed}"
    if kind == "delete-wal":
        wal = db.with_name(db.name + "-wal")
        size = wal.stat().st_size if wal.exists() else 0
        wal.unlink(missing_ok=True)
        return f"{wal.name} deleted ({size} bytes)"
    journal = journal_path(db)
    size = journal.stat().st_size
    if kind == "journal-garbage":
        start, length = rng.randrange(size), rng.randint(1, 200)
        with open(journal, "r+b") as f:
            f.seek(start)
            f.write(rng.randbytes(min(length, size - start)))
        return f"journal bytes {start}..{min(start + length, size)} of {size} overwritten with garbage"
    if kind == "journal-truncate":
        cut = rng.randrange(size)
        os.truncate(journal, cut)
        return f"journal truncated from {size} to {cut} bytes"
    raise ValueError(f"unknown damage kind {kind!r}")


def _reopen(db: Path) -> dict:
    """Open the damaged store as a session would; what it reported and whether the damaged files were kept."""
    from tda_explorer.flags import FlagStore

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = FlagStore(db)
    recovery = store.recovery_
    store.close()
    return {"recovered": recovery is not None, "warned": bool(caught),
            "kept_aside": [] if recovery is None else recovery["kept_aside"],
            "kept_aside_missing": 0 if recovery is None else sum(not Path(p).exists()
                                                                  for p in recovery["kept_aside"]),
            "message": None if recovery is None else recovery["message"]}


def stress_flags(trials: int = 100, writes: int = 1000, seed: int = 0, folder: str | None = None,
                 damage: bool = False) -> dict:
    """Run ``trials`` kill-and-audit rounds (``damage``: each also damages one file, then reopens the store).

    Returns ``trials``, ``acknowledged`` (writes the writer saw return, all trials), ``lost`` (acknowledged
    writes missing from the database or from the journal, after the crash or, with ``damage``, after the
    reopening that recovers from the damage), ``database_lost`` and ``journal_lost`` (each copy alone),
    ``recovered`` (trials where the store reported and repaired damage), ``integrity_failures``,
    ``kept_aside_missing`` (damaged files reported kept but not found), ``per_trial`` and, with ``damage``,
    ``by_damage`` per kind.
    """
    rng = random.Random(seed)
    root = Path(folder or tempfile.mkdtemp(prefix="tda-stress-"))
    t0 = time.perf_counter()
    per_trial = []
    for trial in range(trials):
        db = root / f"trial{trial}" / "flags.sqlite"
        db.parent.mkdir(parents=True, exist_ok=True)
        kill_after = rng.randint(1, writes)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(writes)], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        acknowledged = 0
        for line in child.stdout:
            acknowledged = int(line) + 1
            if acknowledged >= kill_after:
                time.sleep(rng.uniform(0, 0.004))  # land inside the next transaction, somewhere
                break
        child.send_signal(signal.SIGKILL)
        child.wait()
        for line in child.stdout:  # acknowledgements already in the pipe count too
            acknowledged = int(line) + 1
        result = {"trial": trial, "acknowledged": acknowledged}
        try:
            if damage:
                kind = DAMAGE_KINDS[trial % len(DAMAGE_KINDS)]
                result.update(damage=kind, what=_damage(db, kind, rng), **_reopen(db))
            rows, ok = _db_rows(db)
            db_missing, journal_missing = _missing(rows, acknowledged), _missing(_journal_rows(db), acknowledged)
        except Exception as err:  # a store that cannot open (or be read) has lost everything it held
            result["error"] = f"{type(err).__name__}: {err}"
            ok, db_missing, journal_missing = False, set(range(acknowledged)), set(range(acknowledged))
        # lost: missing from either copy, so a change that depends on one file again counts as lost
        result.update(lost=len(db_missing | journal_missing), database_lost=len(db_missing),
                      journal_lost=len(journal_missing), integrity_ok=ok)
        per_trial.append(result)
    out = {"trials": trials, "writes_per_trial": writes, "damage": damage,
           "acknowledged": sum(r["acknowledged"] for r in per_trial),
           "lost": sum(r["lost"] for r in per_trial),
           "database_lost": sum(r["database_lost"] for r in per_trial),
           "journal_lost": sum(r["journal_lost"] for r in per_trial),
           "recovered": sum(r.get("recovered", False) for r in per_trial),
           "integrity_failures": sum(not r["integrity_ok"] for r in per_trial),
           "kept_aside_missing": sum(r.get("kept_aside_missing", 0) for r in per_trial)}
    out["acknowledged_writes"] = out["acknowledged"]  # the name earlier reports used
    if damage:
        out["by_damage"] = {kind: {key: sum(r.get(key, 0) for r in per_trial if r["damage"] == kind)
                                   for key in ("acknowledged", "lost", "recovered")}
                            | {"trials": sum(r["damage"] == kind for r in per_trial)}
                            for kind in DAMAGE_KINDS}
    out["per_trial"] = per_trial
    out["seconds"] = time.perf_counter() - t0
    return out
