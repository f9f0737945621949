"""Crash safety of the flag store, and that the audit behind it can see a loss."""

import sqlite3

from tda_explorer.flags import FlagStore
from tda_explorer.stress import _audit, stress_flags


def test_flag_store_survives_sigkill_during_writes(tmp_path):
    result = stress_flags(trials=3, writes=200, seed=1, folder=str(tmp_path))
    assert result["acknowledged_writes"] > 0
    assert result["lost"] == 0 and result["integrity_failures"] == 0


def test_audit_counts_acknowledged_writes_that_are_missing(tmp_path):
    db = tmp_path / "f.sqlite"
    store = FlagStore(db)
    store.flag(0)
    store.flag(1)  # relabels of 0 and 1 and everything for 2..4 never happened
    store.close()
    lost, ok = _audit(db, acknowledged=10)
    assert ok and lost == 8
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE flags SET flagged = 0 WHERE train_id = '0'")
    assert _audit(db, acknowledged=1) == (1, True)


def test_flags_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, tda_explorer.flags; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_concurrent_writers_of_one_cache_entry_leave_a_complete_file(tmp_path):
    """Two processes saving the same entry at once (two kernels, one cache folder) never corrupt it."""
    import subprocess
    import sys

    import torch

    target = tmp_path / "entry.pt"
    code = ("import sys, torch; from tda_explorer.atomic import save_tensors\n"
            "for i in range(30): save_tensors({'x': torch.full((20000,), float(sys.argv[2]))}, sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), str(v)]) for v in (1, 2)]
    assert all(p.wait() == 0 for p in procs)
    value = torch.load(target, weights_only=True)["x"]
    assert value.shape == (20000,) and float(value[0]) in (1.0, 2.0) and bool((value == value[0]).all())
    assert not list(tmp_path.glob(".*.tmp"))


def test_damaged_cache_entries_are_recomputed_with_a_warning(digits_experiment, tmp_path):
    import pytest
    import torch

    from tda_explorer.evaluate import subset_ground_truth
    from tda_explorer.session import Session

    truth = subset_ground_truth(digits_experiment, n_subsets=4, cache_dir=tmp_path)
    entry = next((tmp_path / "ground_truth").glob("subsets-*.pt"))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: same size, different content
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged or incomplete"):
        again = subset_ground_truth(digits_experiment, n_subsets=4, cache_dir=tmp_path)
    assert torch.equal(again.measurements, truth.measurements)

    session = Session.from_experiment(digits_experiment, folder=tmp_path / "s")
    first = session.compute("grad-dot")
    cached = next((tmp_path / "s" / "attributions").glob("grad-dot-*.pt"))
    cached.write_bytes(cached.read_bytes()[:50])  # truncated by a crash
    with pytest.warns(UserWarning, match="damaged or incomplete"):
        second = Session.from_experiment(digits_experiment, folder=tmp_path / "s").compute("grad-dot")
    assert torch.equal(first.scores, second.scores)
