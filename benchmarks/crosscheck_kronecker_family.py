"""Cross-check: K-FAC and EK-FAC by hand on a zoo MLP, with one absolute damping λ on every layer (dattri-llm's form),
with and without the biases (dattri-llm hooks the weights only), over the empirical and the expected Fisher.

Everything in float64 from the task's final model: per layer the inputs a (with a 1 appended for the bias, or not) and
the output gradients s of the summed cross-entropy (empirical: the observed labels; expected: the C − 1 roots of
diag(p) − ppᵀ, ``kfac.output_curvature_roots``); A = E[a aᵀ], S = E[Σ s sᵀ], their eigenbases, the refit eigenvalues
E[((Q_Sᵀ s)(Q_Aᵀ a)ᵀ)²] (EK-FAC) or Λ_S ⊗ Λ_A (K-FAC); scores Σ_layers ⟨G_test / (Λ + λ), G_train⟩ in the eigenbasis,
with per-example cross-entropy gradients on both sides. Prints and writes each setting's LDS against the task's
fresh-seed truth::

    .venv/bin/python benchmarks/crosscheck_kronecker_family.py digits-mlp-gelu-adamw --json /tmp/family.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from tda_explorer.compute.engine.kfac import output_curvature_roots
from tda_explorer.evaluate.metrics import lds
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth

DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def layer_io(model: nn.Module, x: torch.Tensor, cotangents: list[torch.Tensor] | torch.Tensor):
    """Per Linear layer: its inputs ``[n, in]`` and, for each logits cotangent ``[n, C]``, its output gradients."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs, outputs = [], []

    def capture(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out)

    hooks = [m.register_forward_hook(capture) for m in layers]
    logits = model(x)
    for h in hooks:
        h.remove()
    cotangents = cotangents(logits) if callable(cotangents) else cotangents
    grads = [torch.autograd.grad(logits, outputs, v, retain_graph=True) for v in cotangents]
    return inputs, [torch.stack([g[k] for g in grads]) for k in range(len(layers))]  # [rows, n, out]


def empirical(labels: torch.Tensor):
    """The cotangent of each example's cross-entropy at its observed label: p − e_y."""
    def cotangent(logits: torch.Tensor) -> list[torch.Tensor]:
        return [logits.detach().softmax(-1) - torch.eye(logits.shape[1], dtype=logits.dtype)[labels]]
    return cotangent


def scores(fisher: str, bias: bool, form: str, damping: float, cache: dict) -> torch.Tensor:
    """Test × train scores of one setting (factors fitted once per Fisher kind and bias choice, in ``cache``)."""
    exp, model = cache["exp"], cache["model"]
    tr, te = exp.split.train, exp.split.test
    key = (fisher, bias)
    if key not in cache:
        x_tr, x_te = tr.inputs.double(), te.inputs.double()
        fit = empirical(tr.labels) if fisher == "empirical" else (
            lambda logits: output_curvature_roots(logits.detach(), tr.labels))
        a_fit, s_fit = layer_io(model, x_tr, fit)
        a_tr, s_tr = layer_io(model, x_tr, empirical(tr.labels))
        a_te, s_te = layer_io(model, x_te, empirical(te.labels))

        def with_bias(a: torch.Tensor) -> torch.Tensor:
            return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if bias else a

        layers = []
        for k in range(len(a_fit)):
            a, s, n = with_bias(a_fit[k]), s_fit[k], len(a_fit[k])
            ea, qa = torch.linalg.eigh(a.T @ a / n)
            es, qs = torch.linalg.eigh(torch.einsum("rni,rnj->ij", s, s) / n)
            refit = torch.einsum("rni,nj->ij", (s @ qs).square(), (a @ qa).square()) / n
            rotate = [(s_side[k][0] @ qs, with_bias(a_side[k]) @ qa) for a_side, s_side in ((a_tr, s_tr), (a_te, s_te))]
            layers.append((torch.outer(es, ea), refit, rotate))
        cache[key] = layers
    total = 0
    for kfac_values, refit, ((s_tr, a_tr), (s_te, a_te)) in cache[key]:
        inverse = 1 / ((refit if form == "ekfac" else kfac_values) + damping)
        g_te = (s_te[:, :, None] * a_te[:, None, :]) * inverse
        total = total + g_te.flatten(1) @ (s_tr[:, :, None] * a_tr[:, None, :]).flatten(1).T
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="a zoo task whose tracked layers are all nn.Linear (an MLP or a regression)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    exp = build_zoo_task(args.task)
    truth = zoo_ground_truth(exp)
    cache = {"exp": exp, "model": exp.record.model.double().eval()}
    rows = []
    for fisher in ("empirical", "expected"):
        for bias in (True, False):
            for form in ("ekfac", "kfac"):
                for damping in DAMPINGS:
                    value = float(lds(scores(fisher, bias, form, damping, cache).float(), truth.masks,
                                      truth.measurements)[0])
                    rows.append({"task": args.task, "fisher": fisher, "bias": bias, "form": form,
                                 "damping": damping, "lds": value})
                    print(f"{fisher:9s} {'with' if bias else 'without'} biases {form:5s} λ={damping:g}: {value:.4f}",
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
