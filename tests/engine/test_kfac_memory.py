"""EK-FAC's refit of the eigenvalues without every row's rotated gradient in memory at once."""

import pytest
import torch

from tda_explorer.compute.engine import kfac


def _bases(width: int, out: int, bias: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q_a = torch.linalg.qr(torch.randn(width + bias, width + bias, generator=gen, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(out, out, generator=gen, dtype=torch.float64))[0]
    return q_s.float(), q_a.float()


@pytest.mark.parametrize("positions", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("blocks", [1, 3])
def test_squares_equal_the_sum_over_materialised_rotated_gradients(monkeypatch, positions, bias, blocks):
    gen = torch.Generator().manual_seed(positions * 10 + bias * 2 + blocks)
    batch, width, out = 7, 6, 4
    q_s, q_a = _bases(width, out, bias, gen)
    a = torch.randn(batch, width, positions, generator=gen)
    s = torch.randn(blocks * batch, out, positions, generator=gen)
    expected = (kfac.sandwich(q_s, a, s, q_a).double() ** 2).sum(0)
    monkeypatch.setattr(kfac, "SQUARES_CHUNK_BYTES", 3 * out * (width + bias) * 4)  # 3 rows a chunk: ragged ends
    got = kfac.sandwich_squares(q_s, a, s, q_a)
    assert got.dtype == torch.float64 and got.shape == (out, width + bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
