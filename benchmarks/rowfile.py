"""A benchmark's results file: the run's header and its rows, each row printed and the file rewritten after it, so a
long run that stops keeps what it measured; and the command line of the benches that measure rows task by task."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


class RowFile:
    """``{"device", "torch", "threads", "when", **header, "rows": [...]}`` written to ``path`` (None: print only)."""

    def __init__(self, path: str | None, **header: Any):
        self.path = path
        self.doc = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "when": time.strftime("%Y-%m-%d %H:%M"), **header, "rows": []}

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps(self.doc, indent=1))


def run_over_tasks(description: str, tasks: Sequence[str], rows_of: Callable[[str], Iterable[dict]]) -> None:
    """``--json FILE`` (None: print only) and ``--task T ...`` (default ``tasks``): each task's rows from
    ``rows_of(task)``, added as they come, warnings silenced."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--task", nargs="*", default=list(tasks))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    out = RowFile(args.json)
    for task in args.task:
        for row in rows_of(task):
            out.add(row)
