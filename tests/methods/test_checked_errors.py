"""Issue #25: the Kronecker-factored methods (if-ekfac, if-kfac, SOURCE, ASTRA) answer bad data with the checked
TDAErrors of the gradient methods — naming ``train`` or ``test`` and the offending ids — not raw torch errors."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, TDAError, get_method
from tda_explorer.compute.training.train import Checkpoint

KRONECKER = ["if-ekfac", "if-kfac", "source", "if-astra"]
ATTRIBUTE = ["if-ekfac", "if-kfac"]  # test gradients through the Kronecker hooks (ASTRA's go through vmap)


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return AttributionTask(model, checkpoints=[Checkpoint(state, 0.1, step=10)])


def _data(prefix: str, inputs: torch.Tensor) -> AttributionDataset:
    return AttributionDataset(inputs, torch.tensor([0, 1, 2] * 2 + [0, 1]), ids=[f"{prefix}{i}" for i in range(8)])


@pytest.fixture(scope="module")
def data():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    bad = x.clone()
    bad[3, 1] = float("inf")
    bad[6, 0] = float("nan")
    huge = x.clone()
    huge[5] = 3e38  # finite, but its gradient products overflow float32
    return {"ok": _data("e", x), "wide": _data("w", torch.randn(8, 5)), "bad": _data("i", bad),
            "huge": _data("b", huge)}


@pytest.mark.parametrize("method", KRONECKER)
def test_fit_on_inputs_of_the_wrong_width_names_train(task, data, method):
    with pytest.raises(TDAError, match=r"^train: the model failed on examples 0\.\.7 \(inputs \(5,\) torch.float32\)"
                                       r".*mat1 and mat2 shapes cannot be multiplied"):
        get_method(method, task).fit(data["wide"])


@pytest.mark.parametrize("method", KRONECKER)
def test_fit_on_non_finite_inputs_names_train_and_the_ids(task, data, method):
    with pytest.raises(TDAError, match=r"^train: inputs have non-finite values \(NaN or inf\) for ids "
                                       r"\['i3', 'i6'\]"):
        get_method(method, task).fit(data["bad"])


@pytest.mark.parametrize("method", KRONECKER)
def test_fit_on_overflowing_inputs_names_train_and_the_ids(task, data, method):
    with pytest.raises(TDAError, match=r"^train: per-sample gradients overflow \(values too large for torch.float32\)"
                                       r" for ids \['b5'\]"):
        get_method(method, task).fit(data["huge"])


@pytest.mark.parametrize("method", ATTRIBUTE)
def test_attribute_on_inputs_of_the_wrong_width_names_test(task, data, method):
    fitted = get_method(method, task).fit(data["ok"])
    with pytest.raises(TDAError, match=r"^test: the model failed on examples 0\.\.7 \(inputs \(5,\) torch.float32\)"):
        fitted.attribute(data["wide"])


@pytest.mark.parametrize("method", ATTRIBUTE)
def test_attribute_on_non_finite_inputs_names_test_and_the_ids(task, data, method):
    fitted = get_method(method, task).fit(data["ok"])
    with pytest.raises(TDAError, match=r"^test: inputs have non-finite values \(NaN or inf\) for ids \['i3', 'i6'\]"):
        fitted.attribute(data["bad"])


@pytest.mark.parametrize("method", ATTRIBUTE)
def test_attribute_on_overflowing_inputs_names_test_and_the_ids(task, data, method):
    fitted = get_method(method, task).fit(data["ok"])
    with pytest.raises(TDAError, match=r"^test: per-sample gradients have non-finite values \(NaN or inf\) for ids "
                                       r"\['b5'\]"):
        fitted.attribute(data["huge"])


@pytest.mark.parametrize("method", ATTRIBUTE)
def test_good_inputs_still_give_finite_scores(task, data, method):
    scores = get_method(method, task).fit(data["ok"]).attribute(data["ok"]).scores
    assert scores.shape == (8, 8) and torch.isfinite(scores).all()


def test_a_model_whose_outputs_overflow_is_named(data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1e38)  # finite weights; outputs of ordinary inputs overflow to inf
    task = AttributionTask(model)
    with pytest.raises(TDAError, match=r"^train: the model's outputs have non-finite values \(NaN or inf\) for ids"):
        get_method("if-ekfac", task).fit(data["ok"])
