"""Layers users bring that the vectorised paths do not take as they are: float32 BatchNorm (its running statistics in
the direct solvers' float64 products) and recurrent layers (``vmap`` refuses their in-place kernels with messages of
their own), each against an independent computation."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tda_explorer import AttributionDataset, AttributionTask, get_method


def test_a_float32_batchnorm_model_gets_the_direct_solvers_of_its_float64_copy():
    torch.manual_seed(0)
    x, y = torch.randn(48, 3, 6, 6), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model.train()
    model(x)  # running statistics as after training
    model.eval()
    train, test = AttributionDataset(x, y), AttributionDataset(x[:5], y[:5])
    double = AttributionDataset(x.double(), y), AttributionDataset(x[:5].double(), y[:5])
    twin = copy.deepcopy(model).double()
    for name in ("if-explicit", "if-cg"):
        single = get_method(name, AttributionTask(model), damping=0.1).fit(train).attribute(test).scores
        reference = get_method(name, AttributionTask(twin), damping=0.1).fit(double[0]).attribute(double[1]).scores
        torch.testing.assert_close(single, reference.float(), rtol=1e-3, atol=1e-4)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(12, 4), cell(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


def _per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Each example's loss gradient and logits' Jacobian, one example at a time (no vmap), flat over the parameters."""
    names = [k for k, _ in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def logits(flat, xi):
        params, start = {}, 0
        for k, shape in zip(names, shapes):
            params[k] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(model, params, (xi.unsqueeze(0),))[0]

    grads, jacobians = [], []
    for xi, yi in zip(x, y):
        flat = theta.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(logits(flat, xi).unsqueeze(0), yi.unsqueeze(0))
        grads.append(torch.autograd.grad(loss, flat)[0])
        jacobians.append(torch.autograd.functional.jacobian(lambda f, xi=xi: logits(f, xi), theta))
    return torch.stack(grads), jacobians, [logits(theta, xi).detach() for xi in x]


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_layers_fall_back_from_vmap_and_match_a_loop(cell):
    torch.manual_seed(0)
    model = Recurrent(cell).double().eval()
    x, y = torch.randint(0, 12, (16, 5)), torch.randint(0, 2, (16,))
    train, test = AttributionDataset(x[:12], y[:12]), AttributionDataset(x[12:], y[12:])
    task = AttributionTask(model)
    grads, jacobians, logits = _per_example(model, x, y)
    g_train, g_test = grads[:12], grads[12:]
    dot = get_method("grad-dot", task).fit(train).attribute(test).scores
    torch.testing.assert_close(dot.double(), g_test @ g_train.T, rtol=1e-4, atol=1e-6)
    ggn = sum(j.T @ (torch.diag(z.softmax(-1)) - torch.outer(z.softmax(-1), z.softmax(-1))) @ j
              for j, z in zip(jacobians[:12], logits[:12])) / 12
    expected = torch.linalg.solve(ggn + 0.1 * torch.eye(len(ggn), dtype=torch.float64), g_test.T).T @ g_train.T / 12
    for name in ("if-explicit", "if-cg"):
        scores = get_method(name, task, damping=0.1).fit(train).attribute(test).scores
        torch.testing.assert_close(scores.double(), expected, rtol=1e-3, atol=1e-6)


class Tied(nn.Module):
    """Two layers sharing one weight (tied weights)."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(torch.tanh(self.inp(x)))))))


def test_tied_weights_run_as_one_parameter_and_kronecker_methods_leave_them_out():
    from tda_explorer.compute.engine.task import call_model
    from tda_explorer.errors import TDAError

    torch.manual_seed(0)
    model = Tied().double().eval()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    train, test = AttributionDataset(x[:16], y[:16]), AttributionDataset(x[16:], y[16:])
    state = model.state_dict()  # lists the shared weight under both names
    assert "fc2.weight" in state
    torch.testing.assert_close(call_model(model, x, state), model(x))
    task = AttributionTask(model)
    for name in ("trak", "lora-ensemble"):
        assert torch.isfinite(get_method(name, task).fit(train).attribute(test).scores).all()
    with pytest.warns(UserWarning, match=r"fc1 \(Linear, tied with fc2\)"):
        ekfac = get_method("if-ekfac", task, damping=0.1)
    assert set(ekfac.task.parameters) == {"inp", "head"}
    with pytest.raises(TDAError, match="layer 'fc1' shares a parameter with 'fc2' .tied weights."):
        get_method("if-ekfac", AttributionTask(model, parameters=["fc1", "head"]), damping=0.1)
    with pytest.raises(TDAError, match="magic .* ties weights across layers \\(fc1, fc2\\)"):
        get_method("magic", task, recording=object())


def test_a_tuple_of_several_tensors_says_which_is_read_as_the_logits():
    from tda_explorer.compute.engine.task import OutputChoiceWarning

    class FeaturesFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            features = torch.tanh(self.body(x))
            return features, self.head(features)

    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    train = AttributionDataset(x, y)
    with pytest.warns(OutputChoiceWarning, match=r"\[0\]: \(6,\), \[1\]: \(3,\); its first element is read"):
        get_method("grad-dot", AttributionTask(FeaturesFirst())).fit(train).attribute(train)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", OutputChoiceWarning)
        get_method("grad-dot", AttributionTask(FeaturesFirst(), output=1)).fit(train).attribute(train)


def test_the_training_engine_refuses_torch_batchnorm_naming_what_to_do():
    """Suspicion's documented recipe (model_factory + train_config) on a BatchNorm MLP: a TDAError naming the module
    and the ways around it (it was a raw torch.func error about an in-place update)."""
    from tda_explorer.compute.training.train import TrainConfig
    from tda_explorer.errors import TDAError

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    from tda_explorer.compute.training.train import Checkpoint

    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    model = factory(0).eval()
    task = AttributionTask(model, checkpoints=[Checkpoint(model.state_dict(), 0.1, 1)])  # its self-influence's
    with pytest.raises(TDAError, match=r"running statistics of 1 \(BatchNorm1d\).*oof_probabilities="):
        get_method("suspicion", task, model_factory=factory, train_config=TrainConfig(epochs=1)).fit(
            AttributionDataset(x, y))


def test_methods_that_need_one_input_tensor_read_a_lazy_dataset_once():
    """lora-ensemble, dda and suspicion on a torch Dataset of tensors (from_torch): the scores of the same data held
    in memory (they had refused it, though the session listed them as runnable)."""
    from tda_explorer.compute.training.train import Checkpoint, TrainConfig

    def factory(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = factory(0).eval()
    task = AttributionTask(model, checkpoints=[Checkpoint(model.state_dict(), 0.1, 1)])
    memory, test = AttributionDataset(x, y), AttributionDataset(x[:5], y[:5])
    lazy = AttributionDataset.from_torch(torch.utils.data.TensorDataset(x, y))
    for name, options in (("lora-ensemble", {}), ("dda", {"base_model": factory(1)})):
        scores = [get_method(name, task, **options).fit(data).attribute(test).scores for data in (memory, lazy)]
        torch.testing.assert_close(scores[1], scores[0])
    options = {"model_factory": factory, "train_config": TrainConfig(epochs=2)}
    ranks = [get_method("suspicion", task, **options).fit(data).self_influence() for data in (memory, lazy)]
    torch.testing.assert_close(ranks[1], ranks[0])


def test_curvature_products_fall_back_a_direction_at_a_time_and_say_so_but_not_out_of_memory(monkeypatch):
    """A vmap refusal (simulated: the recurrent layers' in-place kernels refuse the per-example vmaps, not this one)
    makes the products run a direction at a time with a warning, with the same numbers; running out of memory is
    raised, not hidden behind the slower path."""
    from tda_explorer.compute.engine import curvature as module
    from tda_explorer.compute.engine.curvature import Curvature
    from tda_explorer.compute.engine.gradients import UnvectorisedWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    train, task = AttributionDataset(x, y), AttributionTask(model)
    v = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    expected = Curvature(task, train, "hessian").matvec(v)
    vectorised = module.vmap

    def refusing(error):
        def wrapped(f, *args, **kwargs):
            def call(*a, **k):
                if a and a[0].dim() == 2:  # the products' vmap over directions (rows of v)
                    raise error
                return vectorised(f, *args, **kwargs)(*a, **k)
            return call
        return wrapped

    monkeypatch.setattr(module, "vmap", refusing(RuntimeError("output with shape [1, 24] doesn't match the "
                                                              "broadcast shape [240, 1, 24]")))
    refused = Curvature(task, train, "hessian")
    with pytest.warns(UnvectorisedWarning, match="curvature products run unvectorised: vmap refused the model"):
        torch.testing.assert_close(refused.matvec(v), expected)
    assert refused._shared["unvectorised"]
    monkeypatch.setattr(module, "vmap", refusing(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    fresh = Curvature(task, train, "hessian")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fresh.matvec(v)
    assert not fresh._shared.get("unvectorised")


def test_a_module_run_twice_or_registered_twice_is_not_factored_as_one_use():
    from tda_explorer.errors import TDAError

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.block(torch.tanh(self.block(torch.tanh(self.inp(x)))))))

    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with pytest.raises(TDAError, match="layer 'block' runs more than once in one forward"):
        get_method("if-kfac", AttributionTask(Twice()), damping=0.1).fit(AttributionDataset(x, y))
    twice = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    twice.add_module("again", twice[0])  # one module under two names
    with pytest.warns(UserWarning, match=r"0\.0 \(Linear, tied with 0\.again\) and tracks 1 layers"):
        get_method("if-ekfac", AttributionTask(nn.Sequential(twice, nn.Linear(6, 3))), damping=0.1)
