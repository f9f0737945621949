import json

import pandas as pd
import pytest

from tda_explorer.cli import main


@pytest.mark.slow  # trains models
def test_demo_runs_and_writes_tables(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--n-train", "300", "--n-test", "50", "--epochs", "15"]) == 0
    text = capsys.readouterr().out
    assert "Test accuracy" in text and "recall of flipped labels" in text and "top-5 proponents" in text
    ranking = pd.read_csv(out / "mislabel_ranking.csv")
    assert len(ranking) == 300 and ranking["truly_flipped"].sum() == 30
    assert {"train_id", "rank", "score", "label", "predicted", "suggested", "flag"} <= set(ranking.columns)
    top = pd.read_csv(out / "proponents_opponents_top10.csv")
    assert set(top.test_id) == set(range(50)) and len(top) == 50 * 20


def test_evaluate_writes_json(tmp_path):
    path = tmp_path / "r.json"
    code = main(["evaluate", "--model", "lr", "--method", "tracin", "--noise", "0.1", "--n-subsets", "8",
                 "--cache-dir", str(tmp_path / "cache"), "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    for key in ("method", "lds", "mislabel_auc", "recall_at_10", "recall_at_20", "seconds"):
        assert key in result
    assert result["mislabel_auc"] > 0.9 and -1 <= result["lds"] <= 1


def test_bad_input_exits_with_clear_message(tmp_path, capsys):
    assert main(["evaluate", "--data", "cifar", "--method", "tracin", "--no-lds"]) == 2
    assert "unknown data 'cifar'; expected one of: digits" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--noise", "1.5"]) == 2
    assert "noise must be in [0, 1]" in capsys.readouterr().err
    assert main(["evaluate", "--scenario", "facts", "--method", "tracin", "--verifier", "gradient"]) == 2
    assert "--verifier gradient picks the stage-2 verifier of two-stage fact tracing" in capsys.readouterr().err
