import argparse
import io
import json
import re
import subprocess
import sys
import types

import pandas as pd
import pytest

import tda_explorer
from tda_explorer import cli
from tda_explorer.cli import checks as checks_cli
from tda_explorer.cli import demo as demo_cli
from tda_explorer.cli import evaluate as evaluate_cli
from tda_explorer.cli import main
from tda_explorer.errors import TDAError


@pytest.mark.slow  # trains models
def test_demo_runs_and_writes_tables(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--n-train", "300", "--n-test", "50", "--epochs", "15"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "Test accuracy" in text and "recall of flipped labels" in text and "top-5 proponents" in text
    assert "The 10 training examples most likely mislabeled" in text
    assert "Beside the training-loss baseline" in text  # a method's mislabel figures never come alone
    assert "\x1b[" not in captured.err  # stderr is no terminal here: no progress bars, no cursor codes
    ranking = pd.read_csv(out / "mislabel_ranking.csv")
    assert len(ranking) == 300 and ranking["truly_flipped"].sum() == 30
    assert {"train_id", "rank", "score", "label", "predicted", "suggested", "flag"} <= set(ranking.columns)
    top = pd.read_csv(out / "proponents_opponents_top10.csv")
    assert set(top.test_id) == set(range(50)) and len(top) == 50 * 20


def _side_scores(text: str, title: str) -> list[float]:
    """The score column of the table printed under ``title`` (empty for "none")."""
    lines = text[text.index(title):].splitlines()[1:]
    if lines[0].strip() == "none":
        return []
    header = lines[0].split()
    rows = []
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != len(header) or not re.fullmatch(r"-?\d+", cells[0]):
            break
        rows.append(float(cells[header.index("score")]))
    return rows


def test_demo_with_few_training_examples_counts_them_and_splits_by_sign(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--n-train", "5", "--n-test", "5", "--epochs", "3"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "The 5 training examples most likely mislabeled" in text and "The 10 training" not in text
    pro = _side_scores(text, "Proponents (positive scores")
    opp = _side_scores(text, "Opponents (negative scores")
    assert all(s > 0 for s in pro) and all(s < 0 for s in opp)
    assert pro == sorted(pro, reverse=True) and opp == sorted(opp)
    assert 0 < len(pro) + len(opp) <= 5  # each of the 5 training examples on at most one side
    assert "\x1b[" not in captured.err


def test_proponents_are_positive_and_opponents_negative_whatever_the_ranks():
    # what Session.ranking gives when 2k >= n: every example ranked 1..n, negative scores among the "proponents"
    top = pd.DataFrame({"train_id": ["a", "b", "c", "d", "e"], "rank": [1, 2, 3, 4, 5],
                        "score": [2.0, 0.5, -0.1, -0.3, -0.9]})
    pro, opp = demo_cli._proponents_opponents(top, k=5)
    assert pro["train_id"].tolist() == ["a", "b"] and pro["rank"].tolist() == [1, 2]
    assert opp["train_id"].tolist() == ["e", "d", "c"] and opp["rank"].tolist() == [-1, -2, -3]
    # k caps each side; an example listed twice (once per side) is shown once
    twice = pd.concat([top, top.assign(rank=[-5, -4, -3, -2, -1])], ignore_index=True)
    pro, opp = demo_cli._proponents_opponents(twice, k=2)
    assert pro["train_id"].tolist() == ["a", "b"] and opp["train_id"].tolist() == ["e", "d"]


def test_an_empty_side_says_none():
    top = pd.DataFrame({"train_id": [3, 7], "rank": [1, 2], "score": [1.5, 0.25]})
    text = demo_cli._sides_text(top, ["rank", "train_id", "score"])
    proponents, opponents = text.split("Opponents (negative scores, strongest first):")
    assert "Proponents (positive scores, strongest first):" in proponents and "1.5" in proponents
    assert opponents.strip() == "none"


def test_evaluate_writes_json_and_reports_progress_on_stderr(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(["evaluate", "--model", "lr", "--method", "tracin", "--noise", "0.1", "--n-subsets", "8",
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    for key in ("method", "lds", "mislabel_auc", "recall_at_10", "recall_at_20", "seconds"):
        assert key in result
    assert result["mislabel_auc"] > 0.9 and -1 <= result["lds"] <= 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result  # stdout is the JSON alone; progress goes to stderr
    progress = captured.err.splitlines()
    assert progress[0] == "tda-explorer: training the LR on digits (label noise 0.1, seed 0)…"
    assert progress[1].startswith("tda-explorer: LDS truth (fresh-seed): retraining 8 models without 50%")
    assert progress[2].startswith("tda-explorer: computing tracin attributions (300 test × 1000 train)")
    assert re.fullmatch(r"tda-explorer: done in \d+\.\d s", progress[3]) and len(progress) == 4


def test_bad_input_exits_with_clear_message(tmp_path, capsys):
    assert main(["evaluate", "--data", "cifar", "--method", "tracin", "--no-lds"]) == 2
    assert "unknown data 'cifar'; expected one of: digits" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--noise", "1.5"]) == 2
    assert "noise must be in [0, 1]" in capsys.readouterr().err
    assert main(["evaluate", "--scenario", "facts", "--method", "tracin", "--verifier", "gradient"]) == 2
    assert "--verifier gradient picks the stage-2 verifier of two-stage fact tracing" in capsys.readouterr().err


# --- --json: a folder that does not exist is refused, never created

def test_checked_output_refuses_a_missing_folder_and_a_folder(tmp_path):
    missing = tmp_path / "missing" / "x.json"
    with pytest.raises(TDAError, match=re.escape(f"--json {missing}: the folder {missing.parent} does not exist")):
        cli._checked_output(str(missing))
    with pytest.raises(TDAError, match=re.escape(f"--json {tmp_path} is a folder; pass the path of a file")):
        cli._checked_output(str(tmp_path))
    assert cli._checked_output(str(tmp_path / "x.json")) == tmp_path / "x.json"


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "lr", "--method", "tracin", "--no-lds"],
    ["score", "--store", "no-such-store"],
    ["bench", "explorer", "--n-train", "10"],
    ["stress", "flags", "--trials", "1"],
    ["methods"],
], ids=lambda c: c[0])
def test_json_into_a_missing_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    def no_benchmarks(name):
        raise AssertionError(f"{name} ran although --json was refused")

    monkeypatch.setattr(checks_cli, "benchmark_module", no_benchmarks)
    missing = tmp_path / "missing" / "deeper" / "x.json"
    assert main([*command, "--json", str(missing)]) == 2
    captured = capsys.readouterr()
    assert f"tda-explorer: error: --json {missing}: the folder {missing.parent} does not exist" in captured.err
    assert captured.out == "" and not (tmp_path / "missing").exists()


def test_score_without_a_store_names_store(tmp_path, capsys):
    assert main(["score", "--store", str(tmp_path / "nothing")]) == 2
    assert f"--store {tmp_path / 'nothing'}: no feature store there" in capsys.readouterr().err


# --- demo --test-id

def test_check_test_id_names_the_valid_range():
    assert demo_cli._check_test_id(0, 5) == 0 and demo_cli._check_test_id(4, 5) == 4
    with pytest.raises(TDAError, match=re.escape("--test-id 5 is out of range: the test set has 5 examples, so pass "
                                                 "a test id from 0 to 4")):
        demo_cli._check_test_id(5, 5)
    with pytest.raises(TDAError, match=re.escape("--test-id -1 is out of range")):
        demo_cli._check_test_id(-1, 5)


def test_demo_refuses_an_out_of_range_test_id_before_training(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--test-id", "99999"]) == 2
    assert ("tda-explorer: error: --test-id 99999 is out of range: the test set has 300 examples, so pass a test id "
            "from 0 to 299") in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--n-test", "50", "--test-id", "-1"]) == 2
    assert "--test-id -1 is out of range: the test set has 50 examples, so pass a test id from 0 to 49" in \
        capsys.readouterr().err
    assert not out.exists()  # refused before anything was built or written


# --- stress flags --damage

def test_stress_damage_is_passed_only_when_asked(tmp_path, capsys, monkeypatch):
    calls = []

    def stress_flags(**kwargs):
        calls.append(kwargs)
        return {"trials": kwargs["trials"], "acknowledged": 10, "lost": 0, "recovered": 1}

    monkeypatch.setattr(checks_cli, "benchmark_module", lambda name: types.SimpleNamespace(stress_flags=stress_flags))
    path = tmp_path / "s.json"
    assert main(["stress", "flags", "--trials", "3", "--writes", "7", "--seed", "2"]) == 0
    assert main(["stress", "flags", "--trials", "20", "--damage", "--json", str(path)]) == 0
    assert calls == [{"trials": 3, "writes": 7, "seed": 2},
                     {"trials": 20, "writes": 1000, "seed": 0, "damage": True}]
    assert json.loads(path.read_text()) == {"trials": 20, "acknowledged": 10, "lost": 0, "recovered": 1}
    capsys.readouterr()

    monkeypatch.setattr(checks_cli, "benchmark_module", lambda name: types.SimpleNamespace(
        stress_flags=lambda **kw: {"trials": 1, "lost": 1, "integrity_failures": 0}))
    assert main(["stress", "flags", "--damage"]) == 1  # a lost write fails the run


def test_stress_help_describes_damage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stress", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--damage also damage the database, the WAL and the journal between trials; every acknowledged write " \
           "must come back" in text


# --- help and version

def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tda-explorer {tda_explorer.__version__}\n"


_CHILD = """
import contextlib, io, json, sys
from tda_explorer.cli import build_parser, main
build_parser(commands=()).format_help()
for argv in (["--help"], ["--version"]):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        main(argv)
    assert out.getvalue(), argv
heavy = ["torch", "numpy", "pandas", "tda_explorer.compute", "tda_explorer.compute.catalogue",
         "tda_explorer.experiments", "tda_explorer._validation"]
print(json.dumps([name for name in heavy if name in sys.modules]))
"""


def test_help_and_version_import_nothing_heavy():
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == []


def test_help_of_a_named_command_builds_only_that_command():
    parser = cli.build_parser(commands={"stress"})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "--damage" in sub.choices["stress"].format_help()
    unbuilt = {flag for a in sub.choices["evaluate"]._actions for flag in a.option_strings}
    assert unbuilt == {"-h", "--help"}  # left unbuilt: no catalogue loaded for it


def _every_help(parser: argparse.ArgumentParser):
    """(name, parser) for the top-level parser and each subcommand."""
    yield "tda-explorer", parser
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    yield from sub.choices.items()


def test_help_is_plain_text_and_every_option_has_a_help():
    from tda_explorer.compute.catalogue import CATALOGUE

    for method in [None, *sorted(CATALOGUE)]:
        for name, parser in _every_help(cli.build_parser(method)):
            text = parser.format_help()
            assert "``" not in text and not re.search(r":\w+:`", text), (method, name)
            missing = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
            assert missing == [], (method, name, missing)


def test_evaluate_still_generates_the_method_flags():
    # docs/generate_methods.py reads these off build_parser(method)
    sub = next(a for a in cli.build_parser("trak")._actions if isinstance(a, argparse._SubParsersAction))
    flags = {a.dest: a.option_strings for a in sub.choices["evaluate"]._actions if a.dest.startswith("opt_")}
    assert flags["opt_projection_dim"] == ["--projection-dim"]
    assert flags["opt_n_checkpoints"] == ["--n-checkpoints", "--ensemble-checkpoints"]
    args = cli.build_parser("trak").parse_args(["evaluate", "--method", "trak", "--projection-dim", "64"])
    assert evaluate_cli.method_options_from(args) == {"projection_dim": 64}


# --- progress bars only on a terminal

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_when_stderr_is_a_terminal(monkeypatch):
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    bar = cli._progress(range(3), "demo", total=3)
    assert bar.disable
    bar.update(3)
    bar.close()
    assert redirected.getvalue() == ""

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = cli._progress(range(3), "demo", total=3)
    assert not bar.disable
    bar.update(3)
    bar.close()
    assert "demo" in terminal.getvalue()
