"""bench_zoo's bookkeeping: an oracle re-read against the current default row, and one row's peak memory."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import bench_zoo  # noqa: E402


def _rows(default_lds: float) -> list[dict]:
    sweep = [{"options": {}, "lds": 0.50}, {"options": {"damping": 1.0}, "lds": 0.60},
             {"options": {"damping": 10.0}, "status": "error: diverged"}]
    return [bench_zoo._row("t", "tda_explorer", "if-cg", "default", lds=default_lds),
            bench_zoo._row("t", "tda_explorer", "if-cg", "oracle", lds=0.50, options="defaults", sweep=sweep)]


@pytest.mark.parametrize(("default", "want", "options"), [(0.70, 0.70, "defaults"),
                                                          (0.55, 0.60, json.dumps({"damping": 1.0}))])
def test_an_oracle_is_its_best_explicit_point_or_the_current_default(tmp_path, default, want, options):
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps({"rows": _rows(default)}))
    writer = bench_zoo.Writer(str(path), {})
    assert bench_zoo.refresh_oracles(writer) == 1  # the stale {} point (0.50) no longer stands for the default
    oracle = next(r for r in json.loads(path.read_text())["rows"] if r["setting"] == "oracle")
    assert oracle["lds"] == pytest.approx(want) and oracle["options"] == options
    assert bench_zoo.refresh_oracles(bench_zoo.Writer(str(path), {})) == 0  # idempotent


def _vm(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_is_reset_per_row():
    """After the reset the peak is the current resident set (not the process's lifetime peak), and it follows what a
    row then touches."""
    block = torch.ones(128 * 2**20 // 4)  # a peak above what follows
    del block
    bench_zoo._reset_peak_rss()
    peak, rss = bench_zoo._peak_rss_mb(), _vm("VmRSS")
    if peak > rss + 32:
        pytest.skip("this kernel keeps the lifetime peak (clear_refs 5 not honoured)")
    block = torch.ones(64 * 2**20 // 4)
    assert bench_zoo._peak_rss_mb() >= _vm("VmRSS") - 1 >= rss - 1
    del block
