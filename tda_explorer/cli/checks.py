"""``tda-explorer bench`` and ``stress``: benchmark and crash-safety code from benchmarks/ of the checkout."""

from __future__ import annotations

import argparse
import sys

from tda_explorer.cli.common import _checked_output, _json_argument, _write_result, benchmark_module


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks run through the CLI (``explorer``: selection latency at scale; ``topk``: streaming top-k;
    ``session``: a session and explorer over generated images at scale, peak memory and first panel)."""
    if args.json:
        _checked_output(args.json)
    if args.what == "topk":
        result = benchmark_module("bench_topk").bench_topk(
            n_train=args.n_train, dim=args.dim, k=args.k, batch=args.batch, max_memory=args.max_memory_mb * 2**20,
            folder=args.folder, device=args.device)
    elif args.what == "session":
        result = benchmark_module("bench_session").bench_session(
            n_train=args.n_train, n_test=args.n_test or 10_000, device=args.device, folder=args.folder,
            log=sys.stderr)
    else:
        result = benchmark_module("bench_explorer").bench_explorer(n_train=args.n_train, n_test=args.n_test or 200)
    return _write_result(result, args.json)


def cmd_stress(args: argparse.Namespace) -> int:
    """Crash-safety stress tests (``flags``: SIGKILL during flag writes; ``--damage``: damaged files too)."""
    if args.json:
        _checked_output(args.json)
    # damage= only when asked, so the call also works with a stress_flags that predates the keyword
    extra = {"damage": True} if args.damage else {}
    result = benchmark_module("stress_flags").stress_flags(trials=args.trials, writes=args.writes, seed=args.seed,
                                                           **extra)
    _write_result(result, args.json)
    return 0 if result["lost"] == 0 and result.get("integrity_failures", 0) == 0 else 1


def _bench_arguments(bench: argparse.ArgumentParser, method: str | None = None) -> None:
    bench.add_argument("what", choices=["explorer", "topk", "session"],
                       help="explorer: selection latency of the explorer at scale; topk: streaming top-k over a "
                            "generated feature store; session: a small ResNet on generated images, three methods "
                            "in a session, peak memory and the time to the explorer's first panel")
    bench.add_argument("--n-train", type=int, default=50_000, help="training examples (default 50000)")
    bench.add_argument("--n-test", type=int, default=None,
                       help="explorer, session: test examples (default 200 for explorer, 10000 for session)")
    bench.add_argument("--dim", type=int, default=1024, help="topk: stored feature dimension")
    bench.add_argument("--k", type=int, default=10, help="topk: proponents and opponents per query")
    bench.add_argument("--batch", type=int, default=16, help="topk: queries sharing one pass")
    bench.add_argument("--max-memory-mb", type=int, default=16, help="topk: memory budget of one chunk")
    bench.add_argument("--folder", default=None,
                       help="topk, session: where the store / session folder is written (temporary)")
    bench.add_argument("--device", default="cpu", help="topk, session: where it runs (cpu, cuda)")
    _json_argument(bench)
    bench.set_defaults(func=cmd_bench)


def _stress_arguments(stress: argparse.ArgumentParser, method: str | None = None) -> None:
    stress.add_argument("what", choices=["flags"],
                        help="flags: SIGKILL a process writing flags, then check every acknowledged write survived")
    stress.add_argument("--trials", type=int, default=100, help="kill-and-audit rounds (default 100)")
    stress.add_argument("--writes", type=int, default=1000, help="flag writes per trial (default 1000)")
    stress.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    stress.add_argument("--damage", action="store_true",
                        help="also damage the database, the WAL and the journal between trials; every acknowledged "
                             "write must come back")
    _json_argument(stress)
    stress.set_defaults(func=cmd_stress)
