"""Influence functions with K-FAC / EK-FAC curvature (``if-kfac``, ``if-ekfac``) for Linear and convolutional
layers.

τ(z, z′) = (1/n) Σ_layers ⟨G̃′, G̃ / (Λ + λ_l)⟩ with G̃ = Q_Sᵀ G Q_A each example's layer gradient in the
Kronecker eigenbasis (Λ the fitted eigenvalues, λ_l the damping of layer l). Factors are fitted once per ``fit``
and reused across queries and damping values (``with_damping``); self-influence is computed in the eigenbasis,
never through an n×n matrix.

Damping: by default matched on the model (``matched_damping.py``): the level, relative to each layer's mean eigenvalue
or a multiple of the direct solvers' λ, at which the Kronecker scores of a sample of training examples agree best with
those of the exact (un-factored) Fisher of the sample; where the match cannot run, the SGD recipe's ridge on every
layer, else λ_l = 0.5 × the mean eigenvalue of layer l, with a warning. A given ``damping`` is relative per layer
(× layer l's mean eigenvalue, kronfluence's form), or with ``damping_kind="absolute"`` one λ on every layer
(dattri-llm's form). The damping is added *instead of* the objective's weight decay (the block-diagonal Kronecker
approximation scored better with less, spectrum-relative damping than with wd added on every layer);
``weight_decay_term=True`` restores the exact-objective form.
Defaults across the zoo (13 tasks, benchmarks/README.md "Kronecker defaults across the zoo"): the expected Fisher
(Σ_c p_c g_c g_cᵀ, exact over classes) at 0.5 has the least median regret of the Fisher kinds and relative dampings
tried; the sampled true Fisher trailed where the model is near-certain. With ``parameters`` left at the default, the
modules K-FAC cannot factor are skipped with an ``UntrackedModulesWarning`` (only Linear / Conv1d / Conv2d layers
tracked); chosen parameters that include one are a ``TDAError``.
Per-example gradients come straight from layer hooks, already rotated (no flat per-sample gradients). The training
gradients' coordinates are held after ``fit`` when n × the tracked parameters fit in ``max_memory`` (default: a
quarter of the machine's or GPU's memory), so a query is one product (K-FAC, whose gradients take a pass of their
own, matches its default damping in ``fit`` before that pass: the match's memory and theirs are not held at once);
otherwise (or with ``keep_gradients=False``) each query and self-influence recomputes them a batch at a time, in the
memory of one batch (one forward and backward pass over the training set each, as kronfluence does). With a
``store``, the factors (and the held training gradients) are saved there, keyed by the model's fingerprint, and a
later ``fit`` of the same model and data reads them back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import (
    NONNEGATIVE,
    POSITIVE_INT,
    Family,
    Options,
    check_arguments,
    option,
    register,
)
from tda_explorer.compute.engine.fingerprint import config_fingerprint, model_fingerprint
from tda_explorer.compute.engine.kfac import (
    LayerFactors,
    default_layers,
    fisher_and_gradient_rows,
    fisher_rows_per_example,
    fit_factors_and_gradients,
    rotated_gradient_batches,
    rotated_gradients,
    row_numbers,
    tracked_layers,
)
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.methods.influence import matched_damping
from tda_explorer.compute.methods.influence.backoff import SolverBackoffWarning
from tda_explorer.compute.methods.influence.direct import (
    InfluenceArguments,
    device_memory,
    recipe_damping,
    run_damping,
)
from tda_explorer.compute.methods.influence.matched_damping import (
    MATCH_MIN_EXAMPLES,
    DampingMatch,
    match_damping,
    sample_positions,
    sample_sizes,
)
from tda_explorer.data.dataset import AttributionDataset

RELATIVE_DAMPING = 0.5  # λ_l / layer l's mean eigenvalue where the match cannot run and there is no SGD recipe
HOLD_SHARE = 0.25  # by default the training gradients are held between queries when they take at most this share


@dataclass
class EKFACArguments(InfluenceArguments):
    curvature: str = option("fisher", "the curvature the Kronecker factors approximate, layer by layer: the Fisher "
                                      "(which one: fisher), the only choice", Options(("fisher",)))
    # None: matched to the exact curvature on a sample of the training set (matched_damping.py; the zoo's regret,
    # benchmarks/README.md "Kronecker damping matched to the exact curvature"): no fixed level held across the zoo
    damping: float | None = option(None, "RELATIVE per layer: λ_l = damping × the mean eigenvalue of layer l's "
                                         "factored curvature (damping_kind='absolute': λ = damping on every layer), "
                                         "added instead of the weight decay (see "
                                         "weight_decay_term); None: matched on the model, the level at which the "
                                         "Kronecker scores of a sample of training examples agree best with those "
                                         "of the exact (un-factored) Fisher of the sample at the direct solvers' "
                                         "damping (with an SGD train_config its ridge, with an Adam one and the "
                                         "run's recorded optimizer state that run's, else 0.01 × λ_max); "
                                         "damping_match_ reports it",
                                   NONNEGATIVE)
    damping_kind: str = option("relative", "how a given damping is read: 'relative': λ_l = damping × layer l's mean "
                                           "eigenvalue (kronfluence's form); 'absolute': λ = damping on every layer "
                                           "(dattri-llm's form)", Options(("relative", "absolute")))
    weight_decay_term: bool = option(False, "also add the objective's weight decay to the eigenvalues (the exact "
                                            "objective's curvature); by default the relative damping replaces it",
                                     Options((False, True)))
    # median regret over the zoo's 13 tasks, benchmarks/README.md "Kronecker defaults across the zoo"
    fisher: str = option("expected", "'expected': the exact expectation over the model's predicted classes "
                                 "(Σ_c p_c g_c g_cᵀ, C − 1 backward passes; sequences or > 64 classes: one "
                                 "sampled label); "
                                 "'true': one label sampled from the model (the same expectation, estimated); "
                                 "'empirical': the observed labels", Options(("true", "expected", "empirical")))
    # 64: less memory than 256 on every zoo task (a third on the wide CNN) at about the same time;
    # benchmarks/README.md "Kronecker methods: memory beside kronfluence"
    batch_size: int = option(64, "examples per batch while fitting the factors and the per-example gradients (memory, "
                                  "not results)", POSITIVE_INT, config=False, cli=True)


@dataclass
class KroneckerArguments(EKFACArguments):
    """``if-ekfac``'s and ``if-kfac``'s options: EK-FAC's, and whether the training gradients stay in memory."""

    keep_gradients: bool | None = option(None, "hold the training gradients' eigenbasis coordinates after fit (a query "
                                               "is then one product) or recompute them from the training data, a "
                                               "batch at a time, at every query and self-influence (the memory of one "
                                               "batch; one forward and backward pass over the training set each); "
                                               "None: hold them when n × the tracked parameters fit in max_memory, "
                                               "else in a quarter of the machine's (or GPU's) memory",
                                         Options((False, True)), config=False, cli=False)


