"""Seeded per-example Dropout masks: one member of a dropout ensemble, independent of how examples are batched.

A dropout ensemble (Deng et al. 2024, as dattri runs it) re-activates the Dropout of a trained model and averages
TDA scores over M passes; each pass draws a fresh mask *per example*, for training and test gradients alike and
for TRAK's Q term. Drawing masks from the global RNG inside ``vmap`` would tie each example's mask to the chunk
it falls in (and so to ``max_memory``). Here the mask of example ``i`` under seed ``s`` is a pure function of
``(s, i)``: rows are grouped in fixed blocks of ``BLOCK`` and each block's masks come from a generator seeded by
``(s, block)``. The Dropout modules stay in eval mode (identity) and a forward hook multiplies their output by
the mask, so ``vmap`` needs no randomness at all.

Per-example masks are the only kind offered: on the benchmarks they beat one mask shared by all examples
(benchmarks/README.md, "Design choices measured").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from tda_explorer._validation import TDAError

BLOCK = 256
_CHANNEL_WISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def mask_seed(member: int, test: bool) -> int:
    """The mask seed of ensemble member ``member`` for training rows or for test rows: separate streams, so that
    training example ``i`` and test example ``i`` do not share a mask."""
    return 2 * member + int(test)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's Dropout modules, refusing the kinds a multiplicative mask cannot reproduce."""
    found = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not found:
        raise TDAError("dropout ensemble requested but the model has no Dropout module")
    odd = [type(m).__name__ for m in found if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout))]
    if odd:
        raise TDAError(f"dropout ensembles support nn.Dropout and nn.Dropout1d/2d/3d; the model has {odd[0]}")
    return found


class DropoutMasks:
    """Per-example masks for every Dropout module of ``model`` under ``seed``.

    Parameters
    ----------
    model : nn.Module
        The model; its Dropout modules are found once.
    seed : int
        Which ensemble member: masks differ between seeds and are identical for the same seed.
    probe : callable
        Runs the model (in eval mode) on a batch of one example: it records each Dropout output's shape.
    """

    def __init__(self, model: nn.Module, seed: int, probe: Callable[[], object]):
        self.seed = int(seed)
        self.modules = dropout_modules(model)
        seen: dict[int, list[tuple[int, ...]]] = {id(m): [] for m in self.modules}

        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shape = tuple(output.shape[1:])
            if isinstance(module, _CHANNEL_WISE):
                shape = shape[:1] + (1,) * (len(shape) - 1)
            seen[id(module)].append(shape)

        handles = [m.register_forward_hook(record) for m in self.modules]
        try:
            with torch.no_grad():
                probe()
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != 1 for v in seen.values()):
            raise TDAError("dropout ensembles need every Dropout module to run exactly once per forward pass")
        self.shapes = [seen[id(m)][0] for m in self.modules]
        self._block: tuple[int, list[torch.Tensor]] | None = None

    def _block_masks(self, block: int) -> list[torch.Tensor]:
        if self._block is None or self._block[0] != block:
            # torch's CPU generator keeps only the low 32 bits of a seed: mix (seed, block) into them
            mixed = np.random.SeedSequence([self.seed, block]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(mixed))
            masks = []
            for module, shape in zip(self.modules, self.shapes):
                masks.append(torch.rand((BLOCK, *shape), generator=generator) >= module.p)
            self._block = (block, masks)
        return self._block[1]

    def rows(self, rows: slice, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """One boolean ``[len(rows), *shape]`` keep-mask per Dropout module for examples ``rows``."""
        parts: list[list[torch.Tensor]] = [[] for _ in self.modules]
        for block in range(rows.start // BLOCK, (rows.stop - 1) // BLOCK + 1):
            lo, hi = max(rows.start, block * BLOCK) - block * BLOCK, min(rows.stop, (block + 1) * BLOCK) - block * BLOCK
            for part, mask in zip(parts, self._block_masks(block)):
                part.append(mask[lo:hi])
        return [torch.cat(p).to(device) for p in parts]

    @contextmanager
    def applied(self, current: list[torch.Tensor]) -> Iterator[None]:
        """Within the block, Dropout modules (in eval mode) multiply their output by ``current[j] / (1 − p)``:
        ``current[j]`` holds the caller's keep-masks for module ``j``, batched like the output (``vmap`` too)."""
        order = {id(m): j for j, m in enumerate(self.modules)}

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            scale = 1 / (1 - module.p) if module.p < 1 else 0.0  # as nn.Dropout scales in train mode
            return output * current[order[id(module)]].to(output.dtype) * scale

        handles = [m.register_forward_hook(hook) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
