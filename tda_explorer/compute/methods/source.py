"""SOURCE (Bae, Lin, Lorraine, Grosse, 2024): segmented stationary approximate unrolling over the recorded
checkpoints, with EK-FAC curvature per segment.

The run's checkpoints are split into L consecutive segments. In segment ℓ (K_ℓ SGD steps) the Hessian H̄_ℓ, each
example's gradient ḡ_ℓ(z) and the step size are treated as constant, so K_ℓ steps multiply a perturbation by
S_ℓ = exp(−c_ℓ H̄_ℓ) with c_ℓ = Σ_steps η, and removing z during the segment moves the parameters by
r_ℓ = (1/N)(I − S_ℓ) H̄_ℓ⁻¹ ḡ_ℓ(z). The score is τ(z, z′) = ∇f(z′; θ_T)ᵀ Σ_ℓ S_L⋯S_{ℓ+1} r_ℓ, computed backwards:
v_L = ∇f(θ_T); for ℓ = L … 1, u_ℓ = φ_ℓ(H̄_ℓ) v_ℓ with φ(σ) = (1 − e^{−cσ})/σ, score += (1/N) u_ℓᵀ ḡ_ℓ(z), and
v_{ℓ−1} = S_ℓ v_ℓ. With EK-FAC each matrix function acts elementwise on the corrected eigenvalues in the
segment's Kronecker eigenbasis. L = 1 with c → ∞ is the EK-FAC influence function.

Choices, from the recipe's pitfalls and our conventions:
- Segment factors: the K-FAC covariances averaged over the segment's checkpoints, one eigenbasis, the corrected
  eigenvalues recomputed at each of those checkpoints in it and averaged; eigenvalues are per-example means.
- ḡ_ℓ(z): z's gradient averaged over the segment's *own* checkpoints (the final one everywhere reduces SOURCE to
  an influence function).
- H̄ includes the objective's weight decay (σ + λ), which also keeps φ bounded by c; no other damping.
- Heavy-ball momentum β is folded into the effective step (c = Σ η / (1 − β), ``momentum=``; the built-in recipes
  have none).
- Segment ℓ's steps run from the previous segment's last checkpoint (the start of training for the first)
  to its own last checkpoint.
- A run of your own loop recorded with ``RunRecorder`` (``recording=``) gives the checkpoints (one per epoch by
  default, at most 10 evenly spaced; ``checkpoint_every``) with their mean learning rates, and its SGD momentum
  (unless ``momentum`` is given). The stationary unrolling is that of (heavy-ball) SGD: an Adam/AdamW run (a
  preconditioned step, whose variant here is not implemented), Nesterov and dampening are refused by name.
- L defaults to 1: on digits more segments did not raise fresh-seed LDS (benchmarks/README.md, design choices).
  One segment already carries what helps here (gradients averaged over the run, curvature damped by the run's
  length 1/c); more segments add early, seed-specific gradient directions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import NONNEGATIVE, POSITIVE_INT, Family, Interval, Options, option, register
from tda_explorer.compute.engine.kfac import (
    LayerFactors,
    corrected_eigenvalues,
    eigenbases,
    layer_covariances,
    rotated_gradients,
    tracked_layers,
)
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.methods.influence.ekfac import kronecker_default_task
from tda_explorer.compute.methods.tracin import recording_checkpoints
from tda_explorer.compute.training.run_recorder import RunRecorder, finished_recording
from tda_explorer.data.dataset import AttributionDataset


@dataclass
class SOURCEArguments(AttributorArguments):
    projection_dim: int | None = option(None, "not supported by source (it works in each layer's eigenbasis): leave "
                                              "None", POSITIVE_INT, cli=False)
    segments: int = option(1, "L, the consecutive segments the checkpoints are split into (at most their number); "
                              "1: one stationary segment over the whole run", POSITIVE_INT)
    fisher: str = option("true", "'true': labels sampled from the model (the GGN in expectation); 'empirical': the "
                                 "observed labels", Options(("true", "empirical")))
    batch_size: int = option(256, "examples per batch while fitting the factors and the per-example gradients",
                             POSITIVE_INT, config=False, cli=True)
    seed: int = option(0, "seed of the labels sampled for the true Fisher", Interval(0, None, integer=True))
    damping: float = option(0.0, "RELATIVE: added to the corrected eigenvalues as a multiple of their mean (0: the "
                                 "weight decay and 1/c already damp)", NONNEGATIVE)
    momentum: float | None = option(None, "the run's heavy-ball momentum β, folded into the effective step "
                                          "c = Σ η / (1 − β); None: the recording's (with recording=), else 0",
                                    Interval(0, 1, high_open=True))
    recording: RunRecorder | None = option(None, "your own SGD loop recorded with RunRecorder: its checkpoints by "
                                                 "replaying it, in place of the task's", config=False)
    checkpoint_every: int | None = option(None, "with recording=: a checkpoint every this many steps and at the end "
                                                "(None: one per epoch, at most 10 evenly spaced)", POSITIVE_INT,
                                          cli=False)


@register("source", Family.PAIRWISE, SOURCEArguments, needs=("checkpoints",))
class SOURCE(Attributor):
    """SOURCE over the task's recorded checkpoints.

    The task's ``checkpoints`` (with learning rates and steps) are the recorded run; tracked parameters must be
    Linear / Conv1d / Conv2d layers (EK-FAC).
    """

    def _setup(self) -> None:
        a = self.args
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by source; it works in each layer's eigenbasis")
        self.skipped_modules_ = kronecker_default_task(self)  # as EK-FAC: its factorable layers, with a warning
        tracked_layers(self.task)  # and unsupported modules the user chose refused before any work
        momentum = a.momentum
        if a.checkpoint_every is not None and a.recording is None:
            raise TDAError("checkpoint_every is for recording=; the task's checkpoints are taken as they are")
        if a.recording is not None:
            momentum = _recorded_momentum(a.recording, a.momentum)
            source = recording_checkpoints(a.recording, a.checkpoint_every, "source")
        else:
            source = self.task.checkpoints
        checkpoints = [c for c in source if c.step > 0]
        if not checkpoints:
            raise TDAError("source needs the task's checkpoints after training started (AttributionTask("
                           "checkpoints=...) from train_model or Experiment.task())")
        adaptive = sorted({c.optimizer for c in checkpoints} - {"sgd"})
        if a.recording is None and adaptive:
            warnings.warn(f"source unrolls the run as (heavy-ball) SGD, but its checkpoints were taken under "
                          f"{', '.join(adaptive)}, whose preconditioned steps it does not model: its segments' "
                          "step sizes are read as SGD's (tracin is Adam-aware)", UserWarning, stacklevel=3)
        if a.segments > len(checkpoints):
            raise TDAError(f"segments={a.segments} exceeds the {len(checkpoints)} recorded checkpoints")
        self.segments = a.segments
        self.checkpoints = sorted(checkpoints, key=lambda c: c.step)
        self.fisher, self.batch_size, self.seed = a.fisher, a.batch_size, a.seed
        self.damping, self.momentum = a.damping, float(momentum or 0.0)
        # the objective's weight decay: the task's, else (a recording) the optimizer's own
        self.weight_decay = self.task.weight_decay or (
            float(a.recording.groups[0].get("weight_decay", 0.0)) if a.recording is not None else 0.0)

    def _params(self, state: dict) -> dict:
        names = dict(self.task.model.named_parameters())
        return {k: v.to(self.device) for k, v in state.items() if k in names}

    def _fit(self, train: AttributionDataset) -> None:
        self.task.model.eval()
        parts = [list(p) for p in torch.tensor_split(torch.arange(len(self.checkpoints)), self.segments)]
        self.segments_: list[tuple[list[LayerFactors], float, torch.Tensor, torch.Tensor]] = []
        previous_step = 0
        for part in parts:
            group = [self.checkpoints[i] for i in part]
            params = [self._params(c.state_dict) for c in group]
            covs = [layer_covariances(self.task, train, self.fisher, self.batch_size, self.seed, self.device, p)
                    for p in params]
            averaged = {name: tuple(sum(c[name][j] for c in covs) / len(covs) for j in range(2)) for name in covs[0]}
            bases = eigenbases(averaged)
            eigen, grads = 0, 0
            for p in params:
                corrected, rotated = corrected_eigenvalues(self.task, train, bases, self.fisher, self.batch_size,
                                                           self.seed, self.device, self.task.train_loss,
                                                           torch.float64, p)
                eigen = eigen + torch.cat([f.eigenvalues.flatten() for f in corrected]) / len(params)
                grads = grads + rotated / len(params)
            sigma = eigen.clamp_min(0) + self.weight_decay + self.damping * eigen.clamp_min(0).mean()
            steps = group[-1].step - previous_step
            c = sum(ck.learning_rate for ck in group) / len(group) * steps / (1 - self.momentum)
            previous_step = group[-1].step
            self.segments_.append((bases, c, sigma, grads))

    def _test_gradients(self, test: AttributionDataset) -> list[torch.Tensor]:
        """∇f(θ_T) per test example as layer matrices (identity bases), at the final checkpoint."""
        identity = [LayerFactors(f.name, torch.eye(f.q_a.shape[0], dtype=torch.float64),
                                 torch.eye(f.q_s.shape[0], dtype=torch.float64), None)
                    for f in self.segments_[-1][0]]
        final = self._params(self.checkpoints[-1].state_dict)
        flat = rotated_gradients(self.task, identity, test, self.task.test_measurement, self.batch_size,
                                 self.device, torch.float64, final, argument="test")
        out, offset = [], 0
        for f in identity:
            shape = (f.q_s.shape[0], f.q_a.shape[0])
            out.append(flat[:, offset : offset + shape[0] * shape[1]].reshape(len(flat), *shape))
            offset += shape[0] * shape[1]
        return out

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        train = self._check_fitted()
        v = self._test_gradients(test)  # per layer [Q, out, in+1] in parameter space
        scores = torch.zeros(len(test), len(train), dtype=torch.float64, device=self.device)
        for bases, c, sigma, grads in reversed(self.segments_):
            rotated = torch.cat([(f.q_s.T.to(x) @ x @ f.q_a.to(x)).flatten(1) for f, x in zip(bases, v)], 1)
            decay = torch.exp(-c * sigma)
            phi = torch.where(sigma > 0, (1 - decay) / sigma.clamp_min(1e-300), torch.full_like(sigma, c))
            scores += (rotated * phi) @ grads.T / len(train)
            moved, v, offset = rotated * decay, [], 0
            for f in bases:
                shape = (f.q_s.shape[1], f.q_a.shape[1])
                block = moved[:, offset : offset + shape[0] * shape[1]].reshape(len(moved), *shape)
                v.append(f.q_s.to(block) @ block @ f.q_a.T.to(block))
                offset += shape[0] * shape[1]
        return scores

    def _self_influence(self) -> torch.Tensor:
        """Each example's score for its own training loss (the diagonal, 256 rows at a time)."""
        train = self._check_fitted()
        task, self.task = self.task, replace(self.task, measurement="loss")
        try:
            return torch.cat([torch.diagonal(self._attribute(train.subset(range(s, min(s + 256, len(train))))),
                                             offset=s) for s in range(0, len(train), 256)])
        finally:
            self.task = task


def _recorded_momentum(recording: RunRecorder, given: float | None) -> float:
    """The recorded run's heavy-ball momentum (``given`` when set), refusing what SOURCE's SGD unrolling is not."""
    finished_recording(recording, "source (it reads the recorded optimizer and rates)")
    if not issubclass(recording.optimizer_class, torch.optim.SGD):
        raise TDAError(f"source unrolls SGD steps (exp(−c·H) per segment); this run used "
                       f"{recording.optimizer_class.__name__}, whose preconditioned steps it does not model: use "
                       "tracin (Adam-aware) or magic/synset-loo with the same recording")
    momenta = {float(g.get("momentum", 0.0)) for g in recording.groups}
    if any(g.get("nesterov") or g.get("dampening", 0.0) for g in recording.groups):
        raise TDAError("source folds heavy-ball momentum into the step (c = Σ η / (1 − β)); this SGD run used "
                       "Nesterov or dampening, which it does not model")
    if given is not None:
        return given
    if len(momenta) > 1:
        raise TDAError(f"source: the recorded parameter groups have different momenta {sorted(momenta)}; pass "
                       "momentum=")
    return momenta.pop()
