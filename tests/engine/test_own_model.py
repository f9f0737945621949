"""Your own model and data as they are: a Hugging Face classifier with dict inputs read lazily from a torch Dataset,
and a plain CNN on a torch Dataset of images — each scored through ``from_torch`` equal to the in-memory tensor
path, and checked against an explicit per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.engine.kfac import linear_layer_names
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.engine.task import predict
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.errors import TDAError

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 100, 12


class TokenDataset(Dataset):
    """Hugging Face-style items: a dict of input_ids, attention_mask and labels per example."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class Stacked(nn.Module):
    """The thin wrapper of the tensor path: ``x[:, 0]`` token ids, ``x[:, 1]`` the attention mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated padded token sequences of 4..12 tokens with their masks, labelled by a rule of their tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ((ids > VOCAB // 2).sum(1) * 3 // (lengths + 1)).clamp_max(2)
    return ids, mask, labels


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=3,
                                     initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def splits():
    """The same examples twice: lazily from a torch Dataset of dicts, and as one in-memory tensor [n, 2, T]."""
    out = {}
    for name, n, seed in (("train", 20, 1), ("test", 5, 2)):
        ids, mask, labels = tokens(n, seed)
        lazy = AttributionDataset.from_torch(TokenDataset(ids, mask, labels), batch_size=8, name=name)
        dense = AttributionDataset(torch.stack([ids, mask], 1), labels, name=name)
        out[name] = (lazy, dense)
    return out


def loop_gradients(model: nn.Module, names: list[str], ids, mask, labels, loss=cross_entropy) -> torch.Tensor:
    """The reference: one forward and backward per example, in eval mode."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(labels)):
        model.zero_grad()
        logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
        loss(logits, labels[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[n].grad.flatten() if params[n].grad is not None
                               else torch.zeros(params[n].numel()) for n in names]))
    model.zero_grad()
    return torch.stack(rows)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12))


def test_lazy_dict_dataset_reads_labels_once_and_batches_in_order(splits):
    lazy, dense = splits["train"]
    assert not lazy.in_memory and lazy.input_kind == "dict"
    assert torch.equal(lazy.labels, dense.labels)
    rows, inputs, labels = next(lazy.batches(8))
    assert rows == slice(0, 8) and set(inputs) == {"input_ids", "attention_mask"}  # the label is not an input
    assert torch.equal(inputs["input_ids"], dense.inputs[:8, 0]) and torch.equal(labels, dense.labels[:8])


def test_bert_per_sample_gradients_through_dict_inputs_equal_a_loop(bert, splits):
    lazy, dense = splits["train"]
    task = AttributionTask(bert)
    names = task.tracked_names()
    grads = per_sample_gradients(bert, names, lazy, None, task.train_loss, output=task.output)
    ids, mask = dense.inputs[:, 0], dense.inputs[:, 1]
    assert close(grads, loop_gradients(bert, names, ids, mask, dense.labels))


def test_bert_grad_dot_through_dict_inputs_equals_the_tensor_path_and_a_loop(bert, splits):
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]
    lazy = get_method("grad-dot", AttributionTask(bert)).fit(train).attribute(test).scores
    dense = get_method("grad-dot", AttributionTask(Stacked(bert))).fit(train_dense).attribute(test_dense).scores
    names = AttributionTask(bert).tracked_names()
    g_train = loop_gradients(bert, names, train_dense.inputs[:, 0], train_dense.inputs[:, 1], train_dense.labels)
    g_test = loop_gradients(bert, names, test_dense.inputs[:, 0], test_dense.inputs[:, 1], test_dense.labels)
    assert close(lazy, dense) and close(lazy, g_test @ g_train.T)
    cos = get_method("grad-cos", AttributionTask(bert)).fit(train).attribute(test).scores
    cos_dense = get_method("grad-cos", AttributionTask(Stacked(bert))).fit(train_dense).attribute(test_dense).scores
    assert close(cos, cos_dense)


def test_bert_trak_with_a_dense_projection_equals_the_tensor_path(bert, splits):
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]
    options = {"projection_dim": 32, "projection_seed": 3}
    lazy = get_method("trak", AttributionTask(bert), **options).fit(train)
    dense = get_method("trak", AttributionTask(Stacked(bert)), **options).fit(train_dense)
    assert close(lazy.q_, dense.q_)
    assert close(lazy.attribute(test).scores, dense.attribute(test_dense).scores)
    assert close(lazy.self_influence(), dense.self_influence())


