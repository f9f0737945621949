"""A benchmark's results file: the run's header and its rows, each row printed and the file rewritten after it, so a
long run that stops keeps what it measured."""

from __future__ import annotations

import json
import time
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
