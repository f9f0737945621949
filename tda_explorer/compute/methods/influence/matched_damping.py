"""The Kronecker methods' default damping, matched to the exact curvature on the user's own model.

K-FAC and EK-FAC approximate the curvature layer by layer, and their damping does two jobs: the ridge of the system
(the direct solvers take it from the training run: the SGD recipe's, an Adam run's, or 0.01 × λ_max) and a correction
for what the factorisation gets wrong, which differs from model to model by orders of magnitude, so that no fixed level
holds across models (benchmarks/README.md, "Kronecker damping matched to the exact curvature").

``match_damping`` reads the level off the model: on a random sample of training examples it forms the same Fisher
un-factored (``kfac.fisher_and_gradient_rows``, in the Kronecker eigenbasis), solves the direct solvers' system on it,
``(F + wd + λ) x = g``, exactly for a few probe examples' gradients (through the sample's Gram matrix), and takes the
damping, among relative levels per layer and multiples of λ, at which the Kronecker scores of those probes against
(part of) the sampled examples agree best (mean Pearson correlation) with the exact ones. Every candidate level is
first scored on binned scores (``_BinnedScores``: one pass, eigenvalues in log-spaced bins); the exact scores are then
computed only around each family's best candidate, and refined there.

A small sample's Fisher biases the match toward larger dampings (its λ falls as the sample grows), and the Gram
matrix's size bounds the sample's rows, not its examples: so each example of the expected Fisher gives at most
``MATCH_FISHER_ROWS`` rows (its largest exactly, the rest sketched into one with random signs: the same Fisher in
expectation), and the Fisher sample is larger than the examples scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tda_explorer.compute.engine.kfac import FisherRows, LayerFactors
from tda_explorer.compute.methods.influence.cholesky import cholesky_in_place, cholesky_solve
from tda_explorer.compute.methods.influence.direct import DAMPING_LEVEL

#: Training examples sampled: the exact curvature's Fisher rows come from up to ``MATCH_ROWS`` rows' worth of them (the
#: expected Fisher has C − 1 rows per example, at most ``MATCH_FISHER_ROWS`` of them, the rest sketched), the scores
#: compared are against at most ``MATCH_EXAMPLES`` of them, and the Fisher and gradient rows together take at most
#: ``MATCH_MEMORY`` bytes. 3 rows: benchmarks/README.md, "The match's sample" (2, 3, 4 and C − 1 over the zoo's
#: ten-class tasks and four sample seeds).
MATCH_EXAMPLES, MATCH_ROWS, MATCH_MEMORY, MATCH_FISHER_ROWS = 256, 2048, 48 * 2**20, 3
#: Seed of the sample (and of the sketched rows' signs).
MATCH_SEED = 0
#: Probe examples (of the sample) whose exact and Kronecker scores are compared.
MATCH_PROBES = 64
#: The least number of sampled examples worth matching on.
MATCH_MIN_EXAMPLES = 16
#: Candidate levels, relative to each layer's mean eigenvalue and as multiples of λ: 10^(k/2) for k = -8..6.
CANDIDATES = tuple(10.0 ** (k / 2) for k in range(-8, 7))
#: Golden-section steps refining the best candidate between its neighbours (to 0.618^8, 2%, of that decade).
REFINE_STEPS = 8
#: Eigenvalue bins, over all layers, of the coarse search's approximate scores (their memory: probes × sample × bins).
SCORE_BINS = 64


@dataclass
class DampingMatch:
    """What ``match_damping`` chose and from what: per-layer λ, the candidate family ("relative": × the layer's mean
    eigenvalue, or "absolute": × the exact system's λ) and level, the agreement it reached, the exact system's
    damping and the rule it came from, and the sample."""

    layer_damping: list[float]
    family: str
    level: float
    agreement: float
    exact_damping: float
    exact_rule: str
    examples: int
    probes: int
    fisher_examples: int

    def describe(self) -> str:
        unit = ("× each layer's mean eigenvalue" if self.family == "relative"
                else f"× the exact system's λ {self.exact_damping:.3g}")
        return (f"{self.level:.3g} {unit} (scores' correlation with the exact damped curvature's {self.agreement:.3f} "
                f"on {self.probes} probes × {self.examples} sampled training examples, the curvature from "
                f"{self.fisher_examples}; exact λ from the {self.exact_rule} rule)")


def sample_sizes(n: int, rows_per_example: int, row_numbers: int, itemsize: int) -> tuple[int, int]:
    """How many training examples to sample: for the exact curvature (their Fisher rows, ``rows_per_example`` each,
    at most ``MATCH_ROWS``) and, among them, to score (their gradient rows too: at most ``MATCH_EXAMPLES``), all
    within ``MATCH_MEMORY`` bytes (``row_numbers`` numbers a row, as held: ``kfac.row_numbers``) and ``n``."""
    row = max(1, row_numbers * itemsize)
    scored = min(n, MATCH_EXAMPLES, MATCH_ROWS // rows_per_example, MATCH_MEMORY // ((rows_per_example + 1) * row))
    fisher = min(n, MATCH_ROWS // rows_per_example, (MATCH_MEMORY - scored * row) // (rows_per_example * row))
    return int(max(fisher, scored)), int(scored)


def sample_positions(n: int, fisher: int, scored: int) -> list[int]:
    """Positions of the sampled training examples (seeded, ``MATCH_SEED``): the ``scored`` first, then the rest of
    the ``fisher`` whose Fisher rows the exact curvature takes, each part in training-set order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(MATCH_SEED))
    return torch.cat([order[:scored].sort().values, order[scored:fisher].sort().values]).tolist()


