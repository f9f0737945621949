"""The ``tda-explorer`` command line: ``demo`` (the main job), ``evaluate`` (machine-readable), and the rest.

One module per command (``cli/demo.py``, ``cli/evaluate.py``, …), each importing what it needs at its top; this one
imports nothing heavy, and loads a command's module only when argv names that command (``build_parser(method,
commands=...)``), so ``tda-explorer --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from tda_explorer import __version__
from tda_explorer.cli.common import _checked_output, _progress, benchmark_module
from tda_explorer.errors import TDAError

#: What ``tda-explorer --help`` says above the commands (plain text: argparse shows it as is).
DESCRIPTION = ("Interactive training data attribution: which training data made the model do that. "
               "Run 'tda-explorer COMMAND --help' for a command's options.")

#: Each subcommand: its one-line help, its description and what adds its arguments (only when it is used).
COMMANDS = {
    "demo": ("the digits demo: find mislabeled training data and proponents",
             "Train a small model on digits with flipped labels, attribute it, and print the training examples most "
             "likely mislabeled and one test example's proponents and opponents; the tables go to --out.",
             ("demo", "_demo_arguments")),
    "evaluate": ("evaluate one method on a built-in task or your own (--entry); JSON out",
                 "Run one method of the catalogue on a built-in task and print its metrics as JSON (LDS against "
                 "retrained subsets, mislabel detection, time), or with --entry module:function on your own model "
                 "and data (each test point's top-k, the self-influence ranking, time, and with a retrain function "
                 "a removal check). Progress goes to stderr. --method NAME --help also lists that method's options.",
                 ("evaluate", "_evaluate_arguments")),
    "methods": ("the method catalogue: families, needs and options",
                "List every method of the catalogue with its family and needs (-v: and options).",
                ("methods", "_methods_arguments")),
    "featurize": ("sharded, resumable featurisation (torchrun -m tda_explorer featurize)",
                  "Project each training example's gradient (a built-in task's, or with --entry module:function "
                  "your own model's) and store the features in resumable shards; run under torchrun to split the "
                  "work over ranks.",
                  ("sharded", "_featurize_arguments")),
    "score": ("top-k proponents/opponents against a sharded feature store",
              "Score test points against a feature store written by featurize and print each one's top-k proponents "
              "and opponents as JSON.",
              ("sharded", "_score_arguments")),
    "bench": ("benchmarks: explorer selection latency, streaming top-k",
              "Benchmarks from benchmarks/ of a source checkout; the result is printed as JSON.",
              ("checks", "_bench_arguments")),
    "stress": ("crash-safety stress tests",
               "Crash-safety stress tests from benchmarks/ of a source checkout; exits 1 when an acknowledged write "
               "was lost.",
               ("checks", "_stress_arguments")),
}


def build_parser(method: str | None = None, commands=None) -> argparse.ArgumentParser:
    """The command line; ``method`` (the ``--method`` given, if any) adds that method's options to ``evaluate``.

    ``commands``: the subcommands whose arguments are built (None: all). Building ``demo``, ``evaluate`` or
    ``methods`` loads torch and the method catalogue; the top-level parser with no command built loads neither.
    """
    parser = argparse.ArgumentParser(prog="tda-explorer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"tda-explorer {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                                help="one of the commands below")
    for name, (summary, description, add_arguments) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=description)
        if commands is None or name in commands:  # a command's module (and what it imports) loads only here
            module, function = add_arguments
            getattr(import_module(f"tda_explorer.cli.{module}"), function)(command, method)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the top-level parser has no option taking a value, so the first word that is not an option names the command
    command = next((word for word in argv if not word.startswith("-")), None)
    method = None
    if command == "evaluate":
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--method")
        method = first.parse_known_args(argv)[0].method
    args = build_parser(method, commands={command} & set(COMMANDS)).parse_args(argv)
    try:
        return args.func(args)
    except TDAError as err:
        print(f"tda-explorer: error: {err}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "benchmark_module", "_checked_output", "_progress"]
