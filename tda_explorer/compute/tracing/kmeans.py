"""k-means in torch (k-means++ seeding, Lloyd iterations, best of ``n_init`` restarts).

Two-stage tracing clusters the corpus on every fit; scikit-learn's ``KMeans`` gives the same partitions but its
import alone costs about a second on this CPU, a third of the whole tracing budget, so the clustering is done here.
"""

from __future__ import annotations

import torch

from tda_explorer._validation import TDAError, check_positive_int


def _plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance to the
    nearest centre so far."""
    centres = [x[int(torch.randint(len(x), (1,), generator=gen))]]
    nearest = torch.cdist(x, centres[0][None]).squeeze(1).square()
    for _ in range(1, k):
        total = nearest.sum()
        pick = (int(torch.multinomial(nearest / total, 1, generator=gen)) if total > 0
                else int(torch.randint(len(x), (1,), generator=gen)))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, torch.cdist(x, x[pick][None]).squeeze(1).square())
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, n_init: int = 3, seed: int = 0, max_iter: int = 100) -> torch.Tensor:
    """Cluster labels ``[n]`` in ``0..k-1`` of the rows of ``x [n, d]``: the restart with the lowest within-cluster
    sum of squares."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or len(x) == 0:
        raise TDAError(f"x must be a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    k, n_init = check_positive_int(k, "k"), check_positive_int(n_init, "n_init")
    if k > len(x):
        raise TDAError(f"k must be at most the number of points ({len(x)}), got {k}")
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = _plus_plus(x, k, gen)
        labels = None
        for _ in range(max_iter):
            new = torch.cdist(x, centres).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # an emptied centre stays put
        inertia = float((x - centres[labels]).square().sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best
