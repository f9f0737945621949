"""Per-example losses for classifiers (outputs ``[B, C]``, targets ``[B]``) and sequence models (outputs
``[B, T, V]``, targets ``[B, T]``, positions with target ``IGNORE`` left out).

A sequence example's value is the *mean over its scored tokens*: a causal language model's per-token loss,
so attributing it asks which training sequences made these tokens likely. Restrict the measurement to
chosen tokens (an answer, a fact's object) by setting the other targets to ``IGNORE``.
"""

from __future__ import annotations

import torch
from torch import nn

from tda_explorer.data.dataset import IGNORE


def _token_mean(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    mask = (targets != IGNORE).to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example; for sequences, the mean over tokens whose target is not ``IGNORE``."""
    if outputs.dim() == 2:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    per_token = nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten(), reduction="none",
                                            ignore_index=IGNORE).view_as(targets)
    return _token_mean(per_token, targets)


def neg_margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log(p / (1 − p)) of the target class: loss-oriented (lower is better), as TRAK's margin; for sequences,
    the mean over scored tokens."""
    logp = torch.log_softmax(outputs, dim=-1)
    index = targets.clamp_min(0).unsqueeze(-1)
    correct = logp.gather(-1, index).squeeze(-1)
    others = logp.scatter(-1, index, float("-inf")).logsumexp(dim=-1)
    margin = others - correct
    return margin if outputs.dim() == 2 else _token_mean(margin, targets)
