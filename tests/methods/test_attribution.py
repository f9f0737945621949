import pytest
import torch

from tda_explorer import Attribution, TDAError


@pytest.fixture
def attribution():
    scores = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-0.1, 0.3, -0.2, 0.9]])
    return Attribution(scores, test_ids=["a", "b"], train_ids=[10, 11, 12, 13], method="m", config={})


def test_topk_proponents_and_opponents(attribution):
    ids, vals = attribution.topk("a", 2)
    assert ids == [12, 10] and vals.tolist() == [2.0, 0.5]
    ids, vals = attribution.topk("a", 1, "opponents")
    assert ids == [11] and vals.tolist() == [-1.0]


def test_to_dataframe_is_tidy_with_ids(attribution):
    df = attribution.to_dataframe(k=1)
    assert list(df.columns) == ["test_id", "train_id", "rank", "score", "method"]
    a = df[df.test_id == "a"]
    assert a.train_id.tolist() == [12, 11] and a["rank"].tolist() == [1, -1]
    full = attribution.to_dataframe(k=None)
    assert len(full) == 8  # every pair: positives ranked 1.., negatives -1.. (strongest first), zeros 0
    a, b = full[full.test_id == "a"], full[full.test_id == "b"]
    assert a.train_id.tolist() == [12, 10, 11, 13] and a["rank"].tolist() == [1, 2, -1, 0]
    assert b.train_id.tolist() == [13, 11, 12, 10] and b["rank"].tolist() == [1, 2, -1, -2]


def test_to_dataframe_with_k_at_least_half_keeps_signs_apart(attribution):
    df = attribution.to_dataframe(k=3)  # 2k >= n_train = 4: the old code listed negative scores as proponents
    a = df[df.test_id == "a"]
    assert a.train_id.tolist() == [12, 10, 11] and a["rank"].tolist() == [1, 2, -1]
    assert ((df["rank"] > 0) == (df.score > 0)).all() and ((df["rank"] < 0) == (df.score < 0)).all()
    with pytest.raises(TDAError, match="^k must be >= 1, got 0"):
        attribution.to_dataframe(k=0)


def test_topk_signed_keeps_only_its_sign(attribution):
    assert attribution.topk("a", 3)[0] == [12, 10, 13]  # exactly k, whatever the sign (removal experiments)
    ids, vals = attribution.topk("a", 3, signed=True)
    assert ids == [12, 10] and vals.tolist() == [2.0, 0.5]
    ids, vals = attribution.topk("a", 3, "opponents", signed=True)
    assert ids == [11] and vals.tolist() == [-1.0]


def test_unknown_test_id_and_bad_shapes(attribution):
    with pytest.raises(TDAError, match="test_id 'zz' does not exist"):
        attribution.topk("zz")
    with pytest.raises(TDAError, match="does not match 1 test_ids"):
        Attribution(torch.zeros(2, 4), ["a"], [1, 2, 3, 4], "m")
    with pytest.raises(TDAError, match="k must be >= 1"):
        attribution.topk("a", 0)
