"""What every command shares: progress on stderr, plain help text, the --json file, the checkout's benchmark
modules.

Light on purpose (no torch): the top-level parser and the bench and stress commands use it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

from tda_explorer.errors import TDAError


def _interactive() -> bool:
    """Whether stderr is a terminal: progress bars only there (redirected, they leave cursor-movement codes)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _progress(iterable, desc: str, total: int | None = None):
    """A tqdm bar on stderr when it is a terminal; disabled (no output at all) when stderr is redirected."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, disable=not _interactive())


def _say(message: str) -> None:
    """One progress line on stderr (stdout keeps the results, e.g. evaluate's JSON)."""
    print(f"tda-explorer: {message}", file=sys.stderr, flush=True)


def _plain(text: str) -> str:
    """``text`` (a docstring or catalogue help) without reST markup: double backticks and :role:`x`."""
    return re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "")


def _help(text: str) -> str:
    """``text`` as an argument's help: plain, with ``%`` escaped (argparse %-formats help strings)."""
    return _plain(text).replace("%", "%%")


def _checked_output(path: str) -> Path:
    """The ``--json`` file to write: its folder must exist (no folder is created for it) and it must not be one."""
    out = Path(path)
    if not out.parent.is_dir():
        raise TDAError(f"--json {path}: the folder {out.parent} does not exist; create it or pick another path")
    if out.is_dir():
        raise TDAError(f"--json {path} is a folder; pass the path of a file to write, e.g. {out / 'result.json'}")
    return out


def _write_result(result: dict, path: str | None) -> int:
    """Print ``result`` as JSON and, with ``--json``, write it there too."""
    text = json.dumps(result, indent=2, default=str)
    if path:
        _checked_output(path).write_text(text)
    print(text)
    return 0


def benchmark_module(name: str):
    """A module of the source checkout's ``benchmarks/`` (benchmark and stress code is not shipped in the package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise TDAError(f"{name} lives in benchmarks/ of a source checkout, not beside this installed package "
                       f"({path.parent} is missing): run it from a clone of tda_explorer")
    spec = importlib.util.spec_from_file_location(f"tda_benchmarks.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json_argument(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", default=None, metavar="FILE",
                        help=f"also write {what} as JSON to FILE (its folder must exist)")
