"""DDA — debias and denoise attribution for fine-tuned models (Wu, Pang, Shen, Cheng, EMNLP 2024), around any
attributor.

The paper's formulas are not published; this is the reconstruction its abstract supports, with the open choices
made here and measured on the planted-backdoor scenario (``evaluate --scenario backdoor``; figures in
``benchmarks/README.md``):
- **Denoise**: scores averaged over fine-tuning checkpoints (θ_ft at several points of the fine-tuning run), each
  first normalised per test row (zero mean, unit standard deviation) so no checkpoint's scale dominates. Late
  checkpoints have fitted the examples that matter most, whose gradients then shrink; earlier ones still see
  them. It raised the poisoned examples' AUC for Grad-Dot, EK-FAC and TRAK.
- **Debias**: subtract the base model's normalised scores, weighted per query by the probability the base model
  already gave the query's measured output, z(τ_ft) − p_base(y | x)·z(τ_base). The weight is the choice made
  here: the "knowledge bias" to remove is what the base model already knew, and a base model that gives the
  output no probability knew nothing of it. An unweighted subtraction (raw, z-scored, or regressed out) lowered
  the AUC, down to below chance, because a base model that never saw the backdoor's label scores every example
  with that label by the size of an unseen class's gradients; ``debias_weight="one"`` keeps the unweighted form.
- Both together by default; ``debias=False`` or ``denoise=False`` gives each step alone.
The base and the fine-tuned models must share parameter names and shapes (the first mismatch is named).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import (
    Family,
    Options,
    create,
    option,
    register,
)
from tda_explorer.compute.methods.base import Attributor, AttributorArguments, attributor_spec, shared_options
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory


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


@dataclass
class DebiasDenoiseArguments(AttributorArguments):
    base_model: nn.Module | dict | None = option(None, "the model before fine-tuning (or its state dict), with the "
                                                       "fine-tuned model's parameter names and shapes; required by "
                                                       "debias", config=False)
    inner: str = option("grad-dot", "the attribution method wrapped: any attributor's catalogue name but dda")
    inner_options: dict = option(help="the inner method's options; the options every attributor takes (device, "
                                      "max_memory, projection_*, store) given to dda are passed on unless set here",
                                 factory=dict, cli=False)
    debias: bool = option(True, "subtract the base model's confidence-weighted normalised scores (needs base_model)")
    denoise: bool = option(True, "average the normalised scores over the task's fine-tuning checkpoints (those with "
                                 "step > 0; none: the final model)")
    debias_weight: str = option("confidence", "the weight of the base model's scores per query: p_base(y | x) "
                                              "('confidence') or 1 ('one')", Options(("confidence", "one")))


@register("dda", Family.PAIRWISE, DebiasDenoiseArguments, needs=("base_model",))
class DebiasDenoise(Attributor):
    """DDA around the method ``inner`` (any attributor's catalogue name) with its ``inner_options``.

    The task is the fine-tuned model; its ``checkpoints`` are the fine-tuning checkpoints (denoising), else the final
    model is used; ``base_model`` is the model before fine-tuning (debiasing).
    """

    tensor_inputs = True  # dict inputs (a tokenizer's) are refused

    def _setup(self) -> None:
        a = self.args
        attributor_spec(a.inner, "inner", self.name, a.inner_options)
        if a.debias and a.base_model is None:
            raise TDAError("debias needs base_model=<the model before fine-tuning> (or debias=False)")
        self.base_state = None
        if a.base_model is not None:
            self.base_state = a.base_model.state_dict() if isinstance(a.base_model, nn.Module) else dict(a.base_model)
            check_same_parameters(self.base_state, self.task.model.state_dict(), "base_model")
        self.inner, self.inner_options = a.inner, dict(a.inner_options)
        self.debias, self.denoise, self.debias_weight = a.debias, a.denoise, a.debias_weight

    def _states(self) -> Sequence[dict]:
        finals = [self.task.model.state_dict()]
        checkpoints = [c.state_dict for c in self.task.checkpoints if c.step > 0]
        return checkpoints if self.denoise and checkpoints else finals

    def _attributor(self, state: dict, checkpoints: list[Checkpoint]) -> Attributor:
        model = copy.deepcopy(self.task.model)
        model.load_state_dict(state)
        task = dataclasses.replace(self.task, model=model, checkpoints=checkpoints)  # the user's output, losses
        return create(self.inner, task, **{**shared_options(self.args), **self.inner_options})

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
            out = model(in_memory(data, self.name).inputs.to(self.device))
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
