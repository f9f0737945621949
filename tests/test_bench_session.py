"""``tda-explorer bench session`` end to end at a small size, with scores on disk (the path taken at 50,000)."""

import json

import pytest

import tda_explorer.session as session_module
from tda_explorer.cli import main


@pytest.mark.slow  # trains a small ResNet
def test_bench_session_reopens_the_explorer_from_scores_on_disk(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session_module, "DENSE_LIMIT", 1000)  # 96 x 24 scores go to disk, as at scale
    out, folder = tmp_path / "session.json", tmp_path / "folder"
    assert main(["bench", "session", "--n-train", "96", "--n-test", "24", "--folder", str(folder),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_train"] == 96 and result["n_test"] == 24 and result["methods"] == ["grad-dot", "grad-cos", "trak"]
    assert 0 < result["first_panel_s"] and 0 < result["peak_rss_mb"] and result["epoch_s"] > 0
    assert len(list((folder / "attributions").glob("*.npy"))) == 3  # one score file per method
    assert len(list((folder / "predictions").glob("*.pt"))) == 1  # the reopened session predicted nothing
    capsys.readouterr()
