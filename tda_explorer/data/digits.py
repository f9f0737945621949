"""scikit-learn's digits (ships inside the package): the embedded default dataset."""

from __future__ import annotations

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.data.dataset import AttributionDataset, DataSplit
from tda_explorer.data.noise import flip_labels
from tda_explorer.data.renderers import ImageRenderer


def load_digits_split(
    n_train: int = 1000, n_test: int = 300, noise: float = 0.0, seed: int = 0
) -> DataSplit:
    """The 8×8 digits, pixels scaled to [0, 1], shuffled with ``seed`` and split.

    Parameters
    ----------
    n_train, n_test : int
        Split sizes (together at most 1,797).
    noise : float
        Fraction of training labels flipped to another class (seeded); the mask is kept.
    seed : int
        Seed of the shuffle and of the noise.
    """
    from sklearn.datasets import load_digits

    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    digits = load_digits()
    total = len(digits.target)
    if n_train + n_test > total:
        raise TDAError(f"n_train + n_test must be at most {total}, got {n_train} + {n_test}")
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    names = [str(c) for c in range(10)]
    renderer = ImageRenderer((8, 8))
    clean = y[tr]
    noisy, flipped = flip_labels(clean, noise, 10, seed=seed + 1)
    train = AttributionDataset(x[tr], noisy, list(range(n_train)), names, renderer, "digits-train")
    test = AttributionDataset(x[te], y[te], list(range(n_test)), names, renderer, "digits-test")
    return DataSplit(train, test, flipped, clean)


def load_augmented_digits(n_train: int = 20_000, n_test: int = 500, side: int = 32, seed: int = 0) -> DataSplit:
    """A larger synthetic image task: digits upscaled to ``side``×``side`` with random shifts,
    scalings and pixel noise (seeded). Generated here; nothing is downloaded.
    """
    from sklearn.datasets import load_digits

    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    digits = load_digits()
    base = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    total = n_train + n_test
    pick = torch.randint(0, len(base), (total,), generator=gen)
    scale = 0.8 + 0.4 * torch.rand(total, generator=gen)
    shift = (torch.rand(total, 2, generator=gen) - 0.5) * 0.3
    theta = torch.zeros(total, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    images = []
    for start in range(0, total, 2048):
        rows = slice(start, min(start + 2048, total))
        src = torch.nn.functional.interpolate(base[pick[rows]], size=(side, side), mode="bilinear", align_corners=False)
        grid = torch.nn.functional.affine_grid(theta[rows], [len(src), 1, side, side], align_corners=False)
        images.append(torch.nn.functional.grid_sample(src, grid, align_corners=False))
    x = torch.cat(images).flatten(1)
    x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    y = labels[pick]
    names = [str(c) for c in range(10)]
    renderer = ImageRenderer((side, side))
    train = AttributionDataset(x[:n_train], y[:n_train], list(range(n_train)), names, renderer, f"digits{side}-train")
    test = AttributionDataset(x[n_train:], y[n_train:], list(range(n_test)), names, renderer, f"digits{side}-test")
    return DataSplit(train, test, torch.zeros(n_train, dtype=torch.bool), y[:n_train])