class UntrackedModulesWarning(SolverBackoffWarning):
    """A Kronecker method (K-FAC / EK-FAC) left at the default ``parameters`` skipped the modules it cannot factor
    (anything but nn.Linear / nn.Conv1d / nn.Conv2d: BatchNorm, LayerNorm, embeddings, …) and tracks the rest."""


def kronecker_default_task(attributor) -> list[str]:
    """When ``attributor.task`` tracks every parameter (``parameters=None``, the default) and some modules are not
    Linear / Conv1d / Conv2d, restrict the task to those layers (``parameters=[...]``, recorded in
    ``config()``), warn with ``UntrackedModulesWarning`` naming the modules skipped and return them; parameters the
    user chose are left alone (an unsupported module among them is a ``TDAError`` naming it)."""
    task = attributor.task
    if task.parameters is not None:
        return []
    keep, skipped = default_layers(task)
    if not skipped:
        return []
    if not keep:
        tracked_layers(task)  # nothing to factor: the error lists what is trackable (none)
    attributor.task = dataclasses.replace(task, parameters=keep)
    attributor.n_params = sum(p.numel() for n, p in task.model.named_parameters()
                              if n in attributor.task.tracked_names())
    shown = ", ".join(skipped[:12]) + (f", … ({len(skipped)} in all)" if len(skipped) > 12 else "")
    warnings.warn(f"{attributor.name}: K-FAC/EK-FAC factors nn.Linear, nn.Conv1d and nn.Conv2d layers only; with the "
                  f"default parameters it skips {shown} and tracks {len(keep)} layers (pass parameters=[...] to "
                  "choose; if-explicit / if-cg / if-lissa take any module)", UntrackedModulesWarning, stacklevel=4)
    return skipped


