"""Retraining your own model: "what if I remove these?" answered by your own training function.

``retrain(train_ids, seed) -> nn.Module`` trains a fresh model on the training examples ``train_ids`` (a list of
ids of the session's training set) with ``seed``, the way the original model was trained. Every removal model is
*paired* with a full-data model of the same seed, so the difference is the removal's effect and not the seed's;
the spread of that difference across seeds is reported beside it, so a change smaller than the seed noise reads as
what it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.engine.task import AttributionTask, call_model, eval_mode
from tda_explorer.data.batching import Batch
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import JobCancelled, check_cancelled, report_progress
from tda_explorer.retraining.retrainer import RemovalEffect

RetrainFunction = Callable[[list, int], nn.Module]


def check_architecture(model: Any, reference: nn.Module, argument: str = "retrain") -> nn.Module:
    """``model`` if it is an ``nn.Module`` with ``reference``'s parameter names and shapes, else a ``TDAError``."""
    if not isinstance(model, nn.Module):
        raise TDAError(f"{argument} must return an nn.Module (the retrained model), got {type(model).__name__}")
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:5]
        raise TDAError(f"{argument} returned another architecture than the session's model: parameters {differ} "
                       "differ in name or shape; return a model built like the one attributed")
    return model


class FunctionRetrainer:
    """Retrains with the user's ``retrain(train_ids, seed)`` and measures the session's test set.

    Parameters
    ----------
    retrain : callable (train_ids: list, seed: int) -> nn.Module
    train, test : AttributionDataset
        The session's data (``train_ids`` are ids of ``train``).
    task : AttributionTask
        Its model is the architecture every retrained model must have; its measurement is what is compared.
    seeds : sequence of int
        Paired seeds (at least two, so the seed noise can be shown).
    device : str or torch.device
        Where the test set is measured.
    """

    def __init__(self, retrain: RetrainFunction, train: AttributionDataset, test: AttributionDataset,
                 task: AttributionTask, seeds: Sequence[int] = (0, 1), device: str | torch.device | None = None):
        if not callable(retrain):
            raise TDAError(f"retrain must be a function (train_ids, seed) -> nn.Module, got {type(retrain).__name__}")
        self.retrain, self.train, self.test, self.task = retrain, train, test, task
        self.seeds = [int(s) for s in seeds]
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise TDAError(f"seeds must be at least two distinct seeds (the noise between them is shown beside each "
                           f"effect), got {list(seeds)}")
        self.device = as_device(device)
        self._full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _model(self, train_ids: list, seed: int) -> nn.Module:
        try:
            model = self.retrain(list(train_ids), seed)
        except (JobCancelled, TDAError):
            raise
        except Exception as err:
            raise TDAError(f"retrain failed for seed {seed} on {len(train_ids)} training examples: "
                           f"{type(err).__name__}: {err}") from err
        return check_architecture(model, self.task.model)

    def _measure(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Test measurements and correctness ``[n_test]`` of ``model``, batch by batch (tensor or dict inputs, in
        memory or read lazily; the task's ``output`` picks the logits)."""
        restore = eval_mode(model)
        model.to(self.device)
        values, correct = [], []
        try:
            with torch.no_grad():
                for _, inputs, labels in self.test.batches(device=self.device):
                    outputs = call_model(model, inputs)
                    values.append(self.task.test_measurement(outputs, Batch(inputs, labels)).double().cpu())
                    correct.append((self.task.logits(outputs).argmax(-1) == labels).double().cpu())
        finally:
            restore()
        return torch.cat(values), torch.cat(correct)

    def remove(self, groups: Sequence[Sequence[Any]]) -> RemovalEffect:
        """Retrain without each group for every seed (and the full set once per seed); reports progress and honours
        cancellation when run in a ``BackgroundJob``."""
        groups = [list(g) for g in groups]
        if not groups or any(not g for g in groups):
            raise TDAError("groups must be non-empty lists of training ids")
        for g, group in enumerate(groups):
            self.train.positions(group, f"groups[{g}]")  # unknown ids named
        t0 = time.perf_counter()
        ids = list(self.train.ids)
        total = len(self.seeds) * (len(groups) + 1)
        done = 0
        n_test = len(self.test)
        per_seed = torch.zeros(len(self.seeds), len(groups), n_test, dtype=torch.float64)
        acc_per_seed = torch.zeros(len(self.seeds), len(groups), dtype=torch.float64)
        full = torch.zeros(len(self.seeds), n_test, dtype=torch.float64)
        acc_full = torch.zeros(len(self.seeds), dtype=torch.float64)
        for s, seed in enumerate(self.seeds):
            if seed not in self._full:
                check_cancelled()
                self._full[seed] = self._measure(self._model(ids, seed))
            done += 1
            report_progress(done / total, f"retrained {done} of {total} models")
            full[s], correct_full = self._full[seed]
            acc_full[s] = correct_full.mean()
            for g, group in enumerate(groups):
                check_cancelled()
                removed = set(group)
                values, correct = self._measure(self._model([i for i in ids if i not in removed], seed))
                per_seed[s, g] = values - full[s]
                acc_per_seed[s, g] = correct.mean() - acc_full[s]
                done += 1
                report_progress(done / total, f"retrained {done} of {total} models")
        return RemovalEffect(groups, list(self.test.ids), per_seed.mean(0), self.seeds, time.perf_counter() - t0,
                             full.mean(0), float(acc_full.mean()), acc_per_seed.mean(0),
                             loss_delta_per_seed=per_seed.mean(2), accuracy_delta_per_seed=acc_per_seed)
