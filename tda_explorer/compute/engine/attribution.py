"""``Attribution``: a ``[n_test, n_train]`` score matrix with ids, method and configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.engine.score_file import ScoreFile


@dataclass
class Attribution:
    """Scores of every (test, train) pair; positive = proponent (removal would raise the test loss).

    Parameters
    ----------
    scores : Tensor [n_test, n_train] or ScoreFile
        In memory, or on disk (a session's large attributions): read a row at a time, rankings of up to its
        ``top_k`` from what it stores; ``matrix()`` loads either whole.
    test_ids, train_ids : sequences of ids, one per row / column.
    method : str
        The method's registry name.
    config : dict
        The method's configuration.
    """

    scores: torch.Tensor | ScoreFile
    test_ids: Sequence[Any]
    train_ids: Sequence[Any]
    method: str
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.scores.shape) != 2:
            raise TDAError(f"scores must be [n_test, n_train], got shape {tuple(self.scores.shape)}")
        if self.scores.shape != (len(self.test_ids), len(self.train_ids)):
            raise TDAError(
                f"scores shape {tuple(self.scores.shape)} does not match {len(self.test_ids)} test_ids "
                f"x {len(self.train_ids)} train_ids"
            )
        self.test_ids, self.train_ids = list(self.test_ids), list(self.train_ids)
        self._test_pos = {t: i for i, t in enumerate(self.test_ids)}

    def _position(self, test_id: Any) -> int:
        if test_id not in self._test_pos:
            raise TDAError(f"test_id {test_id!r} does not exist; ids range like {self.test_ids[:3]}…")
        return self._test_pos[test_id]

    def row(self, test_id: Any) -> torch.Tensor:
        """Scores of one test example against every training example."""
        position = self._position(test_id)
        return self.scores.row(position) if isinstance(self.scores, ScoreFile) else self.scores[position]

    def matrix(self) -> torch.Tensor:
        """The whole ``[n_test, n_train]`` matrix in memory (loaded from disk for a ``ScoreFile``)."""
        return self.scores.to_tensor() if isinstance(self.scores, ScoreFile) else self.scores

    def column(self, train_position: int) -> torch.Tensor:
        """Every test example's score for the training example at ``train_position`` ``[n_test]``."""
        if isinstance(self.scores, ScoreFile):
            return self.scores.column(train_position)
        return self.scores[:, train_position]

    def influenced(self, train_position: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and scores of the ``k`` test examples with the largest ``|score|`` for one training example."""
        if isinstance(self.scores, ScoreFile) and k <= self.scores.top_k:
            positions = self.scores.influenced(train_position)[:k]
            return positions, torch.stack([self.scores.row(int(p))[train_position] for p in positions])
        column = self.column(train_position)
        positions = torch.argsort(column.abs(), descending=True, stable=True)[:k]
        return positions, column[positions]

    def _stored(self, position: int, k: int | None, proponents: bool, signed: bool,
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A ranking from a ``ScoreFile``'s stored top-k when it holds ``k``, else None (rank the row)."""
        if not isinstance(self.scores, ScoreFile) or k is None or k > self.scores.top_k:
            return None
        positions, values = self.scores.top(position, proponents)
        if signed:
            keep = values > 0 if proponents else values < 0
            positions, values = positions[keep], values[keep]
        return positions[:k], values[:k]

    def topk(self, test_id: Any, k: int = 10, kind: str = "proponents", signed: bool = False,
             ) -> tuple[list, torch.Tensor]:
        """The ``k`` highest-scoring (``kind="proponents"``) or lowest-scoring (``"opponents"``) training examples of
        ``test_id``, strongest first.

        With ``signed=True`` only scores of the kind's sign count (proponents > 0, opponents < 0), so fewer than
        ``k`` come back when fewer have that sign (what a ranking shows; ``to_dataframe`` ranks this way). Without
        it, exactly ``min(k, n_train)`` come back whatever their sign (what removal experiments take out).

        Returns
        -------
        train_ids : list
        scores : Tensor [≤ k]
        """
        k = check_positive_int(k, "k")
        if kind not in ("proponents", "opponents"):
            raise TDAError(f"kind must be 'proponents' or 'opponents', got {kind!r}")
        stored = self._stored(self._position(test_id), k, kind == "proponents", signed)
        if stored is not None:
            return [self.train_ids[i] for i in stored[0].tolist()], stored[1]
        row = self.row(test_id)
        if signed:
            proponents, opponents = signed_order(row, k)
            idx = proponents if kind == "proponents" else opponents
            return [self.train_ids[i] for i in idx.tolist()], row[idx]
        vals, idx = torch.topk(row, min(k, len(row)), largest=(kind == "proponents"))
        return [self.train_ids[i] for i in idx.tolist()], vals

    def to_dataframe(self, k: int | None = 10, test_ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Tidy ranking: one row per (test, train) pair with ``test_id, train_id, rank, score, method``.

        Proponents are the training examples with a positive score, ranked 1, 2, … from the strongest; opponents
        those with a negative score, ranked -1, -2, … from the strongest (most negative). With ``k`` (a positive
        integer) each test example keeps at most ``k`` of each, so fewer when fewer have that sign; with
        ``k=None`` every pair is kept, scores of exactly 0 (or NaN) last with rank 0.
        """
        if k is not None:
            k = check_positive_int(k, "k")
        test_ids = self.test_ids if test_ids is None else list(test_ids)
        columns: dict[str, list] = {"test_id": [], "train_id": [], "rank": [], "score": []}
        for t in test_ids:
            position = self._position(t)
            stored = [self._stored(position, k, side, signed=True) for side in (True, False)]
            if stored[0] is not None:
                (proponents, pro_scores), (opponents, opp_scores) = stored
                parts, values = [proponents, opponents], [pro_scores, opp_scores]
            else:
                row = self.row(t)
                proponents, opponents = signed_order(row, k)
                parts = [proponents, opponents]
                if k is None:
                    parts.append(torch.nonzero(~((row > 0) | (row < 0))).flatten())
                values = [row[p] for p in parts]
            ranks = list(range(1, len(proponents) + 1)) + [-r for r in range(1, len(opponents) + 1)]
            ranks += [0] * (len(parts[2]) if len(parts) > 2 else 0)
            pos = torch.cat(parts).tolist()
            columns["test_id"] += [t] * len(pos)
            columns["train_id"] += [self.train_ids[i] for i in pos]
            columns["rank"] += ranks
            columns["score"] += torch.cat(values).cpu().double().tolist()
        ids_dtype = None if columns["rank"] else object  # inferred as before; an empty table's are object
        return pd.DataFrame({
            "test_id": pd.Series(columns["test_id"], dtype=ids_dtype),
            "train_id": pd.Series(columns["train_id"], dtype=ids_dtype),
            "rank": pd.Series(columns["rank"], dtype="int64"),
            "score": pd.Series(columns["score"], dtype="float64"),
            "method": pd.Series([self.method] * len(columns["rank"]), dtype=ids_dtype),
        })


def signed_order(row: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the positive scores of ``row`` from the highest, and of the negative ones from the lowest (ties
    in position order), each cut to ``k`` when given: a ranking's proponents and opponents."""
    order = torch.argsort(row, descending=True, stable=True)
    ranked = row[order]
    proponents = order[ranked > 0]
    opponents = torch.argsort(row, stable=True)
    opponents = opponents[row[opponents] < 0]
    if k is not None:
        proponents, opponents = proponents[:k], opponents[:k]
    return proponents, opponents
