"""The default damping read from an SGD training recipe: λ = (1 − momentum) / (lr · steps), the ridge that the run's
gradient steps amount to (benchmarks/README.md, "Damping from the training run"), for the direct solvers, and the
exact system K-FAC / EK-FAC match their damping to; Adam, AdamW or no recipe keep the spectrum-relative rules."""

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.catalogue import method_spec
from tda_explorer.compute.training.train import TrainConfig

SGDM = TrainConfig(epochs=3, batch_size=8, lr=0.05, weight_decay=0.0, optimizer="sgd", momentum=0.9)


def test_implicit_damping_counts_the_runs_steps_and_momentum():
    # 20 examples in batches of 8: 3 steps per epoch, 9 steps; rate 0.05 / (1 − 0.9) = 0.5
    assert SGDM.implicit_damping(20) == pytest.approx(1 / (0.5 * 9))
    plain = TrainConfig(epochs=2, batch_size=64, lr=0.1, optimizer="sgd")
    assert plain.implicit_damping(100) == pytest.approx(1 / (0.1 * 4))
    assert TrainConfig(optimizer="adam").implicit_damping(100) is None
    assert TrainConfig(optimizer="adamw").implicit_damping(100) is None


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_direct_solvers_take_the_recipes_ridge(tiny_mlp, tiny_data, solver):
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.01)
    lam = SGDM.implicit_damping(len(train))
    auto = get_method(f"if-{solver}", task, train_config=SGDM).fit(train)
    given = get_method(f"if-{solver}", task, damping=lam).fit(train)
    assert auto.lam_ == pytest.approx(lam) and auto.damping_rule_ == "recipe" and given.damping_rule_ == "given"
    torch.testing.assert_close(auto.attribute(test).scores, given.attribute(test).scores)


def test_adam_recipe_keeps_the_spectrum_rule(tiny_mlp, tiny_data):
    train, _ = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.01)
    adam = get_method("if-explicit", task, train_config=TrainConfig(optimizer="adam")).fit(train)
    plain = get_method("if-explicit", task).fit(train)
    assert adam.damping_rule_ == plain.damping_rule_ == "spectrum"
    assert adam.lam_ == pytest.approx(plain.lam_)


@pytest.mark.parametrize("method", ["if-kfac", "if-ekfac"])
def test_kronecker_matches_its_damping_at_the_recipes_ridge_and_falls_back_to_it(tiny_data, method, monkeypatch):
    """K-FAC / EK-FAC match their damping to the exact system at the recipe's ridge (matched_damping); where the match
    cannot run they add the ridge itself on every layer (one layer: λ = the relative damping λ / its mean eigenvalue),
    saying so, and without a recipe 0.5 × the mean eigenvalue."""
    from tda_explorer.compute.methods.influence import ekfac
    from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning

    train, test = tiny_data
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    lam = SGDM.implicit_damping(len(train))
    matched = get_method(method, AttributionTask(model), train_config=SGDM).fit(train)
    matched.attribute(test)
    assert matched.damping_rule_ == "matched" and matched.damping_match_.exact_rule == "recipe"
    assert matched.damping_match_.exact_damping == pytest.approx(lam)
    mean = matched.factors_[0].mean_eigenvalue()
    same = get_method(method, AttributionTask(model), damping=matched._layer_damping()[0] / mean).fit(train)
    torch.testing.assert_close(matched.attribute(test).scores, same.attribute(test).scores)

    def no_match(*args, **kwargs):
        raise ValueError("a degenerate sample")

    monkeypatch.setattr(ekfac, "match_damping", no_match)
    auto = get_method(method, AttributionTask(model), train_config=SGDM)
    with pytest.warns(SolverBackoffWarning, match="could not be matched .*a degenerate sample"):
        scores = auto.fit(train).attribute(test).scores  # K-FAC matches in its fit, EK-FAC when first needed
    relative = get_method(method, AttributionTask(model), damping=lam / mean).fit(train)
    torch.testing.assert_close(scores, relative.attribute(test).scores)
    assert auto.damping_rule_ == "recipe"
    adam = get_method(method, AttributionTask(model), train_config=TrainConfig(optimizer="adam"))
    half = get_method(method, AttributionTask(model), damping=0.5).fit(train)
    with pytest.warns(SolverBackoffWarning):
        torch.testing.assert_close(adam.fit(train).attribute(test).scores, half.attribute(test).scores)
    assert adam.damping_rule_ == "spectrum"


def test_a_recipe_resource_fills_train_config_only_where_used():
    factory = lambda seed: nn.Linear(4, 3)  # noqa: E731
    resources = {"recipe": lambda: {"model_factory": factory, "train_config": SGDM}}
    assert method_spec("if-cg").fill({}, resources) == {"train_config": SGDM}
    assert method_spec("if-ekfac").fill({"train_config": None}, resources) == {"train_config": None}
    assert method_spec("if-cg").fill({}, {}) == {}  # used, never required
    assert "train_config" not in method_spec("grad-dot").fill({}, resources)
    assert method_spec("if-kfac").describe()["uses"] == ["recipe"]


def test_a_train_config_of_another_type_is_refused_by_name(tiny_mlp, tiny_data):
    train, _ = tiny_data
    with pytest.raises(TDAError, match="train_config must be a TrainConfig"):
        get_method("if-cg", AttributionTask(tiny_mlp), train_config={"lr": 0.1}).fit(train)


def test_astra_solves_with_the_recipes_ridge_and_raises_it_on_back_off(tiny_mlp, tiny_data):
    """ASTRA solves the direct solvers' system (GGN + D): with an SGD recipe D is its ridge on every layer, and the
    back-off's raise multiplies that; without one D is the direct solvers' spectrum rule."""
    train, test = tiny_data
    task = AttributionTask(tiny_mlp, weight_decay=0.01)
    lam = SGDM.implicit_damping(len(train))
    astra = get_method("if-astra", task, train_config=SGDM).fit(train)
    torch.testing.assert_close(astra._damping_flat(), torch.full((astra.n_params,), lam, dtype=torch.float64))
    assert astra.damping_rule_ == "recipe"
    cg = get_method("if-cg", task, train_config=SGDM).fit(train).attribute(test).scores
    got = astra.attribute(test).scores
    assert torch.corrcoef(torch.stack([got.flatten(), cg.flatten()]))[0, 1] > 0.99
    words = astra._raise_damping(10.0)
    torch.testing.assert_close(astra._damping_flat(), torch.full((astra.n_params,), 10 * lam, dtype=torch.float64))
    assert "recipe rule × 10" in words
    # without a recipe: the direct solvers' spectrum rule, the same λ as if-cg's on every layer, and the same answer
    plain = get_method("if-astra", task).fit(train)
    cg = get_method("if-cg", task, tol=1e-10).fit(train)
    assert plain._layer_damping() == pytest.approx([cg.lam_] * len(plain.factors_), rel=1e-3)
    assert plain.damping_rule_ == "spectrum" and cg.damping_rule_ == "spectrum"
    got, want = plain.attribute(test).scores, cg.attribute(test).scores
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.99
    relative = get_method("if-astra", task, damping=0.1).fit(train)  # a damping given stays relative per layer
    mean = [f.mean_eigenvalue() for f in relative.factors_]
    torch.testing.assert_close(torch.tensor(relative._layer_damping()), 0.1 * torch.tensor(mean))