def test_bert_ekfac_and_logra_on_linear_layers_equal_the_tensor_path(bert, splits):
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]
    wrapped = Stacked(bert)
    for method, options in (("if-ekfac", {"batch_size": 8}), ("if-kfac", {"batch_size": 8}),
                            ("grad-dot", {"projection_kind": "logra", "projection_dim": 4})):
        lazy_task = AttributionTask(bert, parameters=linear_layer_names(bert))
        dense_task = AttributionTask(wrapped, parameters=linear_layer_names(wrapped))
        lazy = get_method(method, lazy_task, **options).fit(train).attribute(test).scores
        dense = get_method(method, dense_task, **options).fit(train_dense).attribute(test_dense).scores
        assert lazy.abs().max() > 0 and close(lazy, dense), method


def test_bert_tracin_over_checkpoints_equals_the_tensor_path(bert, splits):
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]
    state = {k: v.clone() for k, v in bert.state_dict().items()}
    moved = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    checkpoints = [Checkpoint(moved, 0.1, 1), Checkpoint(state, 0.05, 2)]
    wrapped = {f"model.{k}": v for k, v in moved.items()}, {f"model.{k}": v for k, v in state.items()}
    dense_checkpoints = [Checkpoint(wrapped[0], 0.1, 1), Checkpoint(wrapped[1], 0.05, 2)]
    lazy = get_method("tracin", AttributionTask(bert, checkpoints=checkpoints)).fit(train).attribute(test).scores
    dense = get_method("tracin", AttributionTask(Stacked(bert), checkpoints=dense_checkpoints)).fit(
        train_dense).attribute(test_dense).scores
    assert close(lazy, dense)


def test_the_users_batch_loss_and_measurement_see_the_batch(bert, splits):
    """A loss weighted by each sequence's length (from batch["attention_mask"]) and a custom measurement: the
    gradients equal a loop of the same loss, through vmap's fallback and LoGra's hooks alike."""
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]

    def weighted(logits, batch):
        return cross_entropy(logits, batch.labels) * batch["attention_mask"].sum(1) / LENGTH

    def margin_like(logits, batch):
        return -logits.gather(1, batch["labels"][:, None]).squeeze(1)

    task = AttributionTask(bert, batch_loss_fn=weighted, measurement=margin_like)
    scores = get_method("grad-dot", task).fit(train).attribute(test).scores
    names = task.tracked_names()
    ids, mask = train_dense.inputs[:, 0], train_dense.inputs[:, 1]
    lengths = mask.sum(1).float()
    g_train = loop_gradients(bert, names, ids, mask, train_dense.labels) * (lengths / LENGTH)[:, None]
    g_test = loop_gradients(bert, names, test_dense.inputs[:, 0], test_dense.inputs[:, 1], test_dense.labels,
                            loss=lambda logits, y: -logits.gather(1, y[:, None]).squeeze(1))
    assert close(scores, g_test @ g_train.T)
    linear = AttributionTask(bert, parameters=linear_layer_names(bert), batch_loss_fn=weighted,
                             measurement=margin_like)
    hooked = get_method("grad-dot", linear, projection_kind="logra", projection_dim=64).fit(train).attribute(test)
    exact = get_method("grad-dot", linear).fit(train).attribute(test)
    assert close(hooked.scores, exact.scores)


def test_modules_the_kronecker_methods_cannot_track_are_refused_by_name(bert, splits):
    with pytest.raises(TDAError, match=r"supports nn.Linear, nn.Conv1d and nn.Conv2d; tracked parameters include "
                                       r"bert.embeddings.word_embeddings \(Embedding\).*LayerNorm.*can track in this "
                                       r"model: \['bert.encoder.layer.0.attention.self.query'.*linear_layer_names"):
        get_method("if-ekfac", AttributionTask(bert, parameters=["bert"]))
    from tda_explorer.compute.methods.influence.ekfac import UntrackedModulesWarning

    with pytest.warns(UntrackedModulesWarning, match=r"skips bert.embeddings.word_embeddings \(Embedding\)"):
        default = get_method("if-ekfac", AttributionTask(bert))  # the default parameters: Linear layers only
    assert default.task.parameters == linear_layer_names(bert)
    with pytest.raises(TDAError, match=r"LoGra projection supports nn.Linear.*\(Embedding\).*can track"):
        get_method("grad-dot", AttributionTask(bert), projection_kind="logra", projection_dim=4)


def test_methods_that_need_in_memory_inputs_refuse_a_lazy_dataset_by_name(bert, splits):
    train, _ = splits["train"]
    with pytest.raises(TDAError, match=r"lora-ensemble needs one input tensor.*dicts of tensors.*if-explicit"):
        get_method("lora-ensemble", AttributionTask(bert), members=1, epochs=1, rank=2).fit(train)
    explicit = get_method("if-explicit", AttributionTask(bert, parameters=["classifier"])).fit(train)  # streams
    assert torch.isfinite(explicit.self_influence()).all()


