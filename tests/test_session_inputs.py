"""Issue #25: a Session refuses bad data, bad devices and bad k when it is built or asked, naming the argument; and a
ranking lists positive scores as proponents and negative ones as opponents, whatever k."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import Attribution, AttributionDataset, AttributionTask, TDAError
from tda_explorer._validation import as_device
from tda_explorer.session import Session


def _session(tiny_mlp, train, test, folder, **kw) -> Session:
    return Session(train, test, AttributionTask(tiny_mlp), folder=folder, **kw)


def _with(data: AttributionDataset, inputs=None, labels=None) -> AttributionDataset:
    return AttributionDataset(data.inputs if inputs is None else inputs, data.labels if labels is None else labels,
                              data.ids, name=data.name)


# -- data checked when the session is built ---------------------------------------------------------------------
def test_nan_train_inputs_are_refused_naming_train_and_the_ids(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    x = train.inputs.clone()
    x[2, 1] = float("nan")
    x[11, 0] = float("nan")
    folder = tmp_path / "s"
    with pytest.raises(TDAError, match=r"^train: inputs have non-finite values \(NaN or inf\) for ids \[2, 11\]"):
        _session(tiny_mlp, _with(train, inputs=x), test, folder)
    assert not folder.exists()  # refused before anything was written


def test_inf_test_inputs_are_refused_naming_test_and_the_string_ids(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    x = test.inputs.clone()
    x[3, 2] = float("-inf")
    with pytest.raises(TDAError, match=r"^test: inputs have non-finite values \(NaN or inf\) for ids \['t3'\]"):
        _session(tiny_mlp, train, _with(test, inputs=x), tmp_path)


def test_train_labels_beyond_the_models_outputs_are_refused(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    y = train.labels.clone()
    y[5] = 7
    with pytest.raises(TDAError, match=r"^train: labels must be class indices in \[0, 3\) — the model has 3 outputs "
                                       r"— but ids \[5\] have labels up to 7"):
        _session(tiny_mlp, _with(train, labels=y), test, tmp_path)


def test_test_labels_beyond_the_models_outputs_are_refused(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    y = test.labels.clone()
    y[[0, 9]] = 3  # exactly the model's width: one past the last class
    with pytest.raises(TDAError, match=r"^test: labels must be class indices in \[0, 3\) .* ids \['t0', 't9'\]"):
        _session(tiny_mlp, train, _with(test, labels=y), tmp_path)


def test_labels_within_the_models_outputs_build_a_session(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    y = train.labels.clone()
    y[0] = 2  # the last class the model has: accepted
    session = _session(tiny_mlp, _with(train, labels=y), test, tmp_path)
    assert session.train_probs.shape == (20, 3) and session.test_loss.shape == (10,)


def test_inputs_of_the_wrong_width_are_refused_naming_the_argument(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    wide = AttributionDataset(torch.randn(10, 5, dtype=torch.float64), test.labels, test.ids)
    with pytest.raises(TDAError, match=r"^test: the model failed on examples 0\.\.9 \(inputs \(5,\) torch.float64\): "
                                       r"mat1 and mat2"):
        _session(tiny_mlp, train, wide, tmp_path)


def test_a_model_without_class_scores_is_refused(tiny_data, tmp_path):
    train, test = tiny_data
    model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0)).double()  # one number per example
    with pytest.raises(TDAError, match=r"task.model must return class scores \[n, n_outputs\] .* on train it "
                                       r"returned \(20,\)"):
        Session(train, test, AttributionTask(model), folder=tmp_path)


def test_task_must_be_an_attribution_task(tiny_mlp, tiny_data, tmp_path):
    train, test = tiny_data
    with pytest.raises(TDAError, match="^task must be an AttributionTask, got Sequential"):
        Session(train, test, tiny_mlp, folder=tmp_path)


# -- devices: an accelerator this machine lacks is refused before anything runs ---------------------------------
def test_mps_is_refused_when_unavailable(tiny_mlp, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    train, test = tiny_data
    with pytest.raises(TDAError, match=r"^device 'mps' requested but MPS \(Apple GPU\) is not available on this "
                                       r"machine; use device='cpu'"):
        _session(tiny_mlp, train, test, tmp_path / "s", device="mps")
    assert not (tmp_path / "s").exists()


def test_mps_is_accepted_when_available_but_only_mps_0(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert as_device("mps") == torch.device("mps")
    with pytest.raises(TDAError, match=r"device 'mps:1' does not exist: this machine has 1 MPS \(Apple GPU\)"):
        as_device("mps:1")


def test_xpu_is_refused_when_unavailable(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(TDAError, match=r"^device 'xpu' requested but XPU \(Intel GPU\) is not available"):
        as_device("xpu")


def test_cuda_is_refused_when_unavailable_and_a_missing_index_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TDAError, match=r"^device 'cuda:0' requested but CUDA is not available"):
        as_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert as_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(TDAError, match=r"device 'cuda:2' does not exist: this machine has 2 CUDA device\(s\), "
                                       r"cuda:0..cuda:1"):
        as_device("cuda:2")


def test_unknown_device_types_are_refused():
    with pytest.raises(TDAError, match=r"device 'vulkan' is not supported; use 'cpu', 'cuda', 'mps' or 'xpu'"):
        as_device("vulkan")
    with pytest.raises(TDAError, match=r"device must be a torch device such as 'cpu' or 'cuda', got 'gpu'"):
        as_device("gpu")


# -- rankings ---------------------------------------------------------------------------------------------------
@pytest.fixture
def signed_session(tiny_mlp, tiny_data, tmp_path) -> Session:
    """A session with a hand-made attribution whose signs are known: for test 't0', three positive scores (train
    ids 4 > 9 > 2), five negative (17 < 1 < 12 < 6 < 0, most negative first) and twelve zeros; 't1' all positive."""
    train, test = tiny_data
    session = _session(tiny_mlp, train, test, tmp_path)
    scores = torch.zeros(len(test), len(train))
    scores[0, [4, 9, 2]] = torch.tensor([3.0, 2.0, 1.0])
    scores[0, [17, 1, 12, 6, 0]] = torch.tensor([-5.0, -4.0, -3.0, -2.0, -1.0])
    scores[1] = torch.arange(1, len(train) + 1, dtype=torch.float32)
    session.add(Attribution(scores, test.ids, train.ids, "hand", {}))
    return session


@pytest.mark.parametrize("k", [10, 20, 50])  # n_train = 20: k >= n/2
def test_ranking_with_a_large_k_keeps_signs_apart(signed_session, k):
    df = signed_session.ranking("t0", "hand", k=k)
    proponents, opponents = df[df["rank"] > 0], df[df["rank"] < 0]
    assert proponents.train_id.tolist() == [4, 9, 2] and proponents["rank"].tolist() == [1, 2, 3]
    assert proponents.score.tolist() == [3.0, 2.0, 1.0]
    assert opponents.train_id.tolist() == [17, 1, 12, 6, 0] and opponents["rank"].tolist() == [-1, -2, -3, -4, -5]
    assert opponents.score.tolist() == [-5.0, -4.0, -3.0, -2.0, -1.0]
    assert len(df) == 8  # the zero scores are neither
    assert list(df.columns) == ["test_id", "train_id", "rank", "score", "method", "label", "predicted", "flag",
                                "training_loss"]


def test_ranking_cuts_each_side_to_k(signed_session):
    df = signed_session.ranking("t0", "hand", k=2)
    assert df.train_id.tolist() == [4, 9, 17, 1] and df["rank"].tolist() == [1, 2, -1, -2]


def test_ranking_of_an_all_positive_row_has_no_opponents(signed_session):
    df = signed_session.ranking("t1", "hand", k=15)
    assert df["rank"].tolist() == list(range(1, 16))
    assert (df.score > 0).all() and df.train_id.tolist() == list(range(19, 4, -1))


@pytest.mark.parametrize("k, message", [(0, "k must be >= 1, got 0"), (-1, "k must be >= 1, got -1"),
                                        (2.5, r"k must be an integer, got float \(2.5\)")])
def test_ranking_refuses_a_k_that_is_not_a_positive_integer(signed_session, k, message):
    with pytest.raises(TDAError, match=f"^{message}"):
        signed_session.ranking("t0", "hand", k=k)


@pytest.mark.parametrize("k", [0, -1])
def test_influenced_tests_refuses_a_k_that_is_not_a_positive_integer(signed_session, k):
    with pytest.raises(TDAError, match=f"^k must be >= 1, got {k}"):
        signed_session.influenced_tests(4, "hand", k=k)


def test_influenced_tests_orders_by_magnitude_and_keeps_the_sign(signed_session):
    table = signed_session.influenced_tests(17, "hand", k=2)  # column 17: -5 for t0, 18 for t1, 0 elsewhere
    assert table.test_id.tolist() == ["t1", "t0"] and table.score.tolist() == [18.0, -5.0]
