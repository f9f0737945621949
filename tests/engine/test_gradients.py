import pytest
import torch

from tda_explorer import AttributionTask, TDAError
from tda_explorer.compute import per_sample_gradients


def loop_gradients(model, names, x, y, loss_fn):
    rows = []
    params = dict(model.named_parameters())
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[n].grad.flatten() for n in names]))
    return torch.stack(rows)


def test_per_sample_gradients_match_backward_loop(tiny_mlp, tiny_data):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp)
    names = task.tracked_names()
    got = per_sample_gradients(tiny_mlp, names, train.inputs, train.labels, task.train_loss, max_memory=2000)
    want = loop_gradients(tiny_mlp, names, train.inputs, train.labels, task.train_loss)
    assert got.shape == (20, sum(p.numel() for p in tiny_mlp.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_last_layer_subset_matches_loop(tiny_mlp, tiny_data):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp, parameters="last_layer")
    names = task.tracked_names()
    assert names == ["2.weight", "2.bias"]
    got = per_sample_gradients(tiny_mlp, names, train.inputs, train.labels, task.train_loss)
    torch.testing.assert_close(got, loop_gradients(tiny_mlp, names, train.inputs, train.labels, task.train_loss))


def test_parameter_subset_selecting_nothing_is_refused(tiny_mlp):
    with pytest.raises(TDAError, match="selects no trainable parameter.*modules with parameters"):
        AttributionTask(tiny_mlp, parameters=["encoder"])


def test_memory_budget_too_small_for_one_example(tiny_mlp, tiny_data):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp)
    with pytest.raises(TDAError, match="max_memory=10 bytes is too small"):
        per_sample_gradients(tiny_mlp, task.tracked_names(), train.inputs, train.labels, task.train_loss, max_memory=10)


def test_non_finite_gradients_name_the_examples(tiny_mlp, tiny_data):
    train, _ = tiny_data
    x = train.inputs.clone()
    x[7, 0] = float("nan")
    task = AttributionTask(tiny_mlp)
    with pytest.raises(TDAError, match=r"non-finite values for ids \[7\]"):
        per_sample_gradients(tiny_mlp, task.tracked_names(), x, train.labels, task.train_loss, ids=train.ids)