def test_predict_runs_batched_through_dict_inputs(bert, splits):
    lazy, dense = splits["test"]
    with torch.no_grad():
        expected = bert(input_ids=dense.inputs[:, 0], attention_mask=dense.inputs[:, 1]).logits
    assert close(predict(AttributionTask(bert), lazy, batch_size=2), expected)


class Gated(nn.Module):
    """A branch on the data (as Hugging Face's attention masks take) that ``vmap`` cannot run; both branches give the
    same outputs, so each example's gradient is well defined."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.linear(x if bool(keep.all()) else x * keep)


def test_a_model_vmap_cannot_run_gets_the_same_per_example_gradients_from_a_batched_backward():
    torch.manual_seed(0)
    model = Gated()
    x, keep, y = torch.randn(7, 4), torch.ones(7, 4), torch.arange(7) % 3
    keep[2, 1] = 0
    names = [n for n, _ in model.named_parameters()]
    grads = per_sample_gradients(model, names, {"x": x, "keep": keep}, y, cross_entropy, max_memory=3 * 4 * 15 * 4)
    loop = []
    for i in range(7):
        model.zero_grad()
        cross_entropy(model(x=x[i : i + 1], keep=keep[i : i + 1]), y[i : i + 1]).sum().backward()
        loop.append(torch.cat([model.linear.weight.grad.flatten(), model.linear.bias.grad]))
    assert close(grads, torch.stack(loop), 1e-6)


# -- a plain CNN on a torch Dataset of generated images ------------------------------------------------------------

class Images(Dataset):
    """(image, label) tuples, generated on the fly from the index (nothing held but the seed)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        label = int(torch.randint(0, 3, (1,), generator=gen))
        image = torch.randn(1, 8, 8, generator=gen) * 0.5
        image[0, 2 * label : 2 * label + 3] += 1.0  # a class-dependent band
        return image, label


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).eval()


def test_a_cnn_on_a_torch_dataset_equals_the_in_memory_path():
    model = cnn()
    train_lazy = AttributionDataset.from_torch(Images(24, 1), batch_size=5, name="train")
    test_lazy = AttributionDataset.from_torch(Images(6, 2), batch_size=4, name="test")
    to_dense = lambda data: AttributionDataset(torch.stack([data.dataset[i][0] for i in range(len(data))]),
                                               data.labels, name=data.name)
    train, test = to_dense(train_lazy), to_dense(test_lazy)
    assert torch.equal(train_lazy.to_memory().inputs, train.inputs)
    for method, options in (("grad-dot", {}), ("trak", {"projection_dim": 16}), ("if-ekfac", {"batch_size": 7}),
                            ("grad-dot", {"projection_kind": "logra", "projection_dim": 2})):
        task = AttributionTask(model)
        lazy = get_method(method, task, **options).fit(train_lazy).attribute(test_lazy).scores
        dense = get_method(method, task, **options).fit(train).attribute(test).scores
        assert close(lazy, dense), method
    assert close(predict(AttributionTask(model), train_lazy), model(train.inputs).detach())


# -- bad input ---------------------------------------------------------------------------------------------------

class Ragged(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(i + 1), 0


def test_an_item_the_collate_function_cannot_batch_is_refused():
    with pytest.raises(TDAError, match=r"dataset/collate_fn: the default collate_fn.*cannot batch.*stack expects"):
        AttributionDataset.from_torch(Ragged())
    pad = lambda items: (nn.utils.rnn.pad_sequence([x for x, _ in items], batch_first=True),
                         torch.tensor([y for _, y in items]))
    assert len(AttributionDataset.from_torch(Ragged(), collate_fn=pad)) == 4  # a collate_fn that pads: accepted
    with pytest.raises(TDAError, match=r"dataset/collate_fn: collate_fn cannot batch these dataset items \(tuple\): "
                                       r"division by zero"):
        AttributionDataset.from_torch(Images(4, 0), collate_fn=lambda items: 1 / 0)


def test_a_dict_output_without_the_chosen_key_is_refused(splits):
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2 * LENGTH, 3)

        def forward(self, x):
            return {"scores": self.linear(x.flatten(1).float())}

    train, dense = splits["train"]
    with pytest.raises(TDAError, match=r"output='logits': the model's outputs have keys \['scores'\], not 'logits'"):
        get_method("grad-dot", AttributionTask(Scores(), output="logits")).fit(dense)
    with pytest.raises(TDAError, match=r"output: the model returned keys \['scores'\] and none is the logits"):
        get_method("grad-dot", AttributionTask(Scores())).fit(dense)
    scores = get_method("grad-dot", AttributionTask(Scores(), output="scores")).fit(dense).self_influence()
    assert scores.shape == (len(dense),)
    with pytest.raises(TDAError, match="output must be None, a key"):
        AttributionTask(Scores(), output=1.5)


