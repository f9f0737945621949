"""Kronecker-factored curvature (K-FAC / EK-FAC) for ``nn.Linear`` layers, fitted with hooks.

Per layer with input activations a (a 1 appended for the bias) and pre-activation output gradients s:
A = E[a aᵀ], S = E[s sᵀ], eigendecomposed A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ. K-FAC takes Λ_S ⊗ Λ_A as the
eigenvalues; EK-FAC refits them in the Kronecker eigenbasis, Λ_ij = E[((Q_Sᵀ G Q_A)_ij)²] for per-example layer
gradients G = s aᵀ. By default s comes from labels *sampled from the model* (true Fisher; the empirical Fisher
of a well-fit model is tiny and degenerates to Grad-Dot, see methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.compute.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset

SUPPORTED = (nn.Linear,)


@dataclass
class LayerFactors:
    """Eigenbases and eigenvalues of one layer (weight and bias as one [out, in + 1] matrix)."""

    name: str
    q_a: torch.Tensor
    q_s: torch.Tensor
    eigenvalues: torch.Tensor  # [out, in + 1]: EK-FAC corrected or K-FAC products


def tracked_linear_layers(task: AttributionTask) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules whose weight is tracked; refuse other tracked modules by name."""
    tracked = set(task.tracked_names())
    layers, unsupported = [], []
    for name, module in task.model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if not any(p in tracked for p in own):
            continue
        if isinstance(module, SUPPORTED):
            if module.bias is not None and (f"{name}.bias" if name else "bias") not in tracked:
                raise TDAError(f"layer {name!r}: track both its weight and bias (or neither) for K-FAC/EK-FAC")
            layers.append((name, module))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TDAError(
            f"K-FAC/EK-FAC supports nn.Linear only; tracked parameters include {', '.join(unsupported)}. "
            "Track only Linear layers (parameters=[...]) or use if-explicit / if-cg, which take any module"
        )
    return layers


def _capture(model: nn.Module, layers, inputs, targets_fn, batch_size: int, device):
    """Yield per-batch (name -> (a [B, in+1], s [B, out])) with s the gradient of the summed loss."""
    store: dict[str, list] = {}
    handles = []
    for name, module in layers:
        def fwd(mod, args, out, name=name):
            a = args[0].detach()
            if mod.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            store[name] = [a, None]
            out.register_hook(lambda g, name=name: store[name].__setitem__(1, g.detach()))
        handles.append(module.register_forward_hook(fwd))
    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            model.zero_grad(set_to_none=True)
            out = model(x)
            loss = nn.functional.cross_entropy(out, targets_fn(out.detach(), start), reduction="sum")
            loss.backward()
            yield {name: tuple(store[name]) for name, _ in layers}
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)


def fit_factors(task: AttributionTask, train: AttributionDataset, fisher: str = "true", corrected: bool = True,
                batch_size: int = 256, seed: int = 0, device: torch.device | str = "cpu") -> list[LayerFactors]:
    """Fit K-FAC (``corrected=False``) or EK-FAC factors of the tracked Linear layers on ``train``."""
    check_choice(fisher, "fisher", ("true", "empirical"))
    layers = tracked_linear_layers(task)
    model = task.model
    was = model.training
    model.eval().to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def targets(out: torch.Tensor, start: int) -> torch.Tensor:
        if fisher == "empirical":
            return train.labels[start : start + len(out)].to(out.device)
        return torch.multinomial(out.softmax(-1).cpu().double(), 1, generator=gen).squeeze(1).to(out.device)

    n = len(train)
    try:
        covs = {name: [0, 0] for name, _ in layers}
        for batch in _capture(model, layers, train.inputs, targets, batch_size, device):
            for name, (a, s) in batch.items():
                covs[name][0] = covs[name][0] + a.double().T @ a.double() / n
                covs[name][1] = covs[name][1] + s.double().T @ s.double() / n
        bases = {}
        for name, (cov_a, cov_s) in covs.items():
            ev_a, q_a = torch.linalg.eigh(cov_a)
            ev_s, q_s = torch.linalg.eigh(cov_s)
            bases[name] = (q_a, q_s, torch.outer(ev_s.clamp_min(0), ev_a.clamp_min(0)))
        if corrected:
            lam = {name: 0 for name in bases}
            gen.manual_seed(seed)  # the same sampled labels as for the factors
            for batch in _capture(model, layers, train.inputs, targets, batch_size, device):
                for name, (a, s) in batch.items():
                    q_a, q_s, _ = bases[name]
                    rotated = (s.double() @ q_s).unsqueeze(2) * (a.double() @ q_a).unsqueeze(1)  # [B, out, in]
                    lam[name] = lam[name] + (rotated**2).sum(0) / n
            bases = {name: (q_a, q_s, lam[name]) for name, (q_a, q_s, _) in bases.items()}
    finally:
        model.train(was)
    return [LayerFactors(name, q_a, q_s, ev) for name, (q_a, q_s, ev) in bases.items()]
