"""The default damping of an Adam / AdamW run whose optimizer state was recorded: λ = ADAM_RIDGE × mean(√v̂ + ε) /
(lr · steps), for the direct solvers and ASTRA (benchmarks/README.md, "Damping from an Adam run"), and the exact system
K-FAC / EK-FAC match their damping to; runs without the state keep the spectrum rule."""

import pytest
import torch
from torch import nn

from tda_explorer import AttributionTask, get_method
from tda_explorer.compute.methods.influence.direct import ADAM_RIDGE
from tda_explorer.compute.training.optimizer_state import adam_step_scale, capture_checkpoint
from tda_explorer.compute.training.train import Checkpoint, TrainConfig

ADAM = TrainConfig(epochs=3, batch_size=8, lr=0.01, weight_decay=0.0, optimizer="adam")


def _adam_run(model: nn.Module, train, betas=(0.9, 0.99), eps=1e-6) -> tuple[Checkpoint, torch.optim.Adam]:
    """ADAM's steps on ``train`` with torch's Adam: the final checkpoint (its state captured) and the optimizer."""
    opt = torch.optim.Adam(model.parameters(), lr=ADAM.lr, betas=betas, eps=eps)
    step = 0
    for _ in range(ADAM.epochs):
        for start in range(0, len(train), ADAM.batch_size):
            x, y = train.inputs[start:start + ADAM.batch_size], train.labels[start:start + ADAM.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    return capture_checkpoint(model, opt, ADAM.lr, step), opt


def test_adam_step_scale_is_the_mean_bias_corrected_divisor(tiny_mlp, tiny_data):
    train, _ = tiny_data
    checkpoint, opt = _adam_run(tiny_mlp, train)
    divisors = []
    for p in tiny_mlp.parameters():
        held = opt.state[p]
        v_hat = held["exp_avg_sq"] / (1 - 0.99 ** int(held["step"]))
        divisors.append((v_hat.sqrt() + 1e-6).flatten())
    assert adam_step_scale(checkpoint.optimizer_state) == pytest.approx(float(torch.cat(divisors).mean()), rel=1e-12)
    unstepped = {**checkpoint.optimizer_state, "step": 0}
    assert adam_step_scale(unstepped) is None


@pytest.mark.parametrize("solver", ["explicit", "cg", "astra"])
def test_solvers_take_the_adam_runs_ridge(tiny_mlp, tiny_data, solver):
    train, test = tiny_data
    checkpoint, _ = _adam_run(tiny_mlp, train)
    task = AttributionTask(tiny_mlp, checkpoints=[checkpoint])
    steps = ADAM.epochs * 3  # 20 examples in batches of 8
    lam = ADAM_RIDGE * adam_step_scale(checkpoint.optimizer_state) / (ADAM.lr * steps)
    auto = get_method(f"if-{solver}", task, train_config=ADAM).fit(train)
    if solver == "astra":  # its per-layer λ, read when it solves
        torch.testing.assert_close(auto._damping_flat(), torch.full((auto.n_params,), lam, dtype=torch.float64))
        assert auto.damping_rule_ == "adam"
        return
    assert auto.damping_rule_ == "adam"
    assert auto.lam_ == pytest.approx(lam)
    given = get_method(f"if-{solver}", task, damping=lam).fit(train)
    torch.testing.assert_close(auto.attribute(test).scores, given.attribute(test).scores)


def test_without_the_state_the_spectrum_rule_stays_and_kronecker_matches_at_the_adam_rule(tiny_mlp, tiny_data):
    train, _ = tiny_data
    checkpoint, _ = _adam_run(tiny_mlp, train)
    stateless = Checkpoint(checkpoint.state_dict, ADAM.lr, checkpoint.step, optimizer="adam")
    sgd_run = Checkpoint(checkpoint.state_dict, ADAM.lr, checkpoint.step, optimizer="sgd")
    partial = Checkpoint(checkpoint.state_dict, ADAM.lr, checkpoint.step, optimizer="adam",
                         optimizer_state={"exp_avg": checkpoint.optimizer_state["exp_avg"]})  # no second moment
    for checkpoints in ([], [stateless], [sgd_run], [partial]):
        task = AttributionTask(tiny_mlp, checkpoints=checkpoints)
        assert get_method("if-explicit", task, train_config=ADAM).fit(train).damping_rule_ == "spectrum"
    task = AttributionTask(tiny_mlp, checkpoints=[checkpoint])
    sgd = TrainConfig(epochs=3, batch_size=8, lr=0.01, optimizer="sgd")  # an SGD recipe: its own ridge
    assert get_method("if-explicit", task, train_config=sgd).fit(train).damping_rule_ == "recipe"
    assert get_method("if-explicit", task).fit(train).damping_rule_ == "spectrum"  # no recipe: no lr, no steps
    adam_lam = get_method("if-explicit", task, train_config=ADAM).fit(train).lam_
    for method in ("if-kfac", "if-ekfac"):  # their damping is matched to the exact system at the Adam rule's λ
        kronecker = get_method(method, task, train_config=ADAM).fit(train)
        kronecker._layer_damping()
        assert kronecker.damping_rule_ == "matched" and kronecker.damping_match_.exact_rule == "adam"
        assert kronecker.damping_match_.exact_damping == pytest.approx(adam_lam)