class AsFloat(nn.Module):
    """Token ids as floats into ``inner``: a deliberately wrong head for the shape checks."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flatten(1).float())


def test_outputs_whose_shape_does_not_match_the_labels_are_refused(splits):
    _, dense = splits["train"]
    scores = AsFloat(nn.Sequential(nn.Linear(2 * LENGTH, 1), nn.Flatten(0)))  # [n] scores for [n] class labels
    with pytest.raises(TDAError, match=r"output: the model's outputs \(1,\) do not match the labels \(1,\): class "
                                       r"labels \[n\] need logits \[n, n_classes\]"):
        get_method("grad-dot", AttributionTask(scores)).fit(dense)
    tokens = AsFloat(nn.Sequential(nn.Linear(2 * LENGTH, 6), nn.Unflatten(1, (2, 3))))  # [n, 2, 3] for [n]
    with pytest.raises(TDAError, match=r"output: the model's outputs \(1, 2, 3\) do not match the labels \(1,\)"):
        get_method("trak", AttributionTask(tokens), projection_dim=4).fit(dense.subset(range(5)))
    multi_hot = AttributionDataset(torch.randn(4, 3), torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]]))
    with pytest.raises(TDAError, match=r"labels \(1, 3\) are read as sequence targets.*multi-label targets"):
        get_method("grad-dot", AttributionTask(nn.Linear(3, 3))).fit(multi_hot)


def test_a_dataset_whose_length_changes_between_reads_is_refused():
    data = AttributionDataset.from_torch(Images(6, 0), batch_size=4)
    data.dataset.n = 5  # an item dropped after the labels were read
    with pytest.raises(TDAError, match=r"dataset: its length changed between reads, from 6 to 5 items"):
        list(data.batches())


def test_other_bad_datasets_and_tasks_are_refused():
    with pytest.raises(TDAError, match=r"labels: dataset items 0\.\.3 carry no label.*pass labels="):
        AttributionDataset.from_torch(torch.utils.data.TensorDataset(torch.zeros(4, 2)))
    with pytest.raises(TDAError, match="dataset must be a map-style torch Dataset"):
        AttributionDataset.from_torch(iter([1, 2]))
    with pytest.raises(TDAError, match=r"checkpoints\[0\] must be a Checkpoint"):
        AttributionTask(cnn(), checkpoints=[cnn().state_dict()])
    with pytest.raises(TDAError, match="either loss_fn .* or batch_loss_fn"):
        AttributionTask(cnn(), loss_fn=lambda o, y: o.sum(1), batch_loss_fn=lambda o, b: o.sum(1))


def test_string_labels_are_refused_and_the_users_functions_enter_the_task_config():
    items = [(torch.zeros(2), "cat"), (torch.ones(2), "dog")]
    with pytest.raises(TDAError, match=r"labels: the labels of dataset items 0\.\.1 must be integer class indices, got "
                                       r"tuple like \['cat', 'dog'\]"):
        AttributionDataset.from_torch(items)
    first = AttributionTask(cnn(), measurement=lambda logits, batch: -logits[:, 0], output=lambda o: o)
    second = AttributionTask(cnn(), measurement=lambda logits, batch: -logits[:, 1], output=lambda o: o)
    assert first.config()["measurement"] != second.config()["measurement"]
    assert first.config()["output"] == second.config()["output"] and "output" not in AttributionTask(cnn()).config()


def test_bert_explicit_influence_through_the_kernel_on_dict_inputs_equals_cg(bert, splits):
    """20 examples × 3 classes against thousands of parameters: if-explicit solves through the 60 × 60 kernel, on
    dict inputs read lazily, and agrees with block CG's solve of the same system on the in-memory tensor path."""
    (train, train_dense), (test, test_dense) = splits["train"], splits["test"]
    explicit = get_method("if-explicit", AttributionTask(bert), damping=0.1).fit(train)
    assert explicit.form_ == "kernel" and explicit.factor_.shape[0] == 20 * 3
    cg = get_method("if-cg", AttributionTask(Stacked(bert)), damping=0.1, tol=1e-9).fit(train_dense)
    assert close(explicit.attribute(test).scores, cg.attribute(test_dense).scores, 1e-3)
    assert close(explicit.self_influence(), cg.self_influence(), 1e-3)
