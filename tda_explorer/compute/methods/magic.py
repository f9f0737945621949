"""Replay metagradients (``magic``; MAGIC, Ilyas & Engstrom 2025, with MGD's REPLAY): the exact derivative of each
test measurement with respect to per-example data weights, through the recorded training run.

The run is the retraining engine's deterministic one (``train_weighted``: the recipe's initialisation and batch
order for its seed; example i's loss weighted by w_i over a fixed batch divisor B): at w = 1 it is the model
attributed, and zeroing w_S is exactly the same-seed retraining without S. One SGD step is the pure map
θ_{t+1} = θ_t − η(∇_θ L_t(θ_t, w) + λθ_t), L_t = (1/B)Σ_{i∈B_t} w_i ℓ_i; the reverse pass walks t = T−1 … 0 taking
one vector-Jacobian product of that map per step (a double backward through the batch), for all test
measurements at once (``vmap`` over their adjoints), and adds the weight part to the batch's examples:
∂f/∂w_i = Σ_{t: i∈B_t} (−η/B) ∇ℓ_i(θ_t)ᵀ ā_{t+1}. Score τ_i = −∂f/∂w_i: the predicted rise of the test loss when i
is removed (positive = proponent), as every method here.

Choices, measured or derived:
- Every parameter is differentiated (the data weights move all of them), whatever the task tracks.
- States: every step's parameters kept by default (digits: 800 × 9.6k floats); ``checkpoint_every=k`` keeps one
  in k and recomputes each segment forward before reversing it (memory O(T/k + k)); both give the same scores.
- SGD: the built-in recipes' ``sgd``, or any loop recorded with ``RunRecorder`` on ``torch.optim.SGD`` (momentum,
  dampening, Nesterov, weight decay, any schedule: the recorded rates are used; the momentum buffer joins the
  adjoint state). Adam's 1/√v is not smooth at v = 0 without an ε inside the root, so differentiating it would
  differentiate a different run; refused by name, as is Dropout active during the recorded run.
- Metasmoothness (MGD Def. 2) is measured at ``fit``: final parameters at w = 1, 1 + hv, 1 + 2hv (v ~ N(0, I),
  h = 0.1, one lock-step run); the movement-weighted share of coordinates whose two successive differences agree
  in sign. Near 1 the training map is smooth and metagradients predict removals; below ``SMOOTHNESS_WARNING``
  (ReLU networks, large steps) a warning says the scores hold only for tiny perturbations.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, grad, vjp, vmap

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, option, register
from tda_explorer.compute.engine.gradients import iter_per_sample_gradients
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.engine.task import pick_output, tied_layers
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.methods.synset import Trajectory
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.compute.training.train import train_weighted
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory
from tda_explorer.jobs import check_cancelled

SMOOTHNESS_WARNING = 0.8
SUPPORTED = "torch.optim.SGD (momentum, dampening, Nesterov, weight decay, any lr schedule) and the built-in 'sgd'"


def metasmoothness(final: list[dict[str, torch.Tensor]]) -> float:
    """Movement-weighted sign agreement of θ(1 + hv) − θ(1) and θ(1 + 2hv) − θ(1 + hv) (three final states)."""
    flat = [torch.cat([p.flatten().double() for p in state.values()]) for state in final]
    first, second = flat[1] - flat[0], flat[2] - flat[1]
    movement = first.abs() + second.abs()
    agree = (torch.sign(first) == torch.sign(second)).double()
    return float((movement * agree).sum() / movement.sum().clamp_min(1e-300))


@dataclass
class ReplayMetagradientArguments(AttributorArguments):
    projection_dim: int | None = option(None, "not supported by magic (its adjoints live in parameter space): leave "
                                              "None", POSITIVE_INT, cli=False)
    trajectory: Trajectory | None = option(None, "a built-in recipe's run: its initial parameters and recipe "
                                                 "(Experiment.trajectory() gives one); the batch order is the "
                                                 "retraining engine's for config.seed. Give this or recording",
                                           config=False)
    recording: RunRecorder | None = option(None, "or any loop recorded with RunRecorder on torch.optim.SGD "
                                                 "(momentum, dampening, Nesterov, weight decay, any lr schedule), "
                                                 "replayed exactly for the forward states", config=False)
    checkpoint_every: int | None = option(None, "keep every k-th step's state and recompute each segment forward "
                                                "before reversing it (memory O(T/k + k)); None: keep every state",
                                          POSITIVE_INT)
    query_chunk: int = option(512, "test measurements sharing one reverse pass", POSITIVE_INT)
    smoothness_h: float = option(0.1, "step h of the metasmoothness check at fit (data weights 1, 1 + hv, 1 + 2hv, "
                                      "v ~ N(0, I))", POSITIVE)


@register("magic", Family.PAIRWISE, ReplayMetagradientArguments, needs=("trajectory",))
class ReplayMetagradient(Attributor):
    """Exact metagradients of test measurements through a deterministic SGD run.

    The task gives the architecture and the test measurement (its model's parameters are not used: the run's are);
    the run is ``trajectory=`` (a built-in recipe) or ``recording=`` (your own SGD loop), exactly one of the two.
    """

    tensor_inputs = True  # dict inputs (a tokenizer's) are refused

    @classmethod
    def refuses_recipe(cls, config: Any) -> str | None:
        if config.optimizer != "sgd":
            return f"magic differentiates SGD steps; this session's recipe trains with {config.optimizer!r}"
        return None

    def _setup(self) -> None:
        a, task = self.args, self.task
        trajectory, recording = a.trajectory, a.recording
        if (trajectory is None) == (recording is None):
            raise TDAError("magic needs the run to differentiate: trajectory=Trajectory(init_state, config, ...) of "
                           "a built-in recipe (Experiment.trajectory() gives one) or recording=RunRecorder(...) of "
                           "your own loop — one of the two")
        tied = tied_layers(task.model)
        if tied:
            raise TDAError(f"magic differentiates each parameter's own updates; this model ties weights across "
                           f"layers ({', '.join(sorted(tied))}), which it does not follow: use trak, tracin or if-cg")
        if trajectory is not None and not isinstance(trajectory, Trajectory):
            raise TDAError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
        if trajectory is not None and trajectory.config.optimizer != "sgd":
            raise TDAError(f"magic differentiates SGD steps; this run uses optimizer={trajectory.config.optimizer!r}. "
                           f"Supported: {SUPPORTED}")
        if recording is not None:
            _check_recording(recording)
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by magic: its adjoints live in parameter space")
        self.trajectory, self.recording = trajectory, recording
        self.checkpoint_every, self.query_chunk = a.checkpoint_every, a.query_chunk
        self.smoothness_h = float(a.smoothness_h)
        self.base = copy.deepcopy(task.model).to("meta")

    # -- the run ------------------------------------------------------------------------------
    def _factory(self, seed: int) -> torch.nn.Module:
        model = copy.deepcopy(self.task.model)
        model.load_state_dict(self.trajectory.init_state)
        return model

    def _step(self, t: int, params: dict, buffer: dict | None, rows: torch.Tensor, w: torch.Tensor
              ) -> tuple[dict, dict | None]:
        """Step t of torch.optim.SGD on the weighted loss Σ wᵢℓᵢ/B, a pure function of (parameters, momentum
        buffer, batch weights): d = g + λθ; b = d at the first step, else μb + (1 − dampening)d; θ − η(d + μb)
        with Nesterov, θ − ηb without, θ − ηd when μ = 0."""
        h = self.hyper_
        x, y = self.x_[rows], self.y_[rows]

        def objective(p: dict) -> torch.Tensor:
            return (w * self.loss_fn_(functional_call(self.base, {**self.frozen_, **p}, (x,)), y)).sum() / h["B"]

        g = grad(objective)(params)
        d = {k: g[k] + h["weight_decay"] * params[k] for k in params} if h["weight_decay"] else g
        if not h["momentum"]:
            new_buffer, direction = None, d
        else:
            new_buffer = d if buffer is None else {
                k: h["momentum"] * buffer[k] + (1 - h["dampening"]) * d[k] for k in params}
            direction = {k: d[k] + h["momentum"] * new_buffer[k] for k in params} if h["nesterov"] else new_buffer
        lr = self.learning_rates_[t]
        return {k: params[k] - lr * direction[k] for k in params}, new_buffer

    def _fit(self, train: AttributionDataset) -> None:
        self.positions_: list[torch.Tensor] = []
        self.states_: dict[int, tuple[dict, dict | None]] = {}
        keep = self.checkpoint_every or 1
        names = [k for k, _ in self.task.model.named_parameters()]
        self.frozen_ = {k: v.to(self.device) for k, v in self.task.model.named_buffers()}
        data = in_memory(train, self.name)  # a lazy dataset (from_torch) read once: every step indexes its rows
        self.x_, self.y_ = data.inputs.to(self.device), train.labels.to(self.device)
        started = time.perf_counter()
        if self.recording is not None:
            final, runs = self._fit_recorded(train, names, keep)
        else:
            final, runs = self._fit_engine(train, keep)
        self.training_seconds_ = time.perf_counter() - started - self.smoothness_seconds_
        self.final_ = {k: final[k].detach().clone().to(self.device) for k in names}
        self.metasmoothness_ = metasmoothness(runs)
        if self.metasmoothness_ < SMOOTHNESS_WARNING:
            warnings.warn(f"metasmoothness {self.metasmoothness_:.2f} < {SMOOTHNESS_WARNING}: this run's training map "
                          "is not smooth (ReLU, large steps), so metagradients predict only tiny removals",
                          stacklevel=3)

    def _smoothness_weights(self, n: int, seed: int) -> torch.Tensor:
        h, v = self.smoothness_h, torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
        return torch.stack([torch.ones(n), 1 + h * v, 1 + 2 * h * v])

    def _fit_engine(self, train: AttributionDataset, keep: int) -> tuple[dict, list[dict]]:
        c, n = self.trajectory.config, len(train)
        self.hyper_ = {"B": min(c.batch_size, n), "weight_decay": c.weight_decay, "momentum": 0.0,
                       "dampening": 0.0, "nesterov": False}
        self.learning_rates_: list[float] = []
        self.loss_fn_ = cross_entropy  # the engine's training loss

        def record(step: int, positions: torch.Tensor, params: dict, lr: float) -> None:
            self.positions_.append(positions.detach().to(self.device))
            self.learning_rates_.append(lr)
            if step % keep == 0:
                self.states_[step] = ({k: v.detach().clone() for k, v in params.items()}, None)

        final = train_weighted(self._factory, train.inputs, train.labels, torch.ones(1, n), c, [c.seed],
                               device=self.device, callback=record)
        started = time.perf_counter()
        weights = self._smoothness_weights(n, c.seed)
        runs = train_weighted(self._factory, train.inputs, train.labels, weights, c, [c.seed] * 3, device=self.device)
        self.smoothness_seconds_ = time.perf_counter() - started
        return {k: v[0] for k, v in final.items()}, [{k: p[m] for k, p in runs.items()} for m in range(3)]

    def _fit_recorded(self, train: AttributionDataset, names: list[str], keep: int) -> tuple[dict, list[dict]]:
        r = self.recording
        if train.fingerprint() != r.data_fingerprint:
            raise TDAError("train: magic must be fitted on the data the run was recorded on")
        group = r.groups[0]
        self.hyper_ = {"B": r.batch_size, "weight_decay": group.get("weight_decay", 0.0),
                       "momentum": group.get("momentum", 0.0), "dampening": group.get("dampening", 0.0),
                       "nesterov": group.get("nesterov", False)}
        self.learning_rates_ = [rates[0] for rates in r.learning_rates]
        self.loss_fn_ = lambda outputs, y: r.loss_fn(pick_output(outputs, r.output), y)  # the recorded loss

        def record(step: int, rows: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            self.positions_.append(rows.to(self.device))
            if step % keep == 0:
                params = dict(model.named_parameters())
                buffers = [optimizer.state[p].get("momentum_buffer") for p in params.values()]
                buffer = None if any(b is None for b in buffers) else {
                    k: b.detach().clone().to(self.device) for k, b in zip(params, buffers)}
                self.states_[step] = ({k: v.detach().clone().to(self.device) for k, v in params.items()}, buffer)

        final = r.replay(callback=record)
        started = time.perf_counter()
        runs = [r.replay(weights=w) for w in self._smoothness_weights(len(train), 0).double()]
        self.smoothness_seconds_ = time.perf_counter() - started
        return final, [{k: run[k] for k in names} for run in runs]

    def _states(self, start: int, stop: int) -> list[tuple[dict, dict | None]]:
        """(parameters, momentum buffer) before steps ``start … stop−1``: stored, or recomputed from the segment's
        first state."""
        if self.checkpoint_every is None:
            return [self.states_[t] for t in range(start, stop)]
        states = [self.states_[start]]
        with torch.no_grad():
            for t in range(start, stop - 1):
                rows = self.positions_[t]
                params, buffer = states[-1]
                w = torch.ones(len(rows), device=self.device, dtype=next(iter(params.values())).dtype)
                states.append(self._step(t, params, buffer, rows, w))
        return states

    def metagradients(self, data: AttributionDataset, measurement: Callable | None = None) -> torch.Tensor:
        """∂f_q/∂w_i ``[n_query, n_train]`` for each example of ``data`` (f: the task's test measurement, or
        ``measurement(outputs, targets)``)."""
        train = self._check_fitted()
        measurement = measurement or self.task.test_measurement
        names = list(self.final_)
        out = []
        for start in range(0, len(data), self.query_chunk):
            part = data.subset(range(start, min(start + self.query_chunk, len(data))))
            g = torch.cat([g for _, g in iter_per_sample_gradients(  # the part's batches: lazy data too
                self.task.model, names, part, None, measurement, params=self.final_, device=self.device,
                ids=part.ids)])
            adjoint, offset = {}, 0
            for k in names:
                size = self.final_[k].numel()
                adjoint[k] = g[:, offset : offset + size].reshape(len(g), *self.final_[k].shape).to(
                    self.final_[k].dtype)
                offset += size
            out.append(self._reverse(adjoint, len(train)))
        return torch.cat(out)

    def _reverse(self, adjoint: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        steps = len(self.positions_)
        dtype = next(iter(adjoint.values())).dtype
        scores = torch.zeros(next(iter(adjoint.values())).shape[0], n, dtype=dtype, device=self.device)
        buffer_bar = {k: torch.zeros_like(v) for k, v in adjoint.items()} if self.hyper_["momentum"] else None
        segment = self.checkpoint_every or steps
        for seg_start in reversed(range(0, steps, segment)):
            seg_stop = min(seg_start + segment, steps)
            states = self._states(seg_start, seg_stop)
            for t in reversed(range(seg_start, seg_stop)):
                check_cancelled()
                rows = self.positions_[t]
                params, buffer = states[t - seg_start]
                w = torch.ones(len(rows), dtype=dtype, device=self.device)
                if buffer_bar is None:  # plain SGD: the state is the parameters alone
                    _, pullback = vjp(lambda p, wb, t=t, rows=rows: self._step(t, p, None, rows, wb)[0], params, w)
                    adjoint, w_bar = vmap(pullback)(adjoint)
                elif buffer is None:  # the first momentum step creates the buffer
                    _, pullback = vjp(lambda p, wb, t=t, rows=rows: self._step(t, p, None, rows, wb), params, w)
                    adjoint, w_bar = vmap(pullback)((adjoint, buffer_bar))
                    buffer_bar = {k: torch.zeros_like(v) for k, v in adjoint.items()}
                else:
                    _, pullback = vjp(lambda p, b, wb, t=t, rows=rows: self._step(t, p, b, rows, wb), params, buffer,
                                      w)
                    adjoint, buffer_bar, w_bar = vmap(pullback)((adjoint, buffer_bar))
                scores.index_add_(1, rows, w_bar)
        return scores

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return -self.metagradients(test)

    def _self_influence(self) -> torch.Tensor:
        """−∂ℓ_i/∂w_i: how much each example's own weight lowers its final training loss (one query each)."""
        return -torch.diagonal(self.metagradients(self._check_fitted(), self.task.train_loss))


def _check_recording(recording: RunRecorder) -> None:
    """Refuse what the metagradient cannot differentiate exactly, naming it."""
    finished_recording(recording, "magic (it differentiates through the replayed steps)")
    if recording.optimizer_class is not torch.optim.SGD:
        raise TDAError(f"magic differentiates SGD steps; this run used {recording.optimizer_class.__name__}. "
                       f"Supported: {SUPPORTED}")
    if len(recording.groups) != 1:
        raise TDAError(f"recording: magic supports one parameter group, this optimizer has {len(recording.groups)}")
    if recording.groups[0].get("maximize"):
        raise TDAError("recording: SGD with maximize=True is not supported")
    random = [type(m).__name__ for m in recording.model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    if recording.training and random:
        raise TDAError(f"recording: the run trained with {', '.join(sorted(set(random)))} active; metagradients need "
                       "a deterministic step — record with the model in eval mode or without Dropout")
