"""The built-in task a command trains: its model, label noise and seed arguments."""

from __future__ import annotations

import argparse

from tda_explorer.experiments.digits import EXPERIMENT_MODELS, TEXT_MODELS


def _data_name(model: str) -> str:
    """What a built-in model trains on."""
    return "generated reviews" if model in TEXT_MODELS else "digits"


def _model_argument(parser: argparse.ArgumentParser) -> None:

    text = ", ".join(TEXT_MODELS)
    parser.add_argument("--model", default="mlp", choices=EXPERIMENT_MODELS,
                        help=f"the built-in model to train (default mlp; {text} trains on generated reviews, the "
                             "others on the 8x8 digits)")


def _task_arguments(parser: argparse.ArgumentParser) -> None:
    """The built-in digits task a sharded store belongs to (model, label noise, seed)."""
    _model_argument(parser)
    parser.add_argument("--noise", type=float, default=0.0, help="fraction of training labels flipped (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, label noise and training")
