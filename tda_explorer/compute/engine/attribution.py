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

    def topk(self, test_id: Any, k: int = 10, kind: str = "proponents") -> tuple[list, torch.Tensor]:
        """The ``k`` strongest proponents (highest scores) or opponents (lowest) of ``test_id``.

        Returns
        -------
        train_ids : list
        scores : Tensor [k]
        """
        k = check_positive_int(k, "k")
        if kind not in ("proponents", "opponents"):
            raise TDAError(f"kind must be 'proponents' or 'opponents', got {kind!r}")
        row = self.row(test_id)
        vals, idx = torch.topk(row, min(k, len(row)), largest=(kind == "proponents"))
        return [self.train_ids[i] for i in idx.tolist()], vals

    def to_dataframe(self, k: int | None = 10, test_ids: Sequence[Any] | None = None) -> pd.DataFrame:
        """Tidy ranking: one row per (test, train) pair with ``test_id, train_id, rank, score, method``.

        ``rank`` 1 is the strongest proponent; with ``k`` only the top-k proponents and top-k
        opponents of each test example are kept (opponents get negative ranks, -1 the strongest).
        """
        test_ids = self.test_ids if test_ids is None else list(test_ids)
        frames = []
        for t in test_ids:
            row = self.row(t)
            order = torch.argsort(row, descending=True)
            n = len(order)
            if k is None or 2 * k >= n:
                pos, ranks = order, list(range(1, n + 1))
            else:
                pos = torch.cat([order[:k], order[-k:].flip(0)])
                ranks = list(range(1, k + 1)) + [-r for r in range(1, k + 1)]
            frames.append(pd.DataFrame({
                "test_id": t,
                "train_id": [self.train_ids[i] for i in pos.tolist()],
                "rank": ranks,
                "score": row[pos].cpu().double().numpy(),
                "method": self.method,
            }))
        return pd.concat(frames, ignore_index=True)
