"""Finiteness checks: the fast path (one sum) neither passes a NaN / inf nor refuses finite values that overflow it."""

import pytest
import torch

from tda_explorer._validation import TDAError, all_finite, check_finite, check_finite_rows, non_finite_ids


def test_finite_values_whose_sum_overflows_pass():
    big = torch.full((4, 3), 3e38, dtype=torch.float32)  # finite; their float32 sum is inf
    assert not torch.isfinite(big.sum()) and all_finite(big)
    assert non_finite_ids(big) == ([], 0) and check_finite_rows(big, "train") is big


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_single_non_finite_value_is_found_and_its_row_named(bad):
    x = torch.randn(6, 5, dtype=torch.float64)
    x[4, 2] = bad
    assert not all_finite(x) and non_finite_ids(x, ids=list("abcdef")) == (["e"], 1)
    with pytest.raises(TDAError, match=r"^train: inputs have non-finite values \(NaN or inf\) for ids \['e'\]"):
        check_finite_rows(x, "train", list("abcdef"))
    with pytest.raises(TDAError, match=r"scores has non-finite values for ids \['e'\]"):
        check_finite(x, "scores", list("abcdef"))


def test_infinities_of_both_signs_do_not_cancel():
    x = torch.tensor([[float("inf"), 1.0], [-float("inf"), 2.0]])
    assert not all_finite(x) and non_finite_ids(x) == ([0, 1], 2)
