"""``tda-explorer methods``: the method catalogue, each method's family, needs and options."""

from __future__ import annotations

import argparse
import json

from tda_explorer.cli.common import _checked_output, _json_argument, _plain
from tda_explorer.compute.catalogue import CATALOGUE


def cmd_methods(args: argparse.Namespace) -> int:
    """Print the method catalogue: each method's family, needs and options; ``--json FILE`` writes it."""
    if args.json:
        _checked_output(args.json)
    rows = [CATALOGUE[name].describe() for name in sorted(CATALOGUE)]
    if args.json:
        _checked_output(args.json).write_text(json.dumps({"methods": rows}, indent=2, default=str))
    for row in rows:
        needs = f"  needs: {', '.join(row['needs'])}" if row["needs"] else ""
        print(f"{row['name']:<16} {row['family']:<34}{needs}")
        if args.verbose:
            for a in row["arguments"]:
                flag = "--" + a["name"].replace("_", "-")
                print(f"    {flag:<24} {a['type']:<16} default {a['default']!s:<10} {_plain(a['help'])}")
    return 0


def _methods_arguments(methods: argparse.ArgumentParser, method: str | None = None) -> None:
    _json_argument(methods, "the catalogue")
    methods.add_argument("-v", "--verbose", action="store_true", help="also list every method's options")
    methods.set_defaults(func=cmd_methods)
