"""LoGra: per-layer gradient projection through activations and output gradients (Choe et al., 2024).

A Linear or Conv2d layer's per-example gradient is G = Σ_t s_t [a_t; 1]ᵀ (output gradients s_t, input patches
a_t, see ``kfac``). LoGra projects both sides, P_outᵀ G P_in = Σ_t (P_outᵀ s_t)(P_inᵀ [a_t; 1])ᵀ, which is the
gradient under the Kronecker projection P_out ⊗ P_in: an r_out·r_in feature per layer from two small products,
without ever forming the out × in gradient, let alone the flat one. P_in and P_out are seeded Gaussian matrices
scaled by 1/√r (inner products preserved in expectation); a side no wider than the rank keeps the identity, so a
rank at least every layer's width gives the exact gradient (laid out layer by layer, bias as a last column).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from tda_explorer._validation import TDAError, as_device, check_finite, check_positive_int
from tda_explorer.compute.engine.kfac import layer_activity, sandwich, tracked_layers
from tda_explorer.compute.engine.losses import takes_batch
from tda_explorer.compute.engine.projection import Projector
from tda_explorer.compute.engine.task import AttributionTask, Output, apply_loss, eval_mode
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.jobs import check_cancelled

ALTERNATIVES = "projection_kind='rademacher' or 'gaussian', which project any module's gradient"


def _side(width: int, rank: int, seed: int) -> torch.Tensor:
    if width <= rank:
        return torch.eye(width)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, rank, generator=gen) / rank**0.5


class LoGraProjector(Projector):
    """Projects each tracked Linear / convolutional layer's per-example gradient to ``rank × rank`` features.

    Parameters
    ----------
    task : AttributionTask
        Its tracked parameters must be whole ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers.
    rank : int
        Width each side (inputs with the bias's 1, output gradients) is projected to.
    seed : int
    batch_size : int
        Examples per forward/backward pass.
    device : str or torch.device
    """

    kind = "logra"

    def __init__(self, task: AttributionTask, rank: int, seed: int = 0, batch_size: int = 64,
                 device: str | torch.device | None = None):
        self.rank = check_positive_int(rank, "projection_dim (LoGra's per-layer rank)")
        self.seed = int(seed)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = as_device(device)
        self.layers = tracked_layers(task, "LoGra projection", ALTERNATIVES)
        self.sides: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, (name, module) in enumerate(self.layers):
            weight = module.weight
            width_in = weight[0].numel() + (module.bias is not None)
            base = self.seed * 1_000_003 + 2 * index
            self.sides[name] = (_side(width_in, self.rank, base), _side(weight.shape[0], self.rank, base + 1))
        self.dim_out = sum(p_in.shape[1] * p_out.shape[1] for p_in, p_out in self.sides.values())

    def config(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "seed": self.seed, "dim_out": self.dim_out,
                "layers": [name for name, _ in self.layers]}

    def features(self, task, data, loss_fn, *, params=None, max_memory=None, device="cpu", dropout_seed=None,
                 argument="inputs"):
        """The layers' factored features, from hooks on one forward/backward per batch (no per-example gradient is
        formed); dropout ensembles need the flat gradient, so they are refused."""
        if dropout_seed is not None:
            raise TDAError("dropout ensembles are not supported with projection_kind='logra'; use a dense projection")
        for rows, features in self.iter_features(task.model, data, loss_fn, params, argument, task.output):
            yield rows, check_finite(features, "per-sample gradients", data.ids[rows])

    def iter_features(self, model: torch.nn.Module, data: AttributionDataset,
                      loss_fn: Callable[..., torch.Tensor],
                      params: dict[str, torch.Tensor] | None = None, argument: str = "inputs",
                      output: Output = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, features [chunk, dim_out])`` of ``loss_fn``'s per-example gradients, in eval mode; ``data``
        is read in batches (``data.batches``: tensor or dict inputs, in memory or lazy), ``loss_fn`` is a
        ``(logits, targets)`` loss (the logits chosen by ``output``) or one marked ``takes_batch``."""
        sides = {name: (p_in.to(self.device), p_out.to(self.device)) for name, (p_in, p_out) in self.sides.items()}
        per_example = takes_batch(lambda out, batch: apply_loss(loss_fn, out, batch, output))
        restore = eval_mode(model)
        try:
            batches = layer_activity(model, self.layers, data, [per_example], self.batch_size, self.device,
                                     params or {})
            start = 0
            while True:
                check_cancelled()
                try:
                    patches, (grads,) = next(batches)
                except StopIteration:
                    break
                except TDAError:
                    raise
                except (RuntimeError, IndexError, TypeError) as err:
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise TDAError(f"{argument}: the model failed on examples from {start}: {first}") from err
                parts = [sandwich(sides[name][1], patches[name], grads[name], sides[name][0]).flatten(1)
                         for name, _ in self.layers]
                features = torch.cat(parts, dim=1)
                rows = slice(start, start + len(features))
                start = rows.stop
                yield rows, features
        finally:
            restore()
