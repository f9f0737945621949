"""Seeded label noise with the ground-truth mask kept for evaluation."""

from __future__ import annotations

import torch

from tda_explorer._validation import check_fraction


def flip_labels(
    labels: torch.Tensor, fraction: float, n_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``fraction`` of ``labels`` to a uniformly random *other* class.

    Returns
    -------
    noisy : Tensor [n]
        The labels with exactly ``round(fraction * n)`` of them changed.
    flipped : BoolTensor [n]
        True where the label was changed.
    """
    fraction = check_fraction(fraction, "noise", inclusive_zero=True)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    n_flip = int(round(fraction * n))
    chosen = torch.randperm(n, generator=gen)[:n_flip]
    offsets = torch.randint(1, n_classes, (n_flip,), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + offsets) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[chosen] = True
    return noisy, flipped


def confuse_pairs(
    labels: torch.Tensor, fraction: float, n_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-pair confusions: classes are paired (0↔1, 2↔3, …; an odd last class stays clean) and ``fraction`` of
    each paired class's examples take the other class of its pair, as annotators confuse look-alike classes.

    Returns ``(noisy, flipped)`` as ``flip_labels``.
    """
    fraction = check_fraction(fraction, "noise", inclusive_zero=True)
    gen = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flipped = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(2 * (n_classes // 2)):
        rows = (labels == c).nonzero().flatten()
        chosen = rows[torch.randperm(len(rows), generator=gen)[: int(round(fraction * len(rows)))]]
        noisy[chosen] = c + 1 if c % 2 == 0 else c - 1
        flipped[chosen] = True
    return noisy, flipped
