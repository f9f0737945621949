"""DDA — debias and denoise attribution for fine-tuned models (Wu, Pang, Shen, Cheng, EMNLP 2024), around any
attributor.

The paper's formulas are not published; this is the reconstruction its abstract supports, with the open choices
made here and measured on the planted-backdoor scenario (``evaluate --scenario backdoor``):
- **Denoise**: scores averaged over fine-tuning checkpoints (θ_ft at several points of the fine-tuning run), each
  first normalised per test row (zero mean, unit standard deviation) so no checkpoint's scale dominates. Late
  checkpoints have fitted the examples that matter most, whose gradients then shrink; earlier ones still see
  them. Measured: Grad-Dot AUC 0.953 → 0.989 (recall@20 0.25 → 0.61), EK-FAC 0.997 → 1.000, TRAK 0.768 → 0.855.
- **Debias**: subtract the base model's normalised scores, weighted per query by the probability the base model
  already gave the query's measured output, z(τ_ft) − p_base(y | x)·z(τ_base). The weight is the choice made
  here: the "knowledge bias" to remove is what the base model already knew, and a base model that gives the
  output no probability knew nothing of it. Measured: an unweighted subtraction (raw, z-scored, or regressed
  out) dropped Grad-Dot's AUC to 0.004–0.93 and EK-FAC's to 0.0–0.58, because a base model that never saw the
  backdoor's label scores every example with that label by the size of an unseen class's gradients;
  ``debias_weight="one"`` keeps the unweighted form.
- Both together by default; ``debias=False`` or ``denoise=False`` gives each step alone.
The base and the fine-tuned models must share parameter names and shapes (the first mismatch is named).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.data.dataset import AttributionDataset


def check_same_parameters(base: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], argument: str) -> None:
    """Refuse two state dicts whose parameter names or shapes differ, naming the first difference."""
    for name, value in fine_tuned.items():
        if name not in base:
            raise TDAError(f"{argument}: the fine-tuned model has {name!r}, the base model has no such parameter")
        if base[name].shape != value.shape:
            raise TDAError(f"{argument}: {name!r} is {tuple(base[name].shape)} in the base model but "
                           f"{tuple(value.shape)} after fine-tuning")
    missing = [n for n in base if n not in fine_tuned]
    if missing:
        raise TDAError(f"{argument}: the base model has {missing[0]!r}, the fine-tuned model has no such parameter")


def _normalised(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Zero mean and unit standard deviation along ``dim`` (each test row's scores over the training set)."""
    centred = scores - scores.mean(dim, keepdim=True)
    return centred / centred.std(dim, keepdim=True).clamp_min(1e-12)


class DebiasDenoise(Attributor):
    """DDA around the method ``inner`` (any registry name) with its ``inner_options``.

    Parameters
    ----------
    task : AttributionTask
        The fine-tuned model; its ``checkpoints`` are the fine-tuning checkpoints (denoising), else the final model.
    base_model : nn.Module or state dict
        The model before fine-tuning (debiasing).
    inner : str
        The attribution method wrapped (a registry name).
    inner_options : dict
        Its options.
    debias, denoise : bool
    """

    name = "dda"

    def __init__(self, task: AttributionTask, *, base_model: nn.Module | dict | None = None, inner: str = "grad-dot",
                 inner_options: dict | None = None, debias: bool = True, denoise: bool = True,
                 debias_weight: str = "confidence", **kwargs):
        super().__init__(task, **kwargs)
        from tda_explorer.compute.methods import METHODS

        if inner not in METHODS or inner == self.name:
            raise TDAError(f"inner must be one of {sorted(m for m in METHODS if m != self.name)}, got {inner!r}")
        if debias and base_model is None:
            raise TDAError("debias needs base_model=<the model before fine-tuning> (or debias=False)")
        self.base_state = None
        if base_model is not None:
            self.base_state = base_model.state_dict() if isinstance(base_model, nn.Module) else dict(base_model)
            check_same_parameters(self.base_state, task.model.state_dict(), "base_model")
        self.inner, self.inner_options = inner, dict(inner_options or {})
        self.debias, self.denoise = debias, denoise
        self.debias_weight = check_choice(debias_weight, "debias_weight", ("confidence", "one"))

    def config(self) -> dict:
        return {**super().config(), "inner": self.inner, "inner_options": self.inner_options, "debias": self.debias,
                "denoise": self.denoise, "debias_weight": self.debias_weight}

    def _states(self) -> Sequence[dict]:
        finals = [self.task.model.state_dict()]
        checkpoints = [c.state_dict for c in self.task.checkpoints if c.step > 0]
        return checkpoints if self.denoise and checkpoints else finals

    def _attributor(self, state: dict, checkpoints: list[Checkpoint]) -> Attributor:
        from tda_explorer.compute.methods import get_method

        model = copy.deepcopy(self.task.model)
        model.load_state_dict(state)
        task = AttributionTask(model, checkpoints=checkpoints, measurement=self.task.measurement,
                               parameters=self.task.parameters, loss_fn=self.task.loss_fn,
                               weight_decay=self.task.weight_decay)
        return get_method(self.inner, task, device=self.device, **self.inner_options)

    def _fit(self, train: AttributionDataset) -> None:
        checkpoints = list(self.task.checkpoints)  # for methods that read them (TracIn)
        self.fine_tuned_ = [self._attributor(s, checkpoints).fit(train) for s in self._states()]
        self.base_ = None
        if self.debias:
            self.base_ = self._attributor(self.base_state, [Checkpoint(self.base_state, 1.0, 0)]).fit(train)

    def _base_confidence(self, data: AttributionDataset) -> torch.Tensor:
        """p_base(y | x) per example of ``data`` (for sequences, exp of minus the mean token loss)."""
        if self.debias_weight == "one":
            return torch.ones(len(data))
        model = self.base_.task.model
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(data.inputs.to(self.device))
            loss = self.base_.task.train_loss(out, data.labels.to(self.device))
        model.train(was)
        return torch.exp(-loss).float().cpu()

    def _combine(self, parts: list[torch.Tensor], base: torch.Tensor | None, confidence: torch.Tensor | None,
                 dim: int) -> torch.Tensor:
        """Denoise (normalised checkpoint average), then debias (confidence-weighted normalised base scores)."""
        combined = torch.stack([_normalised(p, dim) if self.denoise else p for p in parts]).mean(0)
        if base is None:
            return combined
        weight = confidence[:, None] if dim == 1 else confidence
        return _normalised(combined, dim) - weight * _normalised(base, dim)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        parts = [a.attribute(test).scores for a in self.fine_tuned_]
        if self.base_ is None:
            return self._combine(parts, None, None, 1)
        return self._combine(parts, self.base_.attribute(test).scores, self._base_confidence(test), 1)

    def _self_influence(self) -> torch.Tensor:
        train = self._check_fitted()
        parts = [a.self_influence() for a in self.fine_tuned_]
        if self.base_ is None:
            return self._combine(parts, None, None, 0)
        return self._combine(parts, self.base_.self_influence(), self._base_confidence(train), 0)
