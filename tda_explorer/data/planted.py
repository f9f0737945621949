"""A planted pool for targeted selection: digits seen through several transformations (sources), with a small
target set and a held-out target test set drawn from one of them. Generated here; nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.renderers import ImageRenderer

#: The sources: each maps 8×8 images ``[n, 8, 8]`` in [0, 1] to another view of the same digits.
SOURCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": lambda x: x,
    "inverted": lambda x: 1 - x,
    "transposed": lambda x: x.transpose(1, 2),
    "upside-down": lambda x: x.flip(1),
}


@dataclass
class PlantedPool:
    """``pool`` mixes every source (``source[i]`` names example i's); ``target`` and ``target_test`` come from
    ``target_source`` only, from images the pool never shows."""

    pool: AttributionDataset
    source: list[str]
    target: AttributionDataset
    target_test: AttributionDataset
    target_source: str


def load_planted_pool(n_pool: int = 2400, n_target: int = 20, n_test: int = 400, target_source: str = "inverted",
                      seed: int = 0) -> PlantedPool:
    """Digits images split into pool images and held-out images; every pool example is a pool image seen through
    a random source, the target (``n_target``) and target test (``n_test``) examples are held-out images seen
    through ``target_source``."""
    from sklearn.datasets import load_digits

    if target_source not in SOURCES:
        raise TDAError(f"target_source must be one of {', '.join(SOURCES)}, got {target_source!r}")
    n_pool, n_target, n_test = (check_positive_int(v, k) for v, k in
                                ((n_pool, "n_pool"), (n_target, "n_target"), (n_test, "n_test")))
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if n_target + n_test >= len(images):
        raise TDAError(f"n_target + n_test must leave pool images among the {len(images)} digits")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    held, pool_images = order[: n_target + n_test], order[n_target + n_test:]
    pick = pool_images[torch.randint(len(pool_images), (n_pool,), generator=gen)]
    names = list(SOURCES)
    which = torch.randint(len(names), (n_pool,), generator=gen)
    x = torch.empty(n_pool, 8, 8)
    for s, name in enumerate(names):
        rows = which == s
        x[rows] = SOURCES[name](images[pick[rows]])
    classes = [str(c) for c in range(10)]
    renderer = ImageRenderer((8, 8))
    pool = AttributionDataset(x.flatten(1), labels[pick], list(range(n_pool)), classes, renderer, "planted-pool")
    view = SOURCES[target_source](images[held]).flatten(1)
    target = AttributionDataset(view[:n_target], labels[held[:n_target]], list(range(n_target)), classes, renderer,
                                f"target-{target_source}")
    test = AttributionDataset(view[n_target:], labels[held[n_target:]], list(range(n_test)), classes, renderer,
                              f"target-{target_source}-test")
    return PlantedPool(pool, [names[i] for i in which.tolist()], target, test, target_source)
