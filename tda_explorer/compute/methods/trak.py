"""TRAK (Park et al. 2023): projected margin gradients through (ΦᵀΦ + λI)⁻¹, Q-weighted, ensembled.

Per model m: Φ_m = Pᵀ∇margin(train), τ_m(z′) = φ_m(z′)ᵀ (Φ_mᵀΦ_m + λI)⁻¹ Φ_mᵀ; the final score is
mean_m τ_m ⊙ mean_m Q_m with Q_i = 1 − p_i (correct-class probability of training example i).
The solve is a float64 Cholesky factorisation, never an explicit inverse (a float32 ``inv`` costs
LDS, see methods.md). Members of the ensemble are any of: the final model, the last checkpoints of
the recorded run, independently trained models, and Dropout masks of each.

Sign: margins enter loss-oriented (−margin) on both sides, so positive = proponent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import NONNEGATIVE, POSITIVE_INT, Family, option, register
from tda_explorer.compute.engine.losses import check_logits, neg_margin
from tda_explorer.compute.engine.task import call_model
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.training.dropout_masks import DropoutMasks, mask_seed
from tda_explorer.data.batching import take_rows
from tda_explorer.data.dataset import AttributionDataset

#: Training rows per float64 block of the kernel and the leverages (a float64 copy of all of Φ is never made).
ROWS_PER_BLOCK = 4096
#: The default relative damping, the zoo's least median regret: benchmarks/README.md "TRAK defaults across the zoo".
DEFAULT_DAMPING = 2.0


@dataclass
class TRAKArguments(AttributorArguments):
    projection_dim: int | None = option(2048, "k, the projected features per model (gradients with fewer parameters "
                                              "than k are used exactly)", POSITIVE_INT)
    damping: float | None = option(DEFAULT_DAMPING, "λ RELATIVE to the mean diagonal of the kernel: λ = damping · "
                                                    "tr(ΦᵀΦ)/min(n, k) for n training examples and k features, the "
                                                    "mean non-zero eigenvalue of ΦᵀΦ at full rank (the task's weight "
                                                    "decay does not enter); None: the default", NONNEGATIVE)
    models: Sequence[dict | nn.Module] | None = option(None, "independently trained models (state dicts or modules "
                                                             "of task.model's architecture) to ensemble over",
                                                       config=False)
    n_checkpoints: int | None = option(None, "ensemble over the last n_checkpoints of the task's checkpoints instead",
                                       POSITIVE_INT)
    dropout_masks: int | None = option(None, "for each member, also average over this many Dropout passes (the "
                                             "model needs Dropout), one mask per example", POSITIVE_INT)


@register("trak", Family.PAIRWISE, TRAKArguments)
class TRAK(Attributor):
    """TRAK with ensembles: projected margin gradients through (ΦᵀΦ + λI)⁻¹, Q-weighted, averaged over members.

    Fitted: ``members`` (the ensembled parameter sets).
    """

    def _setup(self) -> None:
        a, task = self.args, self.task
        self.damping, self.dropout_masks = a.damping, a.dropout_masks
        self.relative_damping = DEFAULT_DAMPING if a.damping is None else float(a.damping)
        if a.models is not None and a.n_checkpoints is not None:
            raise TDAError("pass either models= or n_checkpoints=, not both")
        if a.models is not None:
            if len(a.models) == 0:
                raise TDAError("models must contain at least one model")
            states = [m.state_dict() if isinstance(m, nn.Module) else m for m in a.models]
        elif a.n_checkpoints is not None:
            if len(task.checkpoints) < a.n_checkpoints:
                raise TDAError(f"n_checkpoints={a.n_checkpoints} but the task has {len(task.checkpoints)} "
                               "checkpoints")
            states = [c.state_dict for c in task.checkpoints[-a.n_checkpoints:]]
        else:
            states = [task.model.state_dict()]
        names = set(task.tracked_names())
        self.members = [{k: v for k, v in s.items() if k in names} for s in states]

    def _variants(self) -> list[tuple[int, dict, int | None]]:
        seeds = [None] if self.dropout_masks is None else list(range(self.dropout_masks))
        return [(i, params, s) for i, params in enumerate(self.members) for s in seeds]

    def _q(self, data: AttributionDataset, params: dict, dropout_seed: int | None) -> torch.Tensor:
        """1 − correct-class probability, under the same per-example Dropout masks as the training features; the
        data is read batch by batch on the device (tensor or dict inputs, in memory or lazy)."""
        state = {k: v.to(self.device) for k, v in {**self.task.model.state_dict(), **params}.items()}
        model = self.task.model.eval()  # left in eval mode, as every member's features see it
        masks, parts = None, []
        with torch.no_grad():
            for rows, inputs, labels in data.batches(device=self.device):
                if dropout_seed is None:
                    logits = self.task.forward(inputs, state)
                else:
                    if masks is None:
                        first = take_rows(inputs, slice(0, 1))
                        masks = DropoutMasks(model, mask_seed(dropout_seed, test=False),
                                             lambda first=first: call_model(model, first, state))
                    with masks.applied(masks.rows(rows, self.device)):
                        logits = self.task.forward(inputs, state)
                check_logits(logits, labels)
                parts.append(logits.softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1))
        return 1 - torch.cat(parts)

    def _fit(self, train: AttributionDataset) -> None:
        self.phi_, self.chol_, self.dual_, self.lam_, qs = [], [], [], [], []
        for i, params, seed in self._variants():
            phi = self._features(train, test=False, params=params, loss_fn=neg_margin,
                                 tag=f"trak-m{i}-d{seed}", dropout_seed=seed)
            # With fewer training examples than features, solve the n×n dual system: by the push-through
            # identity φ′ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ = φ′ᵀΦᵀ(ΦΦᵀ + λI)⁻¹, which is cheaper and identical.
            dual = len(phi) < phi.shape[1]
            if dual:
                phi64 = phi.double()
                gram = phi64 @ phi64.T
            else:  # ΦᵀΦ in float64 a block of rows at a time: no float64 copy of Φ
                gram = sum(block.double().T @ block.double() for block in phi.split(ROWS_PER_BLOCK))
            # the mean diagonal of the kernel built (ΦᵀΦ or ΦΦᵀ) is tr(ΦᵀΦ)/min(n, k) either way
            lam = float(self.relative_damping * gram.diagonal().mean())
            gram.diagonal().add_(lam)
            try:
                chol = torch.linalg.cholesky(gram)
            except RuntimeError:
                raise TDAError(
                    "ΦᵀΦ + λI is not positive definite; raise damping (now "
                    f"{self.relative_damping}) or lower projection_dim"
                ) from None
            self.phi_.append(phi)
            self.chol_.append(chol)
            self.dual_.append(dual)
            self.lam_.append(lam)
            qs.append(self._q(train, params, seed))
        self.q_ = torch.stack(qs).mean(0)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        scores = 0
        for (_, params, seed), phi, chol, dual in zip(self._variants(), self.phi_, self.chol_, self.dual_):
            phi_test = self._features(test, test=True, params=params, loss_fn=neg_margin, dropout_seed=seed)
            if dual:  # φ′ᵀΦᵀ (ΦΦᵀ + λI)⁻¹
                scores = scores + torch.cholesky_solve((phi_test.double() @ phi.double().T).T, chol).T.to(phi.dtype)
            else:  # ((ΦᵀΦ + λI)⁻¹ φ′)ᵀ Φᵀ, the solve on the (few) test rows only
                solved = torch.cholesky_solve(phi_test.double().T, chol).T.to(phi.dtype)
                scores = scores + solved @ phi.T
        return scores / len(self.phi_) * self.q_

    def _self_influence(self) -> torch.Tensor:
        leverage = 0
        for phi, chol, dual, lam in zip(self.phi_, self.chol_, self.dual_, self.lam_):
            if dual:  # diag(ΦΦᵀ(ΦΦᵀ + λI)⁻¹) = 1 − λ·diag((ΦΦᵀ + λI)⁻¹)
                leverage = leverage + (1 - lam * torch.cholesky_inverse(chol).diagonal())
            else:  # φᵢᵀ(ΦᵀΦ + λI)⁻¹φᵢ = ‖L⁻¹φᵢ‖², a block of rows at a time
                leverage = leverage + torch.cat([
                    torch.linalg.solve_triangular(chol, block.double().T, upper=False).square().sum(0)
                    for block in phi.split(ROWS_PER_BLOCK)])
        return (leverage / len(self.phi_)).to(self.q_.dtype) * self.q_
