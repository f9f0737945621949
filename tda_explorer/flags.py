"""The flag store: flags and relabels saved immediately to SQLite, with time and previous value.

Every write is one transaction in WAL mode, so a flag the call returned from survives a kernel
restart or a crash; the ``history`` table keeps every change with what it replaced.
"""

from __future__ import annotations

import json
import numbers
import sqlite3
import time
from pathlib import Path
from typing import Any

from tda_explorer.errors import TDAError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flags (
    train_id   TEXT PRIMARY KEY,
    flagged    INTEGER NOT NULL DEFAULT 0,
    relabel    INTEGER,
    note       TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    train_id TEXT NOT NULL,
    action   TEXT NOT NULL,
    previous TEXT,
    value    TEXT,
    at       REAL NOT NULL
);
"""


class FlagStore:
    """Flags (suspected mislabels) and relabels of training examples, persisted in SQLite.

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder if missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    @staticmethod
    def _key(train_id: Any) -> str:
        if isinstance(train_id, numbers.Integral) and not isinstance(train_id, bool):
            train_id = int(train_id)  # numpy ints read back from a DataFrame
        if not isinstance(train_id, (int, str)) or isinstance(train_id, bool):
            raise TDAError(f"train_id must be an int or str, got {type(train_id).__name__} ({train_id!r})")
        return json.dumps(train_id)

    def _write(self, train_id: Any, action: str, flagged: bool | None = None,
               relabel: int | None | str = "keep", note: str | None = None) -> None:
        key, now = self._key(train_id), time.time()
        with self._conn:  # BEGIN ... COMMIT, rolled back on error
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute(
                "SELECT flagged, relabel, note FROM flags WHERE train_id = ?", (key,)
            ).fetchone()
            prev = {"flagged": bool(row[0]), "relabel": row[1], "note": row[2]} if row else None
            new = dict(prev or {"flagged": False, "relabel": None, "note": ""})
            if flagged is not None:
                new["flagged"] = flagged
            if relabel != "keep":
                new["relabel"] = relabel
            if note is not None:
                new["note"] = note
            self._conn.execute(
                "INSERT INTO flags (train_id, flagged, relabel, note, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(train_id) DO UPDATE SET flagged=excluded.flagged, relabel=excluded.relabel, "
                "note=excluded.note, updated_at=excluded.updated_at",
                (key, int(new["flagged"]), new["relabel"], new["note"], now),
            )
            self._conn.execute(
                "INSERT INTO history (train_id, action, previous, value, at) VALUES (?, ?, ?, ?, ?)",
                (key, action, json.dumps(prev), json.dumps(new), now),
            )

    def flag(self, train_id: Any, note: str | None = None) -> None:
        """Mark ``train_id`` as suspected mislabeled."""
        self._write(train_id, "flag", flagged=True, note=note)

    def unflag(self, train_id: Any) -> None:
        """Remove the flag of ``train_id`` (a relabel is kept)."""
        self._write(train_id, "unflag", flagged=False)

    def relabel(self, train_id: Any, label: int | None) -> None:
        """Record a corrected label for ``train_id`` (None clears it)."""
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise TDAError(f"label must be a non-negative int or None, got {label!r}")
        self._write(train_id, "relabel", relabel=label)

    def is_flagged(self, train_id: Any) -> bool:
        row = self._conn.execute("SELECT flagged FROM flags WHERE train_id = ?", (self._key(train_id),)).fetchone()
        return bool(row and row[0])

    def flagged_ids(self) -> list:
        rows = self._conn.execute("SELECT train_id FROM flags WHERE flagged = 1 ORDER BY updated_at").fetchall()
        return [json.loads(r[0]) for r in rows]

    def relabels(self) -> dict:
        rows = self._conn.execute("SELECT train_id, relabel FROM flags WHERE relabel IS NOT NULL").fetchall()
        return {json.loads(k): v for k, v in rows}

    def to_dataframe(self):
        """One row per touched training example: ``train_id, flag, relabel, note, updated_at``."""
        import pandas as pd

        rows = self._conn.execute("SELECT train_id, flagged, relabel, note, updated_at FROM flags").fetchall()
        df = pd.DataFrame(rows, columns=["train_id", "flag", "relabel", "note", "updated_at"])
        df["train_id"] = [json.loads(k) for k in df["train_id"]]
        df["flag"] = df["flag"].astype(bool)
        df["relabel"] = df["relabel"].astype("Int64")
        df["updated_at"] = pd.to_datetime(df["updated_at"], unit="s")
        return df

    def history(self):
        """Every change with its previous value, oldest first (a DataFrame)."""
        import pandas as pd

        rows = self._conn.execute("SELECT train_id, action, previous, value, at FROM history ORDER BY id").fetchall()
        df = pd.DataFrame(rows, columns=["train_id", "action", "previous", "value", "at"])
        df["train_id"] = [json.loads(k) for k in df["train_id"]]
        df["at"] = pd.to_datetime(df["at"], unit="s")
        return df

    def close(self) -> None:
        self._conn.close()
