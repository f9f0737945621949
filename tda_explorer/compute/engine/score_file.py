"""A score matrix on disk: ``[n_test, n_train]`` float32 rows in a ``.npy`` file, read a row at a time.

At 50,000 training and 10,000 test examples one method's scores take 2 GB; a session holds several. A
``ScoreFile`` keeps them on disk and in memory only what browsing needs:

- each test point's top-``top_k`` proponents and opponents (``topk``), in the order ``Attribution.topk`` and
  ``to_dataframe`` rank them, so panels and exports of up to ``top_k`` never read a row;
- each training example's ``top_k`` test points by ``|score|`` (``influenced``), so "which tests does this training
  example move?" reads no column;
- a row is read with one positional read (``os.pread``) of ``4 · n_train`` bytes: no memory map, so reading rows
  never grows the process's resident memory beyond the rows held.

The file is a plain ``.npy`` (``numpy.load(path, mmap_mode="r")`` opens it too). It is written by
``ScoreFileWriter`` test rows in order, under a temporary name, and renamed only when complete with its top-k
beside it, so an interrupted write never looks finished.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tda_explorer._validation import TDAError
from tda_explorer.atomic import atomic_path, load_tensors, save_tensors

#: Proponents, opponents and influenced test points kept per row / column (panels show ≤ 50).
TOP_K = 100


def _sides(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's ``k`` highest and ``k`` lowest scores, highest (lowest) first, ties in position order
    (``signed_order``'s order, whose sign filter the reader applies)."""
    k = min(k, block.shape[1])

    def strongest(largest: bool) -> torch.Tensor:
        values, positions = torch.topk(block, k, dim=1, largest=largest, sorted=False)
        positions, by_position = positions.sort(dim=1)
        order = torch.argsort(values.gather(1, by_position), dim=1, descending=largest, stable=True)
        return positions.gather(1, order)

    return strongest(True), strongest(False)


class ScoreFileWriter:
    """Writes a ``ScoreFile`` block of test rows at a time (``write``), then ``close`` renames it into place.

    Parameters
    ----------
    path : str or Path
        The ``.npy`` file to create; its top-k goes to ``path`` with suffix ``.topk.pt``.
    shape : (n_test, n_train)
    top_k : int
        Proponents / opponents kept per test row and test points per training column.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int], top_k: int = TOP_K):
        self.path, self.shape, self.top_k = Path(path), (int(shape[0]), int(shape[1])), int(top_k)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = atomic_path(self.path).with_suffix(".npy")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        np.lib.format.write_array_header_1_0(self._file, {"descr": "<f4", "fortran_order": False, "shape": self.shape})
        self._rows = 0
        self._top: dict[str, list[torch.Tensor]] = {"high": [], "high_scores": [], "low": [], "low_scores": []}
        n_train, kc = self.shape[1], min(self.top_k, self.shape[0])
        self._col_score = torch.zeros(0, n_train)
        self._col_test = torch.zeros(0, n_train, dtype=torch.int32)
        self._kc = kc

    def write(self, block: torch.Tensor) -> None:
        """Append the next ``block`` of test rows ``[rows, n_train]``."""
        block = block.detach().float().cpu()
        if block.dim() != 2 or block.shape[1] != self.shape[1] or self._rows + len(block) > self.shape[0]:
            raise TDAError(f"a score block of shape {tuple(block.shape)} does not continue a {self.shape} matrix at "
                           f"row {self._rows}")
        self._file.write(block.contiguous().numpy().tobytes())
        for side, positions in zip(("high", "low"), _sides(block, self.top_k)):
            self._top[side].append(positions.int())
            self._top[f"{side}_scores"].append(block.gather(1, positions))
        # each training column's strongest test rows by |score|, merged with the best so far
        rows = torch.arange(self._rows, self._rows + len(block), dtype=torch.int32).unsqueeze(1).expand(
            -1, self.shape[1])
        scores = torch.cat([self._col_score, block.abs()])
        tests = torch.cat([self._col_test, rows])
        keep = torch.topk(scores, min(self._kc, len(scores)), dim=0).indices
        self._col_score, self._col_test = scores.gather(0, keep), tests.gather(0, keep)
        self._rows += len(block)

    def close(self) -> ScoreFile:
        """Finish the file (every row written) and open it for reading."""
        self._file.close()
        if self._rows != self.shape[0]:
            self._tmp.unlink(missing_ok=True)
            raise TDAError(f"the score file got {self._rows} of {self.shape[0]} rows")
        order = torch.argsort(self._col_score, dim=0, descending=True, stable=True)
        save_tensors({**{name: torch.cat(parts) for name, parts in self._top.items()},
                      "influenced": self._col_test.gather(0, order).T.contiguous()}, topk_path(self.path))
        self._tmp.replace(self.path)
        return ScoreFile(self.path)

    def abort(self) -> None:
        """Drop a partial file (an error or a cancel while writing)."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def topk_path(path: Path) -> Path:
    return path.with_suffix(".topk.pt")


class ScoreFile:
    """A finished score matrix on disk (see the module docstring); ``None``-safe to open with ``ScoreFile.open``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise TDAError(f"{self.path} is not a [n_test, n_train] float32 score file")
        self.shape = torch.Size(shape)
        expected = self._offset + 4 * shape[0] * shape[1]
        if self.path.stat().st_size != expected:
            raise TDAError(f"{self.path} holds {self.path.stat().st_size} bytes, expected {expected}")
        top = load_tensors(topk_path(self.path))
        if top is None:
            raise TDAError(f"{self.path}: its top-k file {topk_path(self.path).name} is missing or damaged")
        self._top, self._influenced = top, top["influenced"]
        self.top_k = top["high"].shape[1]

    @classmethod
    def open(cls, path: str | Path) -> ScoreFile | None:
        """The finished file at ``path``, or None when it is missing, incomplete or damaged (recompute it)."""
        try:
            return cls(path)
        except (TDAError, OSError, ValueError):
            return None

    @property
    def ndim(self) -> int:
        return 2

    def row(self, position: int) -> torch.Tensor:
        """Test row ``position``'s scores ``[n_train]``."""
        n = self.shape[1]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, 4 * n, self._offset + 4 * n * int(position))
        finally:
            os.close(fd)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Test rows ``start:stop`` ``[stop - start, n_train]`` (one read)."""
        n = self.shape[1]
        with open(self.path, "rb") as f:
            f.seek(self._offset + 4 * n * start)
            raw = f.read(4 * n * (stop - start))
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(stop - start, n)

    def top(self, position: int, proponents: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``top_k`` highest (``proponents``) or lowest training positions of test row ``position``, and
        their scores."""
        side = "high" if proponents else "low"
        return self._top[side][position].long(), self._top[f"{side}_scores"][position]

    def influenced(self, train_position: int) -> torch.Tensor:
        """The stored ``top_k`` test positions with the largest ``|score|`` for one training example."""
        return self._influenced[train_position].long()

    def column(self, train_position: int, block_rows: int = 1024) -> torch.Tensor:
        """Every test point's score for one training example ``[n_test]`` (reads the file in row blocks)."""
        parts = [self.rows(s, min(s + block_rows, self.shape[0]))[:, train_position]
                 for s in range(0, self.shape[0], block_rows)]
        return torch.cat(parts)

    def to_tensor(self) -> torch.Tensor:
        """The whole matrix in memory (``4 · n_test · n_train`` bytes)."""
        return self.rows(0, self.shape[0])

    def __repr__(self) -> str:
        return f"ScoreFile({str(self.path)!r}, shape={tuple(self.shape)}, top_k={self.top_k})"
