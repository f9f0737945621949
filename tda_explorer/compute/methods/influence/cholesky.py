"""Cholesky factorisation and solves that work where the matrix lies.

torch factors a row-major matrix in a column-major copy (``torch.linalg.cholesky(m, out=m)`` included) and
``torch.cholesky_solve`` copies its factor at every call: each a second matrix as large as the curvature. A symmetric
matrix's transposed view is column-major and holds the same numbers, so LAPACK can factor it in place; two
triangular solves read the factor as it is.
"""

from __future__ import annotations

import torch


def cholesky_in_place(matrix: torch.Tensor) -> int:
    """Factor the symmetric ``matrix`` (its lower triangle read) over itself: where it is positive definite,
    ``matrix`` becomes its lower Cholesky factor L (zeros above) and 0 is returned; else LAPACK's ``info`` (k > 0:
    the leading minor of order k is not positive definite), ``matrix`` then overwritten by a partial factor."""
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    torch.linalg.cholesky_ex(matrix.mT, upper=True, out=(matrix.mT, info))
    return int(info)


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ rhs`` for the lower Cholesky factor ``L`` = ``factor`` and each column of ``rhs``."""
    return torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, rhs, upper=False),
                                         upper=True)
