"""Scale-out figures, each against a baseline measured in the same run:

- featurisation throughput of the transformer experiment with 1 and with 2 torchrun processes (gloo, one
  thread each), as examples per second of the shard loop and their ratio;
- peak resident memory of one featurisation process against n_train (the shards stream to disk, so it
  should not grow with n), dense projection and LoGra;
- streaming top-k latency and peak memory for 10k, 100k and 1M stored examples × 1,024 float16 features
  (``tda-explorer bench topk``; ``--device cuda`` on a GPU machine).

Every measurement runs in a subprocess of its own, so each peak RSS is that process's alone.

    python benchmarks/bench_scale.py --json benchmarks/results/scale_cpu.json
    python benchmarks/bench_scale.py --only topk --device cuda --json benchmarks/results/topk_cuda_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run_featurize(processes: int, n_train: int, kind: str, dim: int, folder: Path) -> dict:
    """One featurize run under torchrun; returns rank 0's summary (all ranks gathered) and peak RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", "-m", "tda_explorer",
           "featurize", "--model", "transformer", "--n-train", str(n_train), "--out", str(folder),
           "--projection-kind", kind, "--projection-dim", str(dim), "--shard-rows", "512", "--epochs", "1"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    ranks = summary["ranks"]
    seconds = max(r["seconds"] for r in ranks)
    rows = sum(r["rows_written"] for r in ranks)
    return {"processes": processes, "n_train": n_train, "projection": kind, "dim": dim, "rows": rows,
            "featurize_seconds": seconds, "examples_per_second": rows / seconds, "wall_seconds": wall}


def featurize_rows(n_train: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, dim in (("rademacher", 1024), ("logra", 16)):
            one = run_featurize(1, n_train, kind, dim, Path(tmp) / f"{kind}-1")
            two = run_featurize(2, n_train, kind, dim, Path(tmp) / f"{kind}-2")
            two["speedup_vs_1_process"] = two["examples_per_second"] / one["examples_per_second"]
            rows += [one, two]
            print(f"featurize {kind}: {one['examples_per_second']:.0f} ex/s with 1 process, "
                  f"{two['examples_per_second']:.0f} with 2 (x{two['speedup_vs_1_process']:.2f})", flush=True)
    return rows


def memory_rows(sizes: list[int]) -> list[dict]:
    """Peak RSS of a one-process featurisation per n_train (each its own process)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, dim in (("rademacher", 1024), ("logra", 16)):
            for n in sizes:
                code = ("import json, resource, sys; from tda_explorer.cli import main; main(sys.argv[1:]); "
                        "print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
                cmd = [sys.executable, "-c", code, "featurize", "--model", "transformer", "--n-train", str(n),
                       "--out", str(Path(tmp) / f"{kind}-{n}"), "--projection-kind", kind, "--projection-dim",
                       str(dim), "--shard-rows", "512", "--epochs", "1"]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                lines = done.stdout.strip().splitlines()
                summary, peak = json.loads(lines[-2]), json.loads(lines[-1])["peak_rss_mb"]
                rows.append({"n_train": n, "projection": kind, "dim": dim, "peak_rss_mb": peak,
                             "featurize_seconds": summary["seconds"]})
                print(f"featurize {kind} n={n}: peak RSS {peak:.0f} MB", flush=True)
    return rows


def topk_rows(sizes: list[int], device: str, max_memory_mb: int) -> list[dict]:
    rows = []
    for n in sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([str(BIN / "tda-explorer"), "bench", "topk", "--n-train", str(n), "--dim", "1024",
                            "--device", device, "--max-memory-mb", str(max_memory_mb), "--json", out.name],
                           check=True, capture_output=True)
            row = json.loads(Path(out.name).read_text())
        rows.append(row)
        print(f"top-k n={n:,} on {device}: {row['seconds_per_query']:.3f} s/query, "
              f"{row['seconds_per_query_batched']:.4f} batched, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--only", choices=["featurize", "memory", "topk"], default=None)
    parser.add_argument("--n-train", type=int, default=8192, help="featurisation throughput: training examples")
    parser.add_argument("--memory-sizes", default="2048,8192,32768")
    parser.add_argument("--topk-sizes", default="10000,100000,1000000")
    parser.add_argument("--device", default="cpu", help="top-k device")
    parser.add_argument("--max-memory-mb", type=int, default=16, help="top-k chunk budget")
    args = parser.parse_args()
    result = {"device": args.device, "cpu_count": os.cpu_count()}
    path = Path(args.json)
    if path.exists():  # keep the parts not re-measured
        result = {**json.loads(path.read_text()), **result}
    if args.only in (None, "featurize"):
        result["featurize"] = featurize_rows(args.n_train)
    if args.only in (None, "memory"):
        result["memory"] = memory_rows([int(n) for n in args.memory_sizes.split(",")])
    if args.only in (None, "topk"):
        result["topk"] = topk_rows([int(n) for n in args.topk_sizes.split(",")], args.device, args.max_memory_mb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
