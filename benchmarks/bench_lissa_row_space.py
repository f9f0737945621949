"""if-lissa's runs in the row space of the GGN's factor (where ``_series`` takes it) against the same runs in parameter
space, at default settings on the zoo tasks whose products go through the factor: CPU seconds of fit, attribute and
self-influence, LDS against the task's truth, and the relative difference of the two forms' scores
(benchmarks/README.md, "LiSSA in the factor's row space").

    OMP_NUM_THREADS=1 python benchmarks/bench_lissa_row_space.py --json benchmarks/results/lissa_row_space_cpu.json \\
        [--task T ...]
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rowfile import run_over_tasks  # noqa: E402

from tda_explorer.compute.methods import get_method  # noqa: E402
from tda_explorer.compute.methods.influence import lissa  # noqa: E402
from tda_explorer.evaluate.harness import method_options  # noqa: E402
from tda_explorer.evaluate.metrics import lds  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth  # noqa: E402

TASKS = ("reviews-transformer-adam", "shapes32-cnn-sgd", "shapes16-cnn-bn-sgdm", "synth20-mlp-tanh-sgd",
         "wine-mlp-adam", "synth200-mlp-adamw")


def _parameter_space(self, b: torch.Tensor) -> lissa.ParameterSeries:
    return lissa.ParameterSeries(self.products_, b)


def measure(task: str, form: str) -> tuple[dict, torch.Tensor]:
    """One row: fit, attribute the test set and self-influence at the defaults, iterating in ``form``."""
    exp = build_zoo_task(task)
    truth = zoo_ground_truth(exp)
    config, _ = method_options(exp, "if-lissa", device="cpu")
    patch = mock.patch.object(lissa.LiSSAInfluence, "_series", _parameter_space) if form == "parameter" \
        else contextlib.nullcontext()
    with patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = get_method("if-lissa", exp.task(), device="cpu", **config)
        t0 = time.process_time()
        method.fit(exp.split.train)
        t1 = time.process_time()
        scores = method.attribute(exp.split.test).scores
        t2 = time.process_time()
        method.self_influence()
        t3 = time.process_time()
    return {"task": task, "form": form, "row_space": method._gram is not None,
            "lds": lds(scores, truth.masks, truth.measurements)[0], "residual": method.residual_,
            "fit_s": t1 - t0, "attribute_s": t2 - t1, "self_influence_s": t3 - t2}, scores


def rows(task: str) -> list[dict]:
    """The task's two rows, each with the relative difference of the two forms' scores."""
    shipped, default = measure(task, "default")
    params, reference = measure(task, "parameter")
    params["score_difference"] = shipped["score_difference"] = float((default - reference).norm() / reference.norm())
    return [shipped, params]


def main() -> None:
    run_over_tasks(__doc__, TASKS, rows)

if __name__ == "__main__":
    main()
