"""Streaming top-k over memory-mapped stores equals the dense top-k."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tda_explorer import TDAError
from tda_explorer.compute.engine.topk import topk_scores


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streaming_topk_equals_dense_topk(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(5000, 32, generator=gen)
    stored = features.to(torch.bfloat16).view(torch.uint16) if dtype == "bfloat16" else features.to(
        getattr(torch, dtype))
    path = tmp_path / "f.npy"
    np.save(path, stored.numpy())
    array = np.load(path, mmap_mode="r")
    exact = (stored.view(torch.bfloat16) if dtype == "bfloat16" else stored).float()
    queries = torch.randn(3, 32, generator=gen)
    got = topk_scores(array, queries, k=7, max_memory=40_000, bfloat16=dtype == "bfloat16")  # ~100-row chunks
    dense = queries @ exact.T
    streamed = topk_scores(path, queries, k=7, max_memory=40_000, bfloat16=dtype == "bfloat16")  # from the file
    for side, largest in (("proponents", True), ("opponents", False)):
        want = dense.topk(7, dim=1, largest=largest)
        for result in (got, streamed):
            assert torch.equal(result[side][1], want.indices)
            torch.testing.assert_close(result[side][0], want.values)
    with pytest.raises(TDAError, match="queries have 31 features but the store has 32"):
        topk_scores(array, queries[:, :31], k=3)
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TDAError, match="is truncated at row"):
        topk_scores(truncated, queries, k=3, max_memory=40_000, bfloat16=dtype == "bfloat16")


def test_bench_topk_cli_reports_latency_and_memory(tmp_path):
    out = tmp_path / "topk.json"
    subprocess.run([sys.executable, "-m", "tda_explorer", "bench", "topk", "--n-train", "20000", "--dim", "64",
                    "--json", str(out), "--folder", str(tmp_path)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["n_train"] == 20000 and result["batch"] == 16 and result["peak_rss_mb"] > 0
    assert result["seconds_per_query"] > 0 and result["seconds_per_query_batched"] > 0  # figures: benchmarks/
