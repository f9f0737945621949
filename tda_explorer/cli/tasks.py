"""The built-in task a command trains: its model, label noise and seed arguments."""

from __future__ import annotations

import argparse

from tda_explorer.experiments.digits import EXPERIMENT_MODELS, TEXT_MODELS

#: The built-in task flags of featurize and score with their defaults; they are parsed with default None so that
#: ``--entry`` can refuse the ones given (``entry.refuse_with_entry``) and the built-in path fills the rest.
TASK_DEFAULTS = {"model": "mlp", "noise": 0.0, "seed": 0}


def _data_name(model: str) -> str:
    """What a built-in model trains on."""
    return "generated reviews" if model in TEXT_MODELS else "digits"


def _model_argument(parser: argparse.ArgumentParser, default: str | None = "mlp") -> None:
    """``--model``; ``default=None`` leaves it None when not given (the default mlp is filled in later)."""
    text = ", ".join(TEXT_MODELS)
    parser.add_argument("--model", default=default, choices=EXPERIMENT_MODELS,
                        help=f"the built-in model to train (default mlp; {text} trains on generated reviews, the "
                             "others on the 8x8 digits)")


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    """The built-in digits task a sharded store belongs to (model, label noise, seed); parsed with default None
    (``TASK_DEFAULTS`` holds the defaults)."""
    _model_argument(parser, default=None)
    parser.add_argument("--noise", type=float, default=None, help="fraction of training labels flipped (default 0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the data split, label noise and training (default 0)")
