"""The in-place Cholesky factorisation and its solves (methods/influence/cholesky.py) against torch's own."""

import torch

from tda_explorer.compute.methods.influence.cholesky import cholesky_in_place, cholesky_solve


def test_the_cholesky_factor_is_written_over_the_matrix_and_solves_its_system():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(30, 34, generator=gen, dtype=torch.float64)
    matrix = a @ a.T + 0.1 * torch.eye(30, dtype=torch.float64)
    original = matrix.clone()
    assert cholesky_in_place(matrix) == 0
    torch.testing.assert_close(matrix, torch.linalg.cholesky(original))
    rhs = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cholesky_solve(matrix, rhs), torch.linalg.solve(original, rhs))
    indefinite = original - 2 * float(torch.linalg.eigvalsh(original)[0] + 0.1) * torch.eye(30, dtype=torch.float64)
    assert cholesky_in_place(indefinite) > 0
