"""The retraining engine: what actually happens to the test measurements when training examples are removed.

Every removal model is *paired* with a full-data model of the same seed: same initialisation and the same
batches, with the removed examples' terms dropped from the steps they were in (``train_weighted``). That pairing
removes most of the seed noise from small effects. Several seeds average fresh-seed noise on top (``seeds``); with
one seed the answer is the same-seed (trajectory-specific) truth. Groups of any size train together in lock-step
(``vmap``), which is how one CPU retrains hundreds of models; results are cached on disk by a fingerprint of the
recipe, the measurement, the seeds and the removed examples, so asking again is free.

It is the ground truth for the removal estimators (influence functions, synset leave-one-out) and backs the
explorer's "what if I remove these?" check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, check_choice, check_positive_int
from tda_explorer.atomic import load_tensors, save_tensors
from tda_explorer.compute.engine.fingerprint import config_fingerprint
from tda_explorer.compute.engine.task import MEASUREMENTS, AttributionTask
from tda_explorer.compute.training.train import TrainConfig, stacked_outputs, train_weighted
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class RemovalEffect:
    """``delta[g, j]``: change of test measurement j when group g is removed (removed − full, seed-averaged).

    Positive = the removal raised the (loss-oriented) measurement, i.e. the group was a proponent.
    """

    groups: list[list[Any]]
    test_ids: list[Any]
    delta: torch.Tensor
    seeds: list[int]
    seconds: float
    full: torch.Tensor  # [n_test]: the paired full models' measurements (seed-averaged)
    accuracy_full: float
    accuracy_delta: torch.Tensor  # [n_groups]: test accuracy without the group minus with it
    loss_delta_per_seed: torch.Tensor | None = None  # [n_seeds, n_groups]: mean test measurement change, per seed
    accuracy_delta_per_seed: torch.Tensor | None = None  # [n_seeds, n_groups]: test accuracy change, per seed

    def summary(self, group: int = 0) -> dict[str, float]:
        """Group ``group``'s change of the mean test measurement and of test accuracy, each with its spread across
        the paired seeds (NaN where the per-seed values were not kept, or with one seed)."""
        spread = lambda per_seed: (float(per_seed[:, group].std()) if per_seed is not None and len(per_seed) > 1
                                   else float("nan"))
        return {"loss_delta": float(self.delta[group].mean()), "loss_delta_seed_std": spread(self.loss_delta_per_seed),
                "accuracy_delta": float(self.accuracy_delta[group]),
                "accuracy_delta_seed_std": spread(self.accuracy_delta_per_seed)}

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: ``group, group_size, test_id, delta``."""
        g, j = torch.meshgrid(torch.arange(len(self.groups)), torch.arange(len(self.test_ids)), indexing="ij")
        return pd.DataFrame({
            "group": g.flatten().numpy(),
            "group_size": [len(self.groups[i]) for i in g.flatten().tolist()],
            "test_id": [self.test_ids[i] for i in j.flatten().tolist()],
            "delta": self.delta.flatten().numpy(),
        })


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, which is all a retrainer needs: a model factory (seed -> fresh ``nn.Module``), the
    training configuration, the training data and the test data measured. ``name`` identifies the factory in cache
    keys (give each architecture its own); ``convex`` marks models whose optimum does not depend on the start."""

    name: str
    factory: Callable[[int], torch.nn.Module]
    config: TrainConfig
    train: AttributionDataset
    test: AttributionDataset
    convex: bool = False

    def fingerprint(self) -> str:
        """Hash of the data, the name and the configuration (not of any trained weights)."""
        return config_fingerprint(self.name, self.config.to_dict(), self.train.fingerprint(), self.test.fingerprint())


class Retrainer:
    """Retrains a recipe's model without chosen training examples.

    Parameters
    ----------
    recipe : Recipe, or an experiment (anything with ``recipe()``)
        Model factory, training configuration and data.
    measurement : {"loss", "margin"}
        What is measured on each test example (loss-oriented).
    seeds : sequence of int, optional
        Initialisation/batch-order seeds averaged over (default: the experiment's own seed only).
    cache_dir : str or Path, optional
        Where results are kept between calls and sessions (None: no cache).
    device : str
    chunk : int
        Models trained together in one lock-step ensemble (memory ∝ chunk).
    warm_start_epochs : int, optional
        Convex models only (the built-in ``lr``): start every removal model *and its control* at the full model's
        trained parameters and train this many epochs, instead of the whole recipe from the initialisation. Both
        converge to their optima, so the paired difference is the removal effect at a fraction of the cost.
    processes : int
        Worker processes sharing the chunks of a large request (each with one torch thread); 1 = in process.
    """

    def __init__(self, recipe: Recipe | Any, measurement: str = "loss", seeds: Sequence[int] | None = None,
                 cache_dir: str | Path | None = None, device: str = "cpu", chunk: int = 64,
                 warm_start_epochs: int | None = None, processes: int = 1):
        recipe = recipe.recipe() if hasattr(recipe, "recipe") else recipe
        if not isinstance(recipe, Recipe):
            raise TDAError(f"recipe must be a Recipe (or an experiment with recipe()), got {type(recipe).__name__}")
        self.recipe = recipe
        self.measurement = check_choice(measurement, "measurement", MEASUREMENTS)
        self.seeds = [recipe.config.seed] if seeds is None else [int(s) for s in seeds]
        if not self.seeds:
            raise TDAError("seeds must name at least one seed")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device = device
        self.chunk = check_positive_int(chunk, "chunk")
        self.processes = check_positive_int(processes, "processes")
        self.warm_start_epochs = None
        if warm_start_epochs is not None:
            if not recipe.convex:
                raise TDAError(
                    f"warm_start_epochs is only valid for convex models (the built-in 'lr'), not "
                    f"{recipe.name!r}: a warm-started network stays in the full model's basin and "
                    "understates removal effects; leave it None to retrain from the initialisation"
                )
            self.warm_start_epochs = check_positive_int(warm_start_epochs, "warm_start_epochs")
        self._full: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warm_init: dict[int, dict[str, torch.Tensor]] = {}

    def _measure(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Test measurements and correctness ``[M, n_test]`` of stacked models."""
        test = self.recipe.test
        template = self.recipe.factory(0)
        out = stacked_outputs(template, params, test.inputs, self.device)
        y = test.labels.to(out.device)
        measure = AttributionTask(template, measurement=self.measurement).test_measurement
        values = measure(out.flatten(0, 1), y.repeat(out.shape[0])).view(out.shape[0], -1)
        return values.double().cpu(), (out.argmax(-1) == y).double().cpu()

    def _factory_and_config(self, seed: int):
        """How each model starts and how long it trains: the recipe, or a warm start at the full optimum."""
        if self.warm_start_epochs is None:
            return self.recipe.factory, self.recipe.config
        if seed not in self._warm_init:
            train = self.recipe.train
            params = train_weighted(self.recipe.factory, train.inputs, train.labels,
                                    torch.ones(1, len(train)), self.recipe.config, [seed], device=self.device)
            self._warm_init[seed] = {k: v[0].cpu() for k, v in params.items()}
        init = self._warm_init[seed]

        def factory(_: int) -> torch.nn.Module:
            model = self.recipe.factory(seed)
            model.load_state_dict(init)
            return model

        return factory, replace(self.recipe.config, epochs=self.warm_start_epochs)

    def _train(self, weights: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._factory_and_config(seed)  # a warm start's full model is trained here, once, not in each worker
        blocks = [weights[i : i + self.chunk] for i in range(0, len(weights), self.chunk)]
        if self.processes > 1 and len(blocks) > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(self.processes, len(blocks))) as pool:
                parts = pool.starmap(_train_block, [(self, block, seed) for block in blocks])
        else:
            parts = [_train_block(self, block, seed) for block in blocks]
        return torch.cat([v for v, _ in parts]), torch.cat([c for _, c in parts])

    def full_measurements(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired full-data model's test measurements and correctness ``[n_test]`` for ``seed`` (once)."""
        if seed not in self._full:
            values, correct = self._train(torch.ones(1, len(self.recipe.train)), seed)
            self._full[seed] = (values[0], correct[0])
        return self._full[seed]

    def _weights(self, groups: Sequence[Sequence[Any]], fractions: Sequence[Sequence[float]] | None) -> torch.Tensor:
        train = self.recipe.train
        rows = train.group_positions(groups)
        if fractions is not None and len(fractions) != len(rows):
            raise TDAError(f"fractions must have one entry per group ({len(rows)}), got {len(fractions)}")
        weights = torch.ones(len(rows), len(train), dtype=torch.float64)
        for g, positions in enumerate(rows):
            keep = torch.zeros(len(positions), dtype=torch.float64)
            if fractions is not None:
                keep = 1.0 - torch.as_tensor(fractions[g], dtype=torch.float64).expand(len(positions))
                if not bool(((keep >= 0) & (keep <= 1)).all()):
                    raise TDAError(f"fractions[{g}] must be in [0, 1] (the share of each example removed)")
            weights[g, positions] = keep
        return weights

    def remove(self, groups: Sequence[Sequence[Any]], fractions: Sequence[Sequence[float]] | None = None
               ) -> RemovalEffect:
        """Retrain without each group (or with its examples down-weighted by ``fractions``).

        Parameters
        ----------
        groups : list of lists of training ids
        fractions : list of lists of floats in [0, 1], optional
            Share of each listed example's weight removed (default 1: removed outright).

        Returns
        -------
        RemovalEffect
        """
        weights = self._weights(groups, fractions)
        key = None
        groups = [list(g) for g in groups]
        test_ids = list(self.recipe.test.ids)
        if self.cache_dir is not None:
            changed = (weights != 1).nonzero()
            key = config_fingerprint(self.recipe.fingerprint(), self.measurement, self.seeds, len(groups),
                                     changed.tolist(), weights[changed[:, 0], changed[:, 1]].tolist(),
                                     self.warm_start_epochs)
            cached = load_tensors(self.cache_dir / f"retrain-{key}.pt")
            if cached is not None and "accuracy_delta" in cached:
                return RemovalEffect(groups, test_ids, cached["delta"], self.seeds, float(cached["seconds"]),
                                     cached["full"], float(cached["accuracy_full"]), cached["accuracy_delta"],
                                     cached.get("loss_delta_per_seed"), cached.get("accuracy_delta_per_seed"))
        t0 = time.perf_counter()
        delta = torch.zeros(len(groups), len(test_ids), dtype=torch.float64)
        accuracy_delta = torch.zeros(len(groups), dtype=torch.float64)
        full_values = torch.zeros(len(test_ids), dtype=torch.float64)
        accuracy_full = 0.0
        loss_per_seed = torch.zeros(len(self.seeds), len(groups), dtype=torch.float64)
        accuracy_per_seed = torch.zeros(len(self.seeds), len(groups), dtype=torch.float64)
        for s, seed in enumerate(self.seeds):
            values, correct = self._train(weights, seed)
            base_values, base_correct = self.full_measurements(seed)
            loss_per_seed[s] = (values - base_values).mean(1)
            accuracy_per_seed[s] = correct.mean(1) - base_correct.mean()
            delta += values - base_values
            accuracy_delta += accuracy_per_seed[s]
            full_values += base_values
            accuracy_full += float(base_correct.mean())
        k = len(self.seeds)
        delta, accuracy_delta, full_values = delta / k, accuracy_delta / k, full_values / k
        accuracy_full /= k
        seconds = time.perf_counter() - t0
        if key is not None:
            save_tensors({"delta": delta, "seconds": seconds, "full": full_values, "accuracy_full": accuracy_full,
                          "accuracy_delta": accuracy_delta, "loss_delta_per_seed": loss_per_seed,
                          "accuracy_delta_per_seed": accuracy_per_seed}, self.cache_dir / f"retrain-{key}.pt",
                         {"recipe": self.recipe.fingerprint(), "groups": len(groups)})
        return RemovalEffect(groups, test_ids, delta, self.seeds, seconds, full_values, accuracy_full, accuracy_delta,
                             loss_per_seed, accuracy_per_seed)


    def train_on(self, subsets: Sequence[Sequence[Any]]) -> RemovalEffect:
        """Retrain on each subset of training ids alone (everything else removed): the same paired effects."""
        ids = list(self.recipe.train.ids)
        groups = []
        for g, subset in enumerate(subsets):
            keep = set(self.recipe.train.positions(list(subset), f"subsets[{g}]"))
            groups.append([ids[i] for i in range(len(ids)) if i not in keep])
        return self.remove(groups)

def _train_block(retrainer: Retrainer, block: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One lock-step ensemble of ``block``'s rows (module level, so worker processes can run it)."""
    if torch.get_num_threads() > 1 and retrainer.processes > 1:
        torch.set_num_threads(1)
    train = retrainer.recipe.train
    factory, config = retrainer._factory_and_config(seed)
    params = train_weighted(factory, train.inputs, train.labels, block, config, [seed] * len(block),
                            device=retrainer.device)
    return retrainer._measure(params)
