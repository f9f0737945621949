"""Crash safety of the flag store, and that the audit behind it can see a loss."""

import sqlite3

from tda_explorer.cli import benchmark_module
from tda_explorer.flags import FlagStore, journal_path

_stress = benchmark_module("stress_flags")
_audit, stress_flags = _stress._audit, _stress.stress_flags


def test_flag_store_survives_sigkill_during_writes(tmp_path):
    result = stress_flags(trials=3, writes=200, seed=1, folder=str(tmp_path))
    assert result["acknowledged"] > 0 and result["acknowledged_writes"] == result["acknowledged"]
    assert result["lost"] == 0 and result["integrity_failures"] == 0
    assert result["database_lost"] == 0 and result["journal_lost"] == 0  # each copy alone holds every write


def test_flag_store_survives_sigkill_then_a_damaged_file(tmp_path):
    result = stress_flags(trials=5, writes=150, seed=2, folder=str(tmp_path), damage=True)
    assert [t["damage"] for t in result["per_trial"]] == list(_stress.DAMAGE_KINDS)
    assert result["acknowledged"] > 0 and all(t["lost"] == 0 for t in result["per_trial"])
    assert result["lost"] == 0 and result["integrity_failures"] == 0 and result["kept_aside_missing"] == 0
    assert result["recovered"] >= 1 and set(result["by_damage"]) == set(_stress.DAMAGE_KINDS)
    for trial in result["per_trial"]:
        assert trial["recovered"] == (trial["message"] is not None) == trial["warned"]


def test_damage_audit_sees_a_write_missing_from_the_journal(tmp_path):
    db = tmp_path / "f.sqlite"
    store = FlagStore(db)
    store.flag(0)
    store.relabel(0, 0)
    store.close()
    journal = journal_path(db)
    journal.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])  # the relabel is only in the database
    assert _stress._missing(_stress._journal_rows(db), 2) == {1}
    assert _stress._missing(_stress._db_rows(db)[0], 2) == set()


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

    from tda_explorer.retraining import subset_ground_truth
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


class _Payload:  # a pickled object whose loading would run code
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_load_tensors_only_unless_explicitly_trusted(tmp_path, capsys):
    import pytest
    import torch

    from tda_explorer import TDAError
    from tda_explorer.compute.training.checkpoints import load_checkpoint

    model = torch.nn.Linear(3, 2)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, plain)
    state = load_checkpoint(plain)
    assert set(state) == {"weight", "bias"}
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "extra": _Payload()}, evil)
    with pytest.raises(TDAError, match="holds more than tensors.*allow_pickle=True"):
        load_checkpoint(evil)
    assert "unpickled!" not in capsys.readouterr().out  # nothing ran
    with pytest.raises(TDAError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "<svg onload=alert(3)>",
    "\"><iframe src=javascript:alert(4)>",
    "<a href=\"javascript:alert(5)\">x</a>",
    "</td></tr></table><b onmouseover=alert(6)>",
]


def _all_html(widget, seen=None) -> list[str]:
    """Every HTML string a widget tree renders, plotly figure strings included."""
    import ipywidgets as W

    seen = set() if seen is None else seen
    if id(widget) in seen:
        return []
    seen.add(id(widget))
    out = []
    if isinstance(widget, (W.HTML, W.HTMLMath, W.Label)):
        out.append(widget.value)
    if hasattr(widget, "data") and hasattr(widget, "layout") and hasattr(widget, "batch_update"):
        import json

        out.append(json.dumps(widget.to_plotly_json(), default=str))  # a FigureWidget: raw trace text, titles
    for child in getattr(widget, "children", ()):
        out += _all_html(child, seen)
    return out