def probe_block(probes: int, width: int, itemsize: int) -> int:
    """Probes handled at once: all of them, fewer where their dense gradients and one scaled copy (``width`` numbers
    each) would exceed ``MATCH_MEMORY`` bytes."""
    return int(max(1, min(probes, MATCH_MEMORY // max(1, 2 * width * itemsize))))


def _largest_eigenvalue(rows: FisherRows, iterations: int = 30) -> float:
    """The largest eigenvalue of ``rowsᵀ rows`` (power iteration, two products with the rows a step)."""
    v = torch.ones(1, rows.width, dtype=torch.float64, device=rows.device)
    value = 0.0
    for _ in range(iterations):
        w = rows.transpose_times(rows.times(v)).double()
        value = float(w.norm())
        if value == 0.0:
            return 0.0
        v = w / value
    return value


def _exact_solver(rows: FisherRows, shift: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rhs ↦ (rowsᵀ rows + shift·I)⁻¹ rhs`` for each row of ``rhs``, exactly, on the smaller side: the ``D × D``
    system where the ``r`` rows are at least as many as they are wide, else through their ``r × r`` Gram matrix
    (Woodbury); factored once, in place, in the rows' precision (formed again in float64 where that fails, the
    first matrix freed before: one ``r × r`` or ``D × D`` matrix at a time)."""
    wide = rows.width > len(rows)

    def factored(dtype: torch.dtype) -> torch.Tensor | None:
        if wide:
            matrix = rows.gram(dtype=dtype)
        else:
            dense = rows.dense().to(dtype)
            matrix = dense.T @ dense
            del dense
        matrix.diagonal().add_(shift)
        return matrix if cholesky_in_place(matrix) == 0 else None

    factor = factored(rows.dtype)
    if factor is None:
        factor = factored(torch.float64)
    if factor is None:
        raise ValueError("the sampled curvature is not positive definite at the exact system's damping")

    def solve(rhs: torch.Tensor) -> torch.Tensor:
        if not wide:
            return cholesky_solve(factor, rhs.T.to(factor)).T.double()
        inner = cholesky_solve(factor, rows.times(rhs).to(factor))
        x = rows.transpose_times(inner).to(rhs.device, torch.float64)
        return x.neg_().add_(rhs).div_(shift)  # (rhs − Rᵀ inner) / shift, in place

    return solve


def _agreement(a: torch.Tensor, b: torch.Tensor, exclude: torch.Tensor) -> float:
    """Mean over rows of the Pearson correlation of ``a`` and ``b`` (each row's entries, the ``exclude`` mask left
    out)."""
    keep = ~exclude
    a = torch.where(keep, a, 0.0)
    b = torch.where(keep, b, 0.0)
    count = keep.sum(1, keepdim=True)
    a = torch.where(keep, a - a.sum(1, keepdim=True) / count, 0.0)
    b = torch.where(keep, b - b.sum(1, keepdim=True) / count, 0.0)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(corr.mean())


class _BinnedScores:
    """The Kronecker scores of the probes against the sample at any per-layer damping, approximately, from one pass:
    each layer's eigen-coordinates in log-spaced eigenvalue bins (those below ``floors[l]``, far under any damping
    tried, in one), the probe–example products summed per bin, and each bin weighted by 1 / (ē + λ_l), ē the harmonic
    mean of its eigenvalues (exact where λ ≪ e; where λ ≫ e the eigenvalue hardly matters)."""

    def __init__(self, eigenvalues: list[torch.Tensor], gradient_rows: FisherRows, blocks: list[slice],
                 floors: list[float]):
        per_layer = max(8, SCORE_BINS // len(eigenvalues))
        segments, layers, values = [], [], []  # per bin: its columns within its layer, its layer, its ē
        for index, (e, floor) in enumerate(zip(eigenvalues, floors)):
            low, high = math.log(floor), math.log(max(float(e.max()), floor)) + 1e-9
            edges = torch.linspace(low, high, per_layer + 1, dtype=torch.float64, device=e.device)
            bins = torch.bucketize(e.clamp_min(floor).log(), edges[1:-1])  # 0 … per_layer − 1
            for b in bins.unique().tolist():
                where = torch.nonzero(bins == b).flatten()
                segments.append(where)
                layers.append(index)
                values.append(float(1.0 / (1.0 / e[where].clamp_min(1e-300)).mean()))
        self.layers = torch.tensor(layers)
        self.values = torch.tensor(values, dtype=torch.float64)
        k, m = blocks[-1].stop, len(gradient_rows)
        step = probe_block(m, gradient_rows.width, gradient_rows.dtype.itemsize)
        self.sums = torch.zeros(k, m, len(values), dtype=gradient_rows.dtype, device=gradient_rows.device)
        for index in range(len(eigenvalues)):  # a layer at a time: no dense copy of all the layers' rows
            own = [s for s, layer in enumerate(layers) if layer == index]
            for b in blocks:
                probe = gradient_rows.layer_dense(index, b)
                for start in range(0, m, step):
                    rows = slice(start, min(start + step, m))
                    sample = gradient_rows.layer_dense(index, rows)
                    for s in own:
                        self.sums[b, rows, s] = probe[:, segments[s]] @ sample[:, segments[s]].T

    def scores(self, lams: list[float]) -> torch.Tensor:
        weights = 1.0 / (self.values + torch.tensor(lams, dtype=torch.float64)[self.layers])
        return (self.sums @ weights.to(self.sums)).double()


def match_damping(factors: list[LayerFactors], fisher_rows: FisherRows, gradient_rows: FisherRows,
                  weight_decay: float, exact_damping: float | None, exact_rule: str,
                  probes: int = MATCH_PROBES, fisher_examples: int | None = None) -> DampingMatch:
    """The per-layer damping at which the Kronecker scores (eigenvalues of ``factors``, the weight decay left out as the
    Kronecker methods do by default) agree best with the exact ones on the sample: ``fisher_rows`` ``R`` (F = RᵀR / m
    over the m = ``fisher_examples`` sampled examples, default one per gradient row; scaled in place, then released) and
    ``gradient_rows`` (the training-loss gradients of the scored examples, one row each, the first ``probes`` the
    probes, scored against all of them but themselves), all in the eigenbasis. The exact system is
    ``(F + weight_decay + λ) x = g`` with λ = ``exact_damping`` (the direct solvers' rule, named by ``exact_rule``), or
    where that is None 0.01 × F's largest eigenvalue. Each family's levels are the ``CANDIDATES``, the best refined
    between its neighbours (``_peak``). The probes are made dense a block at a time (``probe_block``); everything
    else keeps the rows' held form."""
    m = len(gradient_rows)
    fisher_examples = m if fisher_examples is None else fisher_examples
    rows = fisher_rows.scale_(1 / math.sqrt(fisher_examples))  # in place: the rows are this match's own
    if exact_damping is None:
        exact_damping, exact_rule = DAMPING_LEVEL * _largest_eigenvalue(rows), "spectrum"
    eigenvalues = [f.eigenvalues.flatten().to(gradient_rows.device, torch.float64).clamp_min(0) for f in factors]
    shift = weight_decay + exact_damping
    k = min(probes, m)
    step = probe_block(k, gradient_rows.width, gradient_rows.dtype.itemsize)
    blocks = [slice(b, min(b + step, k)) for b in range(0, k, step)]
    held = [gradient_rows.dense(blocks[0])] if len(blocks) == 1 else None  # one block fits: made dense once

    def probe_rows(b: slice) -> torch.Tensor:
        return held[0] if held is not None else gradient_rows.dense(b)

    solve = _exact_solver(rows, shift)
    # the solve holds about four float64 copies of its probes' rows: as many probes at once as keep those in the cap
    solve_step = probe_block(k, 2 * gradient_rows.width, torch.finfo(torch.float64).bits // 8)
    exact_scores = torch.cat([gradient_rows.times(solve(chunk)).T
                              for b in blocks for chunk in probe_rows(b).split(solve_step)]).double()
    del solve  # the factored system (up to MATCH_ROWS² numbers) and the Fisher rows: not needed past the exact scores
    rows.release()  # (the caller still holds them)
    own = torch.zeros_like(exact_scores, dtype=torch.bool)
    own[torch.arange(k), torch.arange(k)] = True
    means = [f.mean_eigenvalue() for f in factors]

    def layer_damping(family: str, level: float) -> list[float]:
        return [level * mean for mean in means] if family == "relative" else [level * exact_damping] * len(factors)

    def kronecker_scores(lams: list[float]) -> torch.Tensor:
        inverse = torch.cat([1.0 / (e + lam) for e, lam in zip(eigenvalues, lams)]).to(gradient_rows.dtype)
        return torch.cat([gradient_rows.times(probe_rows(b) * inverse).T for b in blocks]).double()

    # coarse: every candidate of both families on the binned scores; then, in each family, exact scores around its
    # best candidate, refined (_peak); the better family's level is taken
    floors = [max(0.01 * CANDIDATES[0] * min(mean, exact_damping), 1e-30) for mean in means]
    binned = _BinnedScores(eigenvalues, gradient_rows, blocks, floors)
    best = None
    for family in ("relative", "absolute"):
        usable = [j for j, level in enumerate(CANDIDATES)
                  if all(lam > 0 and math.isfinite(lam) for lam in layer_damping(family, level))]
        if not usable:
            continue
        i = max(usable, key=lambda j: _agreement(binned.scores(layer_damping(family, CANDIDATES[j])), exact_scores,
                                                 own))

        def exact(level: float, family: str = family) -> float:
            return _agreement(kronecker_scores(layer_damping(family, level)), exact_scores, own)

        local = {j: exact(CANDIDATES[j]) for j in (i - 1, i, i + 1) if j in usable}
        while True:  # walk on while the best exact point is at an edge of those evaluated and the grid goes on
            top = max(local, key=local.get)
            further = [j for j in (top - 1, top + 1) if j in usable and j not in local
                       and (j < top and top == min(local) or j > top and top == max(local))]
            if not further:
                break
            local.update({j: exact(CANDIDATES[j]) for j in further})
        level, value = _peak([(CANDIDATES[j], local[j]) for j in sorted(local)], exact)
        if best is None or value > best[0]:
            best = (value, family, level)
    if best is None:
        raise ValueError("no positive candidate damping")
    value, family, level = best
    return DampingMatch(layer_damping(family, level), family, level, value, exact_damping, exact_rule, m, k,
                        fisher_examples)


def _peak(curve: list[tuple[float, float]], evaluate: Callable[[float], float]) -> tuple[float, float]:
    """The level of the highest agreement: the best of ``curve`` ((level, agreement) on a log-spaced grid), refined by
    golden-section search in log level between its two neighbours (``evaluate`` gives the agreement at a level); at
    the grid's ends, the end."""
    i = max(range(len(curve)), key=lambda k: curve[k][1])
    if not 0 < i < len(curve) - 1:
        return curve[i]
    low, high = math.log(curve[i - 1][0]), math.log(curve[i + 1][0])
    best = curve[i]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = evaluate(math.exp(a)), evaluate(math.exp(b))
    for _ in range(REFINE_STEPS):
        if fa >= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = evaluate(math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = evaluate(math.exp(b))
    for level, value in ((math.exp(a), fa), (math.exp(b), fb)):
        if value > best[1]:
            best = (level, value)
    return best
