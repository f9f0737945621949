"""The flag store: flags and relabels of training examples, each change kept in two independent places.

A change is one SQLite transaction (WAL, ``synchronous=FULL``) that also writes a ``history`` row with
what it replaced; then the same row is appended to a journal beside the database (``flags.journal.jsonl``
for ``flags.sqlite``: JSON lines, each with a CRC-32, fsynced) before the call returns. So a change the
call returned from survives a crash and survives damage to either file. On opening, the store checks
both (``PRAGMA quick_check``, every journal line's checksum, and that each holds every change of the
other); a damaged or incomplete file is moved aside (``<name>.damaged-<time>``, never deleted) and
rebuilt from the other copy, with a warning and ``store.recovery_`` saying what was recovered. It never
starts an empty store over a damaged one: when neither copy can be read it raises and leaves the files.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import sqlite3
import threading
import time
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_HISTORY = "SELECT id, train_id, action, previous, value, at FROM history"
_FLAGS = "SELECT train_id, flagged, relabel, note, updated_at FROM flags"
# SQLite errors that mean the file itself is bad (anything else, e.g. a lock held elsewhere, is raised)
_DAMAGE_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR")


class FlagStoreRecoveryWarning(UserWarning):
    """A flag store file was damaged or incomplete and has been rebuilt from its other copy."""


def journal_path(path: str | Path) -> Path:
    """The journal beside the database ``path`` (``flags.sqlite`` -> ``flags.journal.jsonl``)."""
    return Path(path).with_suffix(".journal.jsonl")


def _line(entry: tuple) -> bytes:
    crc = zlib.crc32(json.dumps(list(entry), separators=(",", ":")).encode())
    return json.dumps({"crc32": crc, "entry": list(entry)}, separators=(",", ":")).encode() + b"\n"


def _valid(entry: Any) -> bool:
    """Whether ``entry`` is a whole history row ``(id, train_id, action, previous, value, at)``."""
    try:
        hid, key, action, previous, value, at = entry
        new = json.loads(value)
        json.loads(key)
        return (isinstance(hid, int) and isinstance(action, str) and isinstance(at, (int, float))
                and isinstance(previous, (str, type(None))) and set(new) == {"flagged", "relabel", "note"})
    except (ValueError, TypeError):
        return False


def _parse(line: bytes) -> tuple | None:
    """The history row of one journal line, or None for a line that is not one (garbage, torn, bad checksum)."""
    try:
        record = json.loads(line)
        entry = record["entry"]
        if zlib.crc32(json.dumps(entry, separators=(",", ":")).encode()) != record["crc32"] or not _valid(entry):
            return None
        return (*entry[:5], float(entry[5]))
    except (ValueError, TypeError, KeyError):
        return None


def _replay(entries: dict[int, tuple]) -> dict[str, tuple]:
    """The flags table the history implies: train_id key -> (flagged, relabel, note, updated_at)."""
    state = {}
    for hid in sorted(entries):
        _, key, _, _, value, at = entries[hid]
        new = json.loads(value)
        state[key] = (int(bool(new["flagged"])), new["relabel"], new["note"], at)
    return state


def _is_damage(err: sqlite3.Error) -> bool:
    return (getattr(err, "sqlite_errorname", "") or "").startswith(_DAMAGE_CODES) or isinstance(
        err, sqlite3.DatabaseError) and "malformed" in str(err)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not possible on every platform
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _aside_name(path: Path, stamp: str) -> Path:
    return path.with_name(f"{path.name}.damaged-{stamp}")


class FlagStore:
    """Flags (suspected mislabels) and relabels of training examples, persisted in SQLite and a journal.

    Parameters
    ----------
    path : str or Path
        The database file (created with its folder if missing); the journal is ``journal_path(path)``.
    known_ids : iterable, optional
        The valid training ids (a session passes its training set's). When given, ``flag``, ``unflag``
        and ``relabel`` of any other id raise ``TDAError``.

    Attributes
    ----------
    recovery_ : dict or None
        None when both files were intact on opening. Otherwise what was done: ``message`` (also issued as a
        ``FlagStoreRecoveryWarning``), ``damaged`` (file -> what was wrong), ``kept_aside`` (where each damaged
        file was moved), ``rebuilt`` (the files written anew), ``changes``, ``flags`` and ``relabels`` (what
        the store holds now) and ``complete`` (False only when both copies were damaged, so changes may be lost).
    """

    def __init__(self, path: str | Path, known_ids: Iterable[Any] | None = None):
        self.path = Path(path)
        self.journal_path = journal_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._known_ids = None if known_ids is None else list(known_ids)
        self._known_keys: set | None = None
        self._lock = threading.RLock()
        # serialises writers of one store across processes (two kernels on one session folder), on POSIX and Windows
        self._file_lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self._conn: sqlite3.Connection | None = None
        self._journal_fd: int | None = None
        self.recovery_: dict | None = None
        try:
            with self._locked():
                self._recover()
                self._connect()
                self._open_journal()
        except BaseException:
            self.close()
            raise

    # --- opening: check both copies, rebuild a damaged one -------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        with self._lock, self._file_lock:
            yield

    def _read_journal(self) -> tuple[dict[int, tuple] | None, str | None]:
        """(history rows by id, what is wrong or None); (None, None) when there is no journal."""
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return None, None
        *lines, tail = data.split(b"\n")
        entries: dict[int, tuple] = {}
        bad, clash = 0, 0
        for n, line in enumerate(lines + ([tail] if tail else [])):  # a torn last line counts if it is whole
            entry = _parse(line)
            if entry is None:
                bad += n < len(lines)
                continue
            clash += entry[0] in entries and entries[entry[0]] != entry
            entries[entry[0]] = entry
        problems = ["its last line is torn (no end of line)"] if tail else []
        if bad:
            problems.append(f"{bad} of its {len(lines)} lines are unreadable or fail their checksum")
        if clash:
            problems.append(f"{clash} changes appear twice with different contents")
        return entries, "; ".join(problems) or None

    def _read_db(self) -> tuple[dict[int, tuple] | None, dict[str, tuple], dict[str, str], str | None]:
        """(history rows by id, flags rows, meta, what is wrong or None); history None when there is no file.

        Reads through a read-only connection, so a damaged file (and its WAL) is left exactly as found; a
        damaged file gives what can still be read (scanning each table from both ends).
        """
        if not self.path.exists():
            return None, {}, {}, None
        history: dict[int, tuple] = {}
        flags: dict[str, tuple] = {}
        meta: dict[str, str] = {}
        problem = None
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as err:
            raise TDAError(f"path: the flag store {self.path} cannot be opened ({err})") from err
        try:
            try:
                check = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if check != ["ok"]:
                    problem = "; ".join(check[:3])
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.Error as err:
                if not _is_damage(err):
                    raise TDAError(f"path: the flag store {self.path} cannot be read ({err})") from err
                problem, tables = str(err), {"history", "flags", "meta"}
            if "history" in tables:
                problem = self._scan(conn, _HISTORY, "id", history, lambda r: (r[0], tuple(r))) or problem
            if "flags" in tables:
                problem = self._scan(conn, _FLAGS, "train_id", flags, lambda r: (r[0], tuple(r[1:]))) or problem
            if "meta" in tables:
                problem = self._scan(conn, "SELECT key, value FROM meta", "key", meta, tuple) or problem
        finally:
            conn.close()
        unreadable = [i for i, row in history.items() if not _valid(row)]
        for i in unreadable:
            del history[i]
        if unreadable:
            problem = problem or f"{len(unreadable)} history rows are unreadable"
        return history, flags, meta, problem

    @staticmethod
    def _scan(conn: sqlite3.Connection, select: str, order: str, into: dict, item) -> str | None:
        """Read rows into ``into``; past a damaged page, read on from the other end. Returns the error, if any."""
        error = None
        for direction in ("ASC", "DESC"):
            try:
                for row in conn.execute(f"{select} ORDER BY {order} {direction}"):
                    key, value = item(row)
                    into[key] = value
                return error
            except sqlite3.Error as err:
                if not _is_damage(err):
                    raise TDAError(f"path: the flag store cannot be read ({err})") from err
                error = str(err)
        return error

    def _recover(self) -> None:
        journal, journal_problem = self._read_journal()
        history, db_flags, meta, db_problem = self._read_db()
        merged = dict(journal or {})
        db_damaged = db_problem is not None
        damaged: dict[str, str] = {}
        if history is not None:
            conflicts = [i for i in history if i in merged and history[i] != merged[i]]
            behind = [i for i in merged if i not in history]
            ahead = [i for i in history if i not in merged]
            for i in ahead:
                merged[i] = history[i]
            if db_damaged:
                damaged[str(self.path)] = db_problem
            elif conflicts and journal_problem is None:
                damaged[str(self.path)] = (f"{len(conflicts)} of its changes differ from the journal's checksummed "
                                           "copies")
                for i in conflicts:
                    merged[i] = journal[i]
            elif behind:
                damaged[str(self.path)] = (f"it lacks {len(behind)} changes that the journal has "
                                           f"(was {self.path.name}-wal lost?)")
            if journal_problem is None and journal is not None and len(ahead) > 1:
                journal_problem = f"it lacks {len(ahead)} changes that the database has"
        elif merged:
            damaged[str(self.path)] = "the file is missing"
        if journal_problem is not None:
            damaged[str(self.journal_path)] = journal_problem
        elif journal is None and meta.get("journal") and (history is not None or db_damaged):
            damaged[str(self.journal_path)] = "the file is missing"
        state = _replay(merged)
        if history is not None and (db_damaged or journal is None or journal_problem is not None):
            # neither copy is whole (or there is no journal yet): a readable flags row the history misses counts
            for key, row in db_flags.items():
                if state.get(key, (0, None, "", None))[:3] != tuple(row[:3]):
                    hid = max(merged, default=0) + 1
                    previous = state.get(key)
                    prev = None if previous is None else {"flagged": bool(previous[0]), "relabel": previous[1],
                                                          "note": previous[2]}
                    value = {"flagged": bool(row[0]), "relabel": row[1], "note": row[2]}
                    merged[hid] = (hid, key, "recovered", json.dumps(prev), json.dumps(value), float(row[3]))
            state = _replay(merged)
        if not db_damaged and history is not None and not damaged.get(str(self.path)) and db_flags != state:
            damaged[str(self.path)] = "its flags table does not match its history"
        if not damaged:
            ahead_only = sorted(i for i in merged if journal is None or i not in journal)
            if ahead_only:  # a crash between the database's commit and the journal's append, or a first opening
                self._append_entries([merged[i] for i in ahead_only], create=journal is None)
            return
        both = str(self.path) in damaged and str(self.journal_path) in damaged
        if db_damaged and not merged and not db_flags and (journal is None or journal_problem is not None):
            raise TDAError(
                f"path: the flag store {self.path} is damaged ({db_problem}) and nothing could be read from it or "
                f"from its journal {self.journal_path} ({journal_problem or 'missing'}); both are left as they are "
                f"(try `sqlite3 {self.path.name} .recover`). To start an empty store, move them away first.")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept, rebuilt = [], []
        if str(self.path) in damaged:
            kept += self._rebuild_db(merged, state, stamp)
            rebuilt.append(str(self.path))
        if str(self.journal_path) in damaged or journal is None:
            kept += self._rebuild_journal(merged, stamp)
            rebuilt.append(str(self.journal_path))
        else:
            missing = sorted(i for i in merged if i not in journal)
            if missing:
                self._append_entries([merged[i] for i in missing])
        source = ("what could be read from both" if both or (db_damaged and journal is None)
                  else "the journal" if str(self.path) in damaged else "the database")
        n_flags = sum(1 for row in state.values() if row[0])
        n_relabels = sum(1 for row in state.values() if row[1] is not None)
        complete = not both and not (db_damaged and journal is None)
        what = "; ".join(f"{Path(f).name} ({reason})" for f, reason in damaged.items())
        message = (f"flag store {self.path}: damaged or incomplete: {what}. "
                   f"Rebuilt {', '.join(Path(r).name for r in rebuilt)} from {source}: {n_flags} flags, "
                   f"{n_relabels} relabels, {len(merged)} changes in the history"
                   + (f"; the damaged files are kept at {', '.join(kept)}" if kept else "")
                   + (". No acknowledged change was lost." if complete
                      else ". No intact copy was left (" + ("both were damaged" if both else "there was no journal")
                      + "): changes in the damaged parts may be lost; check the flags."))
        self.recovery_ = {"message": message, "damaged": damaged, "kept_aside": kept, "rebuilt": rebuilt,
                          "changes": len(merged), "flags": n_flags, "relabels": n_relabels, "complete": complete}
        warnings.warn(message, FlagStoreRecoveryWarning, stacklevel=3)

    def _set_aside(self, path: Path, stamp: str) -> list[str]:
        """Move ``path`` (and, for the database, its -wal and -shm) aside; returns the new names."""
        kept = []
        target = _aside_name(path, stamp)
        n = 1
        while target.exists():
            n += 1
            target = _aside_name(path, f"{stamp}-{n}")
        for suffix in ("", "-wal", "-shm") if path == self.path else ("",):
            source = path.with_name(path.name + suffix)
            if source.exists():
                empty_wal = suffix == "-wal" and source.stat().st_size == 0
                os.replace(source, target.with_name(target.name + suffix))
                if suffix != "-shm" and not empty_wal:
                    kept.append(str(target.with_name(target.name + suffix)))
        _fsync_folder(path.parent)
        return kept

    def _rebuild_db(self, merged: dict[int, tuple], state: dict[str, tuple], stamp: str) -> list[str]:
        tmp = self.path.with_name(f".{self.path.name}.rebuild-{os.getpid()}")
        for suffix in ("", "-wal", "-shm", "-journal"):
            tmp.with_name(tmp.name + suffix).unlink(missing_ok=True)  # our own leftovers of an interrupted rebuild
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO history (id, train_id, action, previous, value, at) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", [merged[i] for i in sorted(merged)])
                conn.executemany("INSERT INTO flags (train_id, flagged, relabel, note, updated_at) "
                                 "VALUES (?, ?, ?, ?, ?)", [(k, *row) for k, row in state.items()])
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('journal', ?)",
                             (self.journal_path.name,))
        finally:
            conn.close()
        for suffix in ("-wal", "-shm"):
            tmp.with_name(tmp.name + suffix).unlink(missing_ok=True)
        kept = self._set_aside(self.path, stamp) if self.path.exists() else []
        for suffix in ("-wal", "-shm"):  # a WAL without its database (the database was deleted): keep it too
            stray = self.path.with_name(self.path.name + suffix)
            if stray.exists():
                os.replace(stray, _aside_name(stray, stamp))
                kept += [str(_aside_name(stray, stamp))] if suffix == "-wal" else []
        os.replace(tmp, self.path)
        _fsync_folder(self.path.parent)
        return kept

    def _rebuild_journal(self, merged: dict[int, tuple], stamp: str) -> list[str]:
        tmp = self.journal_path.with_name(f".{self.journal_path.name}.rebuild-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(merged[i]) for i in sorted(merged)))
            f.flush()
            os.fsync(f.fileno())
        kept = self._set_aside(self.journal_path, stamp) if self.journal_path.exists() else []
        os.replace(tmp, self.journal_path)
        _fsync_folder(self.journal_path.parent)
        return kept

    def _append_entries(self, entries: list[tuple], create: bool = False) -> None:
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._write_all(fd, b"".join(_line(e) for e in entries))
        finally:
            os.close(fd)
        if create:
            _fsync_folder(self.journal_path.parent)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)

    def _connect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('journal', ?)", (self.journal_path.name,))
        self._db_inode = os.stat(self.path).st_ino

    def _open_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        created = not self.journal_path.exists()
        self._journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            _fsync_folder(self.journal_path.parent)

    def _follow_replacements(self) -> None:
        """Another process rebuilt a damaged file: write to the new one, not to the one set aside."""
        try:
            if os.stat(self.path).st_ino != self._db_inode:
                self._connect()
        except FileNotFoundError:
            pass  # the write below recreates nothing silently: SQLite keeps writing the open file
        try:
            current = os.stat(self.journal_path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(self._journal_fd).st_ino:
            self._open_journal()

    # --- writing and reading ---------------------------------------------------------------------------

    @staticmethod
    def _key(train_id: Any) -> str:
        if isinstance(train_id, numbers.Integral) and not isinstance(train_id, bool):
            train_id = int(train_id)  # numpy ints read back from a DataFrame
        if not isinstance(train_id, (int, str)) or isinstance(train_id, bool):
            raise TDAError(f"train_id must be an int or str, got {type(train_id).__name__} ({train_id!r})")
        return json.dumps(train_id)

    def _check_known(self, key: str, train_id: Any) -> None:
        if self._known_ids is None:
            return
        if self._known_keys is None:
            keys = set()
            for i in self._known_ids:
                with contextlib.suppress(TDAError):
                    keys.add(self._key(i))
            self._known_keys = keys
        if key not in self._known_keys:
            raise TDAError(f"train_id: {train_id!r} is not a training id of this session "
                           f"({len(self._known_ids)} examples, ids like {self._known_ids[:5]})")

    def _write(self, train_id: Any, action: str, flagged: bool | None = None,
               relabel: int | None | str = "keep", note: str | None = None) -> None:
        key = self._key(train_id)
        self._check_known(key, train_id)
        with self._locked():
            self._follow_replacements()
            now = time.time()
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
                entry = (key, action, json.dumps(prev), json.dumps(new), now)
                hid = self._conn.execute(
                    "INSERT INTO history (train_id, action, previous, value, at) VALUES (?, ?, ?, ?, ?)", entry
                ).lastrowid
            try:
                self._write_all(self._journal_fd, _line((hid, *entry)))
            except OSError as err:
                raise TDAError(f"train_id {train_id!r}: the change was saved in {self.path} but not in its journal "
                               f"{self.journal_path} ({err}); it is not safe against damage to the database until "
                               "the store is reopened") from err

    def flag(self, train_id: Any, note: str | None = None) -> None:
        """Mark ``train_id`` as suspected mislabeled."""
        if note is not None and not isinstance(note, str):
            raise TDAError(f"note must be a str or None, got {type(note).__name__}")
        self._write(train_id, "flag", flagged=True, note=note)

    def unflag(self, train_id: Any) -> None:
        """Remove the flag of ``train_id`` (a relabel is kept)."""
        self._write(train_id, "unflag", flagged=False)

    def relabel(self, train_id: Any, label: int | None) -> None:
        """Record a corrected label for ``train_id`` (None clears it)."""
        if label is not None and (isinstance(label, bool) or not isinstance(label, numbers.Integral) or label < 0):
            raise TDAError(f"label must be a non-negative int or None, got {label!r}")
        self._write(train_id, "relabel", relabel=None if label is None else int(label))

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

        rows = self._conn.execute(_FLAGS).fetchall()
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
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
