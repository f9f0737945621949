"""Crash-safety check of the flag store: SIGKILL a writer at random points, then audit the database.

A child process writes ``writes`` operations (flag a new id, then relabel it) and prints each one's
id only after the call returned — the moment a user would believe it saved. The parent kills the
child with SIGKILL after a random number of acknowledgements plus a random delay (so the kill lands
inside a later transaction), then checks that every acknowledged write is in the database and that
``PRAGMA integrity_check`` passes.
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


def _audit(db: Path, acknowledged: int) -> tuple[int, bool]:
    """(lost acknowledged writes, integrity ok) for a database after a crash."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {json.loads(k): (f, r) for k, f, r in conn.execute("SELECT train_id, flagged, relabel FROM flags")}
    finally:
        conn.close()
    lost = 0
    for i in range(acknowledged):
        flagged, relabel = rows.get(i // 2, (0, None))
        if i % 2 == 0 and flagged != 1:
            lost += 1
        elif i % 2 == 1 and relabel != (i // 2) % 10:
            lost += 1
    return lost, ok


def stress_flags(trials: int = 100, writes: int = 1000, seed: int = 0, folder: str | None = None) -> dict:
    """Run ``trials`` kill-and-audit rounds; returns ``trials, lost, integrity_failures`` and totals."""
    rng = random.Random(seed)
    root = Path(folder or tempfile.mkdtemp(prefix="tda-stress-"))
    lost_total, failures, acknowledged_total, t0 = 0, 0, 0, time.perf_counter()
    for trial in range(trials):
        db = root / f"trial{trial}.sqlite"
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
        lost, ok = _audit(db, acknowledged)
        lost_total += lost
        failures += not ok
        acknowledged_total += acknowledged
    return {"trials": trials, "writes_per_trial": writes, "acknowledged_writes": acknowledged_total,
            "lost": lost_total, "integrity_failures": failures, "seconds": time.perf_counter() - t0}