def test_payloads_in_labels_ids_and_texts_are_escaped_everywhere(tmp_path):
    import torch

    from tda_explorer import AttributionDataset, AttributionTask
    from tda_explorer.data import TextRenderer
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    n = len(PAYLOADS)
    texts = [f"{p} text {i}" for i, p in enumerate(PAYLOADS)]
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([i % 2 for i in range(n)])
    names = [PAYLOADS[0], PAYLOADS[1]]
    ids = [f"{p}#{i}" for i, p in enumerate(PAYLOADS)]
    train = AttributionDataset(x, labels, ids=ids, class_names=names, renderer=TextRenderer(texts))
    test = AttributionDataset(x, labels, ids=ids, class_names=names, renderer=TextRenderer(texts))
    session = Session(train, test, AttributionTask(torch.nn.Linear(3, 2)), folder=tmp_path)
    session.compute("grad-dot")
    session.compute("tracin", checkpoints=[session.task.model.state_dict()], learning_rates=[1.0])
    explorer = Explorer(session, k=3)
    explorer.state.detail_train_id = ids[3]
    explorer.mislabels.select_ids(ids[:4])
    explorer.picker.jump.value = PAYLOADS[2]  # an unknown id: echoed in the message
    rendered = "\n".join(_all_html(explorer))
    for payload in PAYLOADS:
        assert payload not in rendered, payload
    for raw in ("<script", "<img src=x", "<svg", "<iframe", "javascript:alert(5)\">", "<b onmouseover"):
        assert raw not in rendered, raw
    assert "&lt;script&gt;" in rendered


def test_same_seed_gives_identical_scores_on_cpu():
    import torch

    from tda_explorer import get_method
    from tda_explorer.experiments import build_experiment

    runs = []
    for _ in range(2):
        exp = build_experiment("mlp", noise=0.1, n_train=200, n_test=30, epochs=8, seed=3)
        runs.append({m: get_method(m, exp.task(), **({"projection_dim": 128} if m == "trak" else {}))
                     .fit(exp.split.train).attribute(exp.split.test).scores for m in ("tracin", "trak")})
    for method in runs[0]:
        assert torch.equal(runs[0][method], runs[1][method]), method


def test_rapid_selections_and_flag_clicks_lose_nothing(digits_experiment, tmp_path, caplog):
    import logging
    import random

    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("tracin")
    explorer = Explorer(session, k=5)
    rng = random.Random(0)
    expected: set = set()
    caplog.set_level(logging.WARNING)
    for _ in range(100):
        explorer.state.test_id = rng.choice(session.test.ids)
        card = explorer.browser.proponents[rng.randrange(5)]
        card.buttons["flag"].click()
        expected ^= {card.example_id}
    assert set(session.flags.flagged_ids()) == expected
    assert explorer.browser.shown_ids() == session.attribution("tracin").topk(explorer.state.test_id, 5)[0]
    shown_flags = {c.example_id for c in explorer.browser.proponents + explorer.browser.opponents
                   if c.example_id is not None and c.buttons["flag"].description == "unflag"}
    visible = {c.example_id for c in explorer.browser.proponents + explorer.browser.opponents if c.example_id}
    assert shown_flags == expected & visible
    assert "Exception in callback" not in caplog.text
    assert len(session.flags.history()) == 100


def test_long_computation_can_be_cancelled_and_the_panel_stays_usable(digits_experiment, tmp_path):
    import time

    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    session = Session.from_experiment(digits_experiment, folder=tmp_path)
    session.compute("grad-dot")
    explorer = Explorer(session)
    explorer.compute_bar.method_config = {"tracin": {"max_memory": 3 * 4 * 10_000}}  # one example per chunk
    job = explorer.compute_bar.start("tracin")
    time.sleep(0.3)
    assert not job.done
    t0 = time.perf_counter()
    explorer.compute_bar.cancel_button.click()
    job.join(30)
    assert job.state == "cancelled" and time.perf_counter() - t0 < 5
    assert "tracin" not in session.methods and "cancelled" in explorer.compute_bar.message.value
    assert not explorer.compute_bar.run_button.disabled
    explorer.state.test_id = session.test.ids[4]  # still usable
    assert explorer.browser.shown_ids() == session.attribution("grad-dot").topk(session.test.ids[4], 5)[0]
