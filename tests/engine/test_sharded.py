"""Sharded featurisation: torchrun with 2 gloo processes equals one process; a killed run resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tda_explorer import TDAError, get_method
from tda_explorer.compute.engine.sharded import load_sharded

pytestmark = pytest.mark.distributed
ARGS = ["--n-train", "200", "--projection-dim", "128", "--shard-rows", "48"]


def _run(*args, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    prefix = [torchrun_bin, "--standalone", "--nproc_per_node", "2", "-m"] if torchrun else [sys.executable, "-m"]
    return subprocess.run([*prefix, "tda_explorer", *args], capture_output=True, text=True, env=env, timeout=300)


def _stderr(done: subprocess.CompletedProcess) -> str:
    """The first lines a failing rank wrote (the cause) and the launcher's tail."""
    return done.stderr[:1500] + "\n[...]\n" + done.stderr[-1500:]


@pytest.mark.slow  # trains models
def test_two_gloo_processes_equal_one_and_a_killed_run_resumes(tmp_path):
    two = _run("featurize", "--out", str(tmp_path / "two"), *ARGS, torchrun=True)
    assert two.returncode == 0, _stderr(two)
    summary = json.loads(two.stdout)
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and summary["world_size"] == 2
    assert sorted(s for r in summary["ranks"] for s in r["written"]) == [0, 1, 2, 3, 4]  # 5 shards over 2 ranks
    one = _run("featurize", "--out", str(tmp_path / "one"), *ARGS)
    assert one.returncode == 0, _stderr(one)
    torch.testing.assert_close(load_sharded(tmp_path / "two"), load_sharded(tmp_path / "one"), rtol=1e-5, atol=1e-6)

    crashed = _run("featurize", "--out", str(tmp_path / "resume"), *ARGS, "--stop-after", "2")
    assert crashed.returncode == 0 and json.loads(crashed.stdout)["written"] == [0, 1]
    with pytest.raises(TDAError, match=r"shards \[2, 3, 4\] of 5 are missing"):
        load_sharded(tmp_path / "resume")
    resumed = json.loads(_run("featurize", "--out", str(tmp_path / "resume"), *ARGS).stdout)
    assert resumed["found"] == [0, 1] and resumed["written"] == [2, 3, 4]
    assert torch.equal(load_sharded(tmp_path / "resume"), load_sharded(tmp_path / "one"))

    other = _run("featurize", "--out", str(tmp_path / "one"), "--n-train", "200", "--projection-dim", "64",
                 "--shard-rows", "48")
    assert other.returncode != 0 and "holds features of another run (fingerprint" in other.stderr


@pytest.mark.slow  # trains models
def test_score_reduces_over_shards_like_grad_dot(tmp_path, digits_experiment):
    from tda_explorer.experiments import build_experiment

    assert _run("featurize", "--out", str(tmp_path / "s"), *ARGS).returncode == 0
    out = tmp_path / "top.json"
    done = _run("score", "--store", str(tmp_path / "s"), "--k", "4", "--n-test-points", "3", "--json", str(out))
    assert done.returncode == 0, _stderr(done)
    result = json.loads(out.read_text())
    exp = build_experiment("mlp", n_train=200)
    dense = get_method("grad-dot", exp.task(), projection_dim=128).fit(exp.split.train).attribute(
        exp.split.test.subset([0, 1, 2]))
    for test_id in list(result)[:3]:
        want = dense.topk(int(test_id) if test_id.isdigit() else test_id, 4)[0]
        assert [row[0] for row in result[test_id]["proponents"]] == list(want)
    assert np.isfinite([row[1] for row in result[list(result)[0]]["opponents"]]).all()
    wrong = _run("score", "--store", str(tmp_path / "s"), "--seed", "1")
    assert wrong.returncode == 2 and "was featurised from another model or data" in wrong.stderr


@pytest.mark.slow  # trains models
def test_two_processes_featurise_the_transformer_with_logra_like_one(tmp_path):
    args = ["--model", "transformer", "--n-train", "96", "--epochs", "1", "--projection-kind", "logra",
            "--projection-dim", "8", "--shard-rows", "32"]
    two = _run("featurize", "--out", str(tmp_path / "two"), *args, torchrun=True)
    assert two.returncode == 0, _stderr(two)
    summary = json.loads(two.stdout)
    assert sum(r["rows_written"] for r in summary["ranks"]) == 96 and all(r["seconds"] > 0 for r in summary["ranks"])
    one = _run("featurize", "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, _stderr(one)
    features = load_sharded(tmp_path / "two")
    torch.testing.assert_close(features, load_sharded(tmp_path / "one"), rtol=1e-5, atol=1e-7)
    assert features.shape[0] == 96 and json.loads((tmp_path / "one" / "manifest.json").read_text())[
        "projection"]["kind"] == "logra"
    done = _run("score", "--store", str(tmp_path / "one"), "--model", "transformer", "--epochs", "1", "--k", "3")
    assert done.returncode == 0, _stderr(done)
