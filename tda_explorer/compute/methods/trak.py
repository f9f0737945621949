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

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_nonnegative, check_positive_int
from tda_explorer.compute.engine.losses import neg_margin
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.training.dropout_masks import DropoutMasks, mask_seed
from tda_explorer.data.dataset import AttributionDataset


class TRAK(Attributor):
    """TRAK with ensembles.

    Parameters
    ----------
    task : AttributionTask
    projection_dim : int
        k (default 2048; gradients with fewer parameters than k are used exactly).
    damping : float, optional
        λ relative to the mean eigenvalue of ΦᵀΦ (λ = damping · tr(ΦᵀΦ)/k). Default (None): the
        training objective's own L2 term, λ = n · ``task.weight_decay`` (the Hessian of the summed
        loss is ≈ ΦᵀQΦ + n·wd·I), or 1e-3 relative when the task has no weight decay.
    models : sequence of state dicts or nn.Modules, optional
        Independently trained models (same architecture as ``task.model``) to ensemble over.
    n_checkpoints : int, optional
        Ensemble over the last ``n_checkpoints`` of the task's checkpoints instead.
    dropout_masks : int, optional
        For each member, also average over this many Dropout passes (the model needs Dropout): each pass draws
        a mask per example, for training and test gradients and for Q (``compute.dropout_masks``).
    """

    name = "trak"

    def __init__(self, task: AttributionTask, *, projection_dim: int | None = 2048, damping: float | None = None,
                 models: Sequence[dict | nn.Module] | None = None, n_checkpoints: int | None = None,
                 dropout_masks: int | None = None, **kwargs):
        super().__init__(task, projection_dim=projection_dim, **kwargs)
        self.damping = check_nonnegative(damping, "damping", optional=True)
        if models is not None and n_checkpoints is not None:
            raise TDAError("pass either models= or n_checkpoints=, not both")
        if models is not None:
            if len(models) == 0:
                raise TDAError("models must contain at least one model")
            states = [m.state_dict() if isinstance(m, nn.Module) else m for m in models]
        elif n_checkpoints is not None:
            n_checkpoints = check_positive_int(n_checkpoints, "n_checkpoints")
            if len(task.checkpoints) < n_checkpoints:
                raise TDAError(f"n_checkpoints={n_checkpoints} but the task has {len(task.checkpoints)} checkpoints")
            states = [c.state_dict for c in task.checkpoints[-n_checkpoints:]]
        else:
            states = [task.model.state_dict()]
        names = set(task.tracked_names())
        self.members = [{k: v for k, v in s.items() if k in names} for s in states]
        self.dropout_masks = None if dropout_masks is None else check_positive_int(dropout_masks, "dropout_masks")

    def config(self) -> dict:
        return {**super().config(), "damping": self.damping, "n_models": len(self.members),
                "dropout_masks": self.dropout_masks}

    def _variants(self) -> list[tuple[int, dict, int | None]]:
        seeds = [None] if self.dropout_masks is None else list(range(self.dropout_masks))
        return [(i, params, s) for i, params in enumerate(self.members) for s in seeds]

    def _q(self, data: AttributionDataset, params: dict, dropout_seed: int | None) -> torch.Tensor:
        """1 − correct-class probability, under the same per-example Dropout masks as the training features."""
        state = {k: v.to(self.device) for k, v in {**self.task.model.state_dict(), **params}.items()}
        model = self.task.model.eval()
        inputs = data.inputs.to(self.device)
        with torch.no_grad():
            if dropout_seed is None:
                out = torch.func.functional_call(model, state, (inputs,))
            else:
                masks = DropoutMasks(model, mask_seed(dropout_seed, test=False),
                                     lambda: torch.func.functional_call(model, state, (inputs[:1],)))
                current = masks.rows(slice(0, len(inputs)), self.device)
                with masks.applied(current):
                    out = torch.func.functional_call(model, state, (inputs,))
            p = out.softmax(-1).gather(1, data.labels.to(self.device).unsqueeze(1)).squeeze(1)
        return 1 - p

    def _fit(self, train: AttributionDataset) -> None:
        self.phi_, self.chol_, self.dual_, self.lam_, qs = [], [], [], [], []
        for i, params, seed in self._variants():
            phi = self._features(train, test=False, params=params, loss_fn=neg_margin,
                                 tag=f"trak-m{i}-d{seed}", dropout_seed=seed)
            phi64 = phi.double()
            # With fewer training examples than features, solve the n×n dual system: by the push-through
            # identity φ′ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ = φ′ᵀΦᵀ(ΦΦᵀ + λI)⁻¹, which is cheaper and identical.
            dual = len(phi) < phi.shape[1]
            gram = phi64 @ phi64.T if dual else phi64.T @ phi64
            if self.damping is None and self.task.weight_decay > 0:
                lam = len(train) * self.task.weight_decay
            else:
                lam = float((1e-3 if self.damping is None else self.damping) * gram.diagonal().mean())
            gram.diagonal().add_(lam)
            try:
                chol = torch.linalg.cholesky(gram)
            except RuntimeError:
                raise TDAError(
                    "ΦᵀΦ + λI is not positive definite; raise damping (now "
                    f"{self.damping}) or lower projection_dim"
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
            else:  # φᵢᵀ(ΦᵀΦ + λI)⁻¹φᵢ = ‖L⁻¹φᵢ‖²
                z = torch.linalg.solve_triangular(chol, phi.double().T, upper=False)
                leverage = leverage + (z * z).sum(0)
        return (leverage / len(self.phi_)).to(self.q_.dtype) * self.q_