@register("if-ekfac", Family.PAIRWISE, KroneckerArguments, uses=("recipe",))
class EKFACInfluence(Attributor):
    """EK-FAC influence functions: Kronecker-factored eigenbases with corrected eigenvalues, per layer.

    Supports nn.Linear, nn.Conv1d and nn.Conv2d layers. Fitted: ``factors_`` (per layer), ``train_rot_`` (the training
    gradients in the eigenbasis; None when they are recomputed per query, ``keep_gradients``), ``damping_match_``
    (the default damping matched to the exact curvature, once it is used; ``DampingMatch``); ``with_damping`` changes
    the damping without a refit.
    """

    corrected = True
    default_relative = RELATIVE_DAMPING  # the relative damping when no option, match or recipe sets it

    def _setup(self) -> None:
        if self.projector is not None:
            raise TDAError("projection_dim is not supported by K-FAC/EK-FAC; leave it None")
        if self.args.damping_kind == "absolute" and self.args.damping is None:
            raise TDAError("damping_kind='absolute' reads a given damping as λ on every layer: pass damping=λ too "
                           "(without one the damping is matched on the model)")
        self.skipped_modules_ = kronecker_default_task(self)
        tracked_layers(self.task)  # refuse unsupported modules the user chose (parameters=[...]) before any work

    def _layer_slices(self) -> list[tuple[object, int, bool]]:
        """Each fitted layer with the offset of its weight in the flat gradient and whether a bias follows it."""
        names = self.task.tracked_names()
        sizes = dict((n, p.numel()) for n, p in self.task.model.named_parameters())
        offsets, start = {}, 0
        for n in names:
            offsets[n] = start
            start += sizes[n]
        out = []
        for f in self.factors_:
            prefix = f"{f.name}." if f.name else ""
            out.append((f, offsets[prefix + "weight"], prefix + "bias" in offsets))
        return out

    def _rotate(self, g: torch.Tensor) -> torch.Tensor:
        """Flat per-example gradients [n, p] → concatenated eigenbasis coordinates [n, Σ out·(in+1)]."""
        parts = []
        for f, w0, has_bias in self._layer_slices():
            out_dim, in_dim = f.q_s.shape[0], f.q_a.shape[0] - (1 if has_bias else 0)
            w = g[:, w0 : w0 + out_dim * in_dim].reshape(len(g), out_dim, in_dim)
            if has_bias:
                b = g[:, w0 + out_dim * in_dim : w0 + out_dim * in_dim + out_dim].unsqueeze(2)
                w = torch.cat([w, b], dim=2)
            parts.append((f.q_s.T @ w.double() @ f.q_a).reshape(len(g), -1))
        return torch.cat(parts, dim=1)

    def _unrotate(self, coords: torch.Tensor) -> torch.Tensor:
        """Eigenbasis coordinates [r, Σ out·r_a] → flat gradients [r, p] (inverse of ``_rotate`` on the bases' span)."""
        flat = torch.zeros(len(coords), self.n_params, dtype=torch.float64, device=coords.device)
        start = 0
        for f, w0, has_bias in self._layer_slices():
            out_dim, width, rank = f.q_s.shape[0], f.q_a.shape[0], f.q_a.shape[1]
            block = coords[:, start : start + out_dim * rank].reshape(len(coords), out_dim, rank)
            start += out_dim * rank
            w = f.q_s @ block @ f.q_a.T
            in_dim = width - (1 if has_bias else 0)
            flat[:, w0 : w0 + out_dim * in_dim] = w[:, :, :in_dim].reshape(len(coords), -1)
            if has_bias:
                flat[:, w0 + out_dim * in_dim : w0 + out_dim * in_dim + out_dim] = w[:, :, in_dim]
        return flat

    def _precondition(self, v: torch.Tensor) -> torch.Tensor:
        """The EK-FAC solution ``(P + D)⁻¹ v`` of flat gradients ``v`` [r, p] (float64); outside a thin basis the
        curvature is 0, so there the solution is the part of ``v`` divided by the layer's damping (and weight decay)."""
        v = v.double()
        rotated = self._rotate(v)
        x = self._unrotate(rotated * self._inverse_eigenvalues().to(v))
        if any(f.width for f in self.factors_):
            x = x + (v - self._unrotate(rotated)) * self._complement_inverse().to(v)
        return x

    def _complement_inverse(self) -> torch.Tensor:
        """1 / (wd + λ_l) on each tracked parameter of layer l, in the flat layout (the eigenvalue-0 directions)."""
        wd = self.task.weight_decay if self.args.weight_decay_term else 0.0
        inverse = torch.zeros(self.n_params, dtype=torch.float64)
        for (f, w0, _), lam in zip(self._layer_slices(), self._layer_damping()):
            inverse[w0 : w0 + f.q_s.shape[0] * f.q_a.shape[0]] = 1.0 / max(wd + lam, 1e-300)
        return inverse

    def _layer_damping(self) -> list[float]:
        """λ_l of each fitted layer: ``damping`` × its mean eigenvalue (``damping`` itself with
        ``damping_kind="absolute"``), or by default the level matched to the exact
        curvature on a sample of the training set (``damping_match_``; matched_damping.py); ``damping_rule_`` names the
        rule taken ("given", "matched"; where the match cannot run, the SGD recipe's ridge on every layer, "recipe",
        else ``default_relative`` × each layer's mean eigenvalue, "spectrum", with a warning)."""
        if self.args.damping is not None:
            self.damping_rule_ = "given"
            if self.args.damping_kind == "absolute":
                return [float(self.args.damping)] * len(self.factors_)
            return [self.args.damping * f.mean_eigenvalue() for f in self.factors_]
        match = self._damping_match()
        if match is not None:
            self.damping_rule_ = "matched"
            return match.layer_damping
        absolute = recipe_damping(self.args.train_config, self.train_)
        if absolute is not None:
            self.damping_rule_ = "recipe"
            return [absolute] * len(self.factors_)
        self.damping_rule_ = "spectrum"
        return [self.default_relative * f.mean_eigenvalue() for f in self.factors_]

    def _damping_match(self) -> DampingMatch | None:
        """The damping matched to the exact curvature, computed once per fit; None where it cannot be (no training
        set, or a sample or spectrum it cannot use: ``SolverBackoffWarning`` says why)."""
        if getattr(self, "damping_match_", None) is not None:
            return self.damping_match_
        if self.train_ is None or getattr(self, "_match_failed", False):
            return None
        try:
            self.damping_match_ = self._match()
        except (ValueError, RuntimeError) as err:  # a degenerate sample or spectrum: the older rules serve
            self._match_failed = True
            warnings.warn(f"{self.name}: the damping could not be matched to the exact curvature ({err}); using the "
                          "SGD recipe's ridge or 0.5 × each layer's mean eigenvalue", SolverBackoffWarning,
                          stacklevel=4)
            return None
        return self.damping_match_

    def _match(self) -> DampingMatch:
        train, a = self.train_, self.args
        rows = fisher_rows_per_example(train, a.fisher, matched_damping.MATCH_FISHER_ROWS,
                                       self.task.cross_entropy_loss)
        numbers = row_numbers(self.task, self.factors_, train, self.device)
        fisher, scored = sample_sizes(len(train), rows, numbers, torch.finfo(self._dtype()).bits // 8)
        if scored < min(MATCH_MIN_EXAMPLES, len(train)):
            raise ValueError(f"the sampled Fisher rows would not fit: {scored} examples within the matching's memory")
        sample = train.subset(sample_positions(len(train), fisher, scored))
        exact, rule = run_damping(a.train_config, train, self.task.checkpoints)
        fisher_rows, gradient_rows = fisher_and_gradient_rows(self.task, self.factors_, sample, self.task.train_loss,
                                                              a.fisher, a.batch_size, seed=matched_damping.MATCH_SEED,
                                                              device=self.device, dtype=self._dtype(),
                                                              most_rows=matched_damping.MATCH_FISHER_ROWS,
                                                              gradients=scored)
        return match_damping(self.factors_, fisher_rows, gradient_rows, float(self.task.weight_decay), exact, rule,
                             fisher_examples=fisher)  # (it releases the Fisher rows once it has solved with them)

    def resolved_damping(self) -> tuple[float, str]:
        """The damping in use as the options would give it, ``(damping, damping_kind)``: as given; one λ on every layer
        (the SGD recipe's ridge, an Adam run's, a match to a multiple of the exact system's λ) as ``(λ, "absolute")``;
        else the relative level it amounts to (``resolved_relative_damping``)."""
        if self.args.damping is not None:
            return float(self.args.damping), self.args.damping_kind
        lams = self._layer_damping()
        if len(lams) > 1 and max(lams) == min(lams) > 0:
            return float(lams[0]), "absolute"
        return self.resolved_relative_damping(), "relative"

    def resolved_relative_damping(self) -> float:
        """The relative damping (``damping``'s unit: × each layer's mean eigenvalue) that the damping in use amounts
        to: the geometric mean over the fitted layers of λ_l / mean_l (the level itself for a relative damping; what an
        absolute rule, the SGD recipe's or an Adam run's, amounts to in that unit)."""
        levels = [lam / f.mean_eigenvalue() for f, lam in zip(self.factors_, self._layer_damping())
                  if f.mean_eigenvalue() > 0 and lam > 0]
        if not levels:
            return self.default_relative
        return math.exp(sum(math.log(v) for v in levels) / len(levels))

    def _inverse_eigenvalues(self) -> torch.Tensor:
        """1 / (Λ (+ wd) + λ_layer) in the concatenated eigenbasis layout (float64)."""
        wd = self.task.weight_decay if self.args.weight_decay_term else 0.0
        return torch.cat([
            1.0 / (f.eigenvalues + wd + lam).flatten() for f, lam in zip(self.factors_, self._layer_damping())
        ])

    def _fit(self, train: AttributionDataset) -> None:
        a, key = self.args, None
        self.damping_match_, self._match_failed = None, False
        keep = self._keeps_gradients(train)
        if self.store is not None:
            key = config_fingerprint(model_fingerprint(self.task.model), self.task.config(), "ekfac", a.fisher,
                                     self.corrected, train.fingerprint(), *(() if keep else ("factors only",)))
            cached = self.store.get_object(key)
            if cached is not None:
                self.factors_ = [LayerFactors(**f) for f in cached["factors"]]
                self.train_rot_ = None if cached["train"] is None else cached["train"].to(self.device)
                return
        if self.corrected or not keep:  # EK-FAC holds the gradients its eigenvalue pass computes
            self.factors_, self.train_rot_ = fit_factors_and_gradients(
                self.task, train, a.fisher, self.corrected, a.batch_size, device=self.device,
                loss=self.task.train_loss if keep else None, dtype=self._dtype())
        else:  # K-FAC's gradients take a pass of their own: the damping is matched before it, so that the match's
            # memory and the held gradients' are not needed at once
            self.factors_, _ = fit_factors_and_gradients(self.task, train, a.fisher, False, a.batch_size,
                                                         device=self.device, dtype=self._dtype())
            if a.damping is None:
                self._damping_match()
            self.train_rot_ = rotated_gradients(self.task, self.factors_, train, self.task.train_loss, a.batch_size,
                                                self.device, self._dtype(), argument="train")
        if key is not None:
            entry = {"factors": [f.to_dict() for f in self.factors_],
                     "train": None if self.train_rot_ is None else self.train_rot_.cpu()}
            self.store.put_object(key, entry, {"method": self.name, "dataset": train.name})

    def _keeps_gradients(self, train: AttributionDataset) -> bool:
        """``keep_gradients``, or by default whether n × the tracked parameters (an upper bound on the eigenbasis
        coordinates) fit in ``max_memory``, else in ``HOLD_SHARE`` of the device's memory."""
        if self.args.keep_gradients is not None:
            return self.args.keep_gradients
        budget = self.max_memory or HOLD_SHARE * device_memory(torch.device(self.device))
        return len(train) * self.n_params * torch.finfo(self._dtype()).bits // 8 <= budget

    def _train_batches(self):
        """The training gradients' eigenbasis coordinates, a batch of rows at a time (held, or recomputed)."""
        if self.train_rot_ is not None:
            return self.train_rot_.split(self.args.batch_size)
        return rotated_gradient_batches(self.task, self.factors_, self.train_, self.task.train_loss,
                                        self.args.batch_size, self.device, self._dtype(), argument="train")

    def _dtype(self) -> torch.dtype:
        return torch.float64 if next(self.task.model.parameters()).dtype == torch.float64 else torch.float32

    def _hooked(self, data: AttributionDataset, loss, argument: str = "test") -> torch.Tensor:
        """Eigenbasis coordinates of each example's gradient of ``loss`` (float64 for float64 models); bad input is a
        ``TDAError`` naming ``argument``."""
        return rotated_gradients(self.task, self.factors_, data, loss, self.args.batch_size, self.device,
                                 self._dtype(), argument=argument)

    def with_damping(self, damping: float) -> EKFACInfluence:
        """The same fitted factors with another damping (no refit); ``config()`` reports the new one."""
        self.args = check_arguments(dataclasses.replace(self.args, damping=damping))
        return self

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        inverse = self._inverse_eigenvalues()  # first: a damping matched now does not hold the test gradients too
        test_rot = self._hooked(test, self.task.test_measurement)
        test_rot.mul_(inverse.to(test_rot))
        if self.train_rot_ is not None:
            return (test_rot @ self.train_rot_.T / len(self.train_)).float()
        scores, start = torch.empty(len(test_rot), len(self.train_), dtype=test_rot.dtype, device=test_rot.device), 0
        for rows in self._train_batches():
            scores[:, start : start + len(rows)] = test_rot @ rows.T
            start += len(rows)
        return (scores / len(self.train_)).float()

    def _self_influence(self) -> torch.Tensor:
        inverse = self._inverse_eigenvalues()
        return (torch.cat([(rows**2 * inverse.to(rows)).sum(1) for rows in self._train_batches()])
                / len(self.train_)).float()


@register("if-kfac", Family.PAIRWISE, KroneckerArguments, uses=("recipe",))
class KFACInfluence(EKFACInfluence):
    """K-FAC influence functions: Kronecker-factored curvature per layer (eigenvalues Λ_S ⊗ Λ_A, no correction)."""

    corrected = False
