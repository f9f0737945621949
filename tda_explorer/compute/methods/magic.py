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
- SGD only (the built-in recipes' ``sgd``): Adam's 1/√v is not smooth at v = 0 without an ε inside the root, so
  differentiating the engine's Adam would differentiate a different run; refused by name.
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

import torch
from torch.func import functional_call, grad, vjp, vmap

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.compute.gradients import iter_per_sample_gradients
from tda_explorer.compute.losses import cross_entropy
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.synset import Trajectory
from tda_explorer.compute.task import AttributionTask
from tda_explorer.compute.training import train_weighted
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

SMOOTHNESS_WARNING = 0.8


def metasmoothness(final: list[dict[str, torch.Tensor]]) -> float:
    """Movement-weighted sign agreement of θ(1 + hv) − θ(1) and θ(1 + 2hv) − θ(1 + hv) (three final states)."""
    flat = [torch.cat([p.flatten().double() for p in state.values()]) for state in final]
    first, second = flat[1] - flat[0], flat[2] - flat[1]
    movement = first.abs() + second.abs()
    agree = (torch.sign(first) == torch.sign(second)).double()
    return float((movement * agree).sum() / movement.sum().clamp_min(1e-300))


class ReplayMetagradient(Attributor):
    """Exact metagradients of test measurements through a deterministic SGD run.

    Parameters
    ----------
    task : AttributionTask
        The architecture and the test measurement (its model's parameters are not used: the run's are).
    trajectory : Trajectory
        The run's initial parameters and recipe (``Experiment.trajectory()`` supplies it); the batch order is the
        retraining engine's for ``config.seed``.
    checkpoint_every : int, optional
        Keep every k-th state and recompute segments in reverse (default: keep every state).
    query_chunk : int
        Test measurements sharing one reverse pass.
    """

    name = "magic"

    def __init__(self, task: AttributionTask, *, trajectory: Trajectory | None = None,
                 checkpoint_every: int | None = None, query_chunk: int = 512, smoothness_h: float = 0.1, **kwargs):
        super().__init__(task, **kwargs)
        if not isinstance(trajectory, Trajectory):
            raise TDAError("magic needs trajectory=Trajectory(init_state, config, ...) of the run to differentiate "
                           "(Experiment.trajectory() gives one)")
        if trajectory.config.optimizer != "sgd":
            raise TDAError(f"magic differentiates SGD steps; this run uses optimizer={trajectory.config.optimizer!r}. "
                           "Supported: 'sgd' (train the recipe with optimizer='sgd')")
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by magic: its adjoints live in parameter space")
        self.trajectory = trajectory
        self.checkpoint_every = None if checkpoint_every is None else check_positive_int(checkpoint_every,
                                                                                          "checkpoint_every")
        self.query_chunk = check_positive_int(query_chunk, "query_chunk")
        self.smoothness_h = float(smoothness_h)
        self.base = copy.deepcopy(task.model).to("meta")

    def config(self) -> dict:
        return {**super().config(), "checkpoint_every": self.checkpoint_every, "seed": self.trajectory.config.seed}

    # -- the run ------------------------------------------------------------------------------
    def _factory(self, seed: int) -> torch.nn.Module:
        model = copy.deepcopy(self.task.model)
        model.load_state_dict(self.trajectory.init_state)
        return model

    def _step(self, params: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> dict:
        """One SGD step of the weighted objective, as a pure function of (parameters, batch weights)."""
        c, bs = self.trajectory.config, self.batch_size_

        def objective(p: dict) -> torch.Tensor:
            loss = (w * cross_entropy(functional_call(self.base, p, (x,)), y)).sum() / bs
            if c.weight_decay:
                loss = loss + 0.5 * c.weight_decay * sum((q * q).sum() for q in p.values())
            return loss

        g = grad(objective)(params)
        return {k: params[k] - c.lr * g[k] for k in params}

    def _fit(self, train: AttributionDataset) -> None:
        c, n = self.trajectory.config, len(train)
        self.batch_size_ = min(c.batch_size, n)
        self.positions_: list[torch.Tensor] = []
        self.states_: dict[int, dict[str, torch.Tensor]] = {}
        keep = self.checkpoint_every or 1

        def record(step: int, positions: torch.Tensor, params: dict, lr: float) -> None:
            self.positions_.append(positions.detach().to(self.device))
            if step % keep == 0:
                self.states_[step] = {k: v.detach().clone() for k, v in params.items()}

        started = time.perf_counter()
        final = train_weighted(self._factory, train.inputs, train.labels, torch.ones(1, n), c, [c.seed],
                               device=self.device, callback=record)
        self.training_seconds_ = time.perf_counter() - started  # the recorded run: the unit costs are given in
        self.final_ = {k: v[0].detach().clone() for k, v in final.items()}
        h = self.smoothness_h
        v = torch.randn(n, generator=torch.Generator().manual_seed(c.seed + 1))
        weights = torch.stack([torch.ones(n), 1 + h * v, 1 + 2 * h * v])
        runs = train_weighted(self._factory, train.inputs, train.labels, weights, c, [c.seed] * 3, device=self.device)
        self.metasmoothness_ = metasmoothness([{k: p[m] for k, p in runs.items()} for m in range(3)])
        if self.metasmoothness_ < SMOOTHNESS_WARNING:
            warnings.warn(f"metasmoothness {self.metasmoothness_:.2f} < {SMOOTHNESS_WARNING}: this run's training map "
                          "is not smooth (ReLU, large steps), so metagradients predict only tiny removals",
                          stacklevel=3)
        self.x_, self.y_ = train.inputs.to(self.device), train.labels.to(self.device)

    def _states(self, start: int, stop: int) -> list[dict[str, torch.Tensor]]:
        """Parameters before steps ``start … stop−1`` (stored, or recomputed from the segment's first)."""
        if self.checkpoint_every is None:
            return [self.states_[t] for t in range(start, stop)]
        states = [self.states_[start]]
        with torch.no_grad():
            for t in range(start, stop - 1):
                rows = self.positions_[t]
                states.append(self._step(states[-1], self.x_[rows], self.y_[rows],
                                         torch.ones(len(rows), device=self.device, dtype=self.x_.dtype
                                                    if self.x_.is_floating_point() else torch.float32)))
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
            g = torch.cat([g for _, g in iter_per_sample_gradients(
                self.task.model, names, part.inputs, part.labels, measurement, params=self.final_,
                device=self.device, ids=part.ids)])
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
        segment = self.checkpoint_every or steps
        for seg_start in reversed(range(0, steps, segment)):
            seg_stop = min(seg_start + segment, steps)
            states = self._states(seg_start, seg_stop)
            for t in reversed(range(seg_start, seg_stop)):
                check_cancelled()
                rows = self.positions_[t]
                w = torch.ones(len(rows), dtype=dtype, device=self.device)
                _, pullback = vjp(lambda p, wb, rows=rows: self._step(p, self.x_[rows], self.y_[rows], wb),
                                  states[t - seg_start], w)
                adjoint, w_bar = vmap(pullback)(adjoint)
                scores.index_add_(1, rows, w_bar)
        return scores

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return -self.metagradients(test)

    def _self_influence(self) -> torch.Tensor:
        """−∂ℓ_i/∂w_i: how much each example's own weight lowers its final training loss (one query each)."""
        return -torch.diagonal(self.metagradients(self._check_fitted(), self.task.train_loss))
