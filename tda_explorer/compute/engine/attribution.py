"""``Attribution``: a ``[n_test, n_train]`` score matrix with ids, method and configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from tda_explorer._validation import TDAError, check_positive_int


@dataclass
class Attribution:
    """Scores of every (test, train) pair; positive = proponent (removal would raise the test loss).

    Parameters
    ----------
    scores : Tensor [n_test, n_train]
    test_ids, train_ids : sequences of ids, one per row / column.
    method : str
        The method's registry name.
    config : dict
        The method's configuration.
    """

    scores: torch.Tensor
    test_ids: Sequence[Any]
    train_ids: Sequence[Any]
    method: str
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.dim() != 2:
            raise TDAError(f"scores must be [n_test, n_train], got shape {tuple(self.scores.shape)}")
        if self.scores.shape != (len(self.test_ids), len(self.train_ids)):
            raise TDAError(
                f"scores shape {tuple(self.scores.shape)} does not match {len(self.test_ids)} test_ids "
                f"x {len(self.train_ids)} train_ids"
            )
        self.test_ids, self.train_ids = list(self.test_ids), list(self.train_ids)
        self._test_pos = {t: i for i, t in enumerate(self.test_ids)}

    def row(self, test_id: Any) -> torch.Tensor:
        """Scores of one test example against every training example."""
        if test_id not in self._test_pos:
            raise TDAError(f"test_id {test_id!r} does not exist; ids range like {self.test_ids[:3]}…")
        return self.scores[self._test_pos[test_id]]

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
            row = self.row(t)
            proponents, opponents = signed_order(row, k)
            parts = [proponents, opponents]
            ranks = list(range(1, len(proponents) + 1)) + [-r for r in range(1, len(opponents) + 1)]
            if k is None:
                neutral = torch.nonzero(~((row > 0) | (row < 0))).flatten()
                parts.append(neutral)
                ranks += [0] * len(neutral)
            pos = torch.cat(parts).tolist()
            columns["test_id"] += [t] * len(pos)
            columns["train_id"] += [self.train_ids[i] for i in pos]
            columns["rank"] += ranks
            columns["score"] += row[pos].cpu().double().tolist()
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
