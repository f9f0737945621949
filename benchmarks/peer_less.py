"""Peer check of LESS: our ``compute.selection.less`` beside dattri-llm 0.1's ``LESSAttributor`` on the same
warmup checkpoints, Adam states, pool and target (the planted pool of ``evaluate_selection``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_less.py [--seed 0] [--live] [--json PATH]

dattri-llm's LESS in its frozen-checkpoint form: at every checkpoint, a train example's feature is the Adam update
direction its gradient would induce from that checkpoint's optimizer state (``gradient.ops.precondition``, applied
inside the capture hooks when the ``HookManager`` is given the optimizer), a query's is its raw gradient; each side
is unit-normalised over the concatenation of every hooked layer and the checkpoint's cosines are summed with the
given ``checkpoint_weights`` (LESS: the checkpoints' learning rates). It runs on a plain ``nn.Module`` on a CPU.
Two ways in, both run here on the same optimizers:

* ``path="cache"`` (default, needs only torch): capture each checkpoint's preconditioned pool gradients and raw
  target gradients with ``HookManager(optimizer=...)`` into in-memory stores around our own forward/backward (the
  route ``peers.py`` takes for dattri-llm's K-FAC), then ``LESSAttributor.attribute_from_cache(...,
  checkpoint_weight=lr)`` per checkpoint, summed.
* ``path="live"``: ``LESSAttributor(args, task=AttributionTask(...), optimizers=..., checkpoint_weights=lrs)
  .attribute(pool, target)``, the library's one-call frozen form. Its ``GradientStreamer`` imports
  ``transformers`` (``set_seed`` on entering each pass, which also reseeds the global RNGs).

Definitions, checked line by line against dattri-llm 0.1 and then numerically (``exact`` below):

* Same: the Adam direction ``m̂′ / (√v̂′ + ε)`` with ``m′ = β₁m + (1−β₁)g``, ``v′ = β₂v + (1−β₂)g²``, both
  bias-corrected at step ``t + 1`` and ε outside the root (``ops/optimizer.py::_adam`` divides
  ``m/(1−β₁ᵗ)`` by ``√v/√(1−β₂ᵗ) + ε``: the same expression); weight decay left out of the direction by both;
  Γ formed before any projection; cosine of a unit pool feature with a unit target gradient at the same
  checkpoint; the sum over checkpoints weighted by their learning rates.
* Scale of the weights: ours renormalised to sum to one, dattri-llm's as given (the raw mean learning rates). A
  constant factor; the dattri-llm matrices are divided by Σ lr before comparing.
* Loss reduction: dattri-llm's per-example gradient is ``activation ⊗ grad_output`` of whatever loss is
  backpropagated. With a batch-*mean* loss every captured gradient is g/B, and since the Adam map is not
  homogeneous in g (``m′`` and ``v′`` mix g with the stored moments) that changes Γ's direction, not just its
  norm. The adapter backpropagates the batch *sum* of per-example losses, so g is the example's own gradient, as
  in ours. Run on a batch-mean loss instead (``batch_mean_cross_entropy``: what dattri-llm's default
  ``model(**batch).loss`` gives a Hugging Face model), its scores also depend on the batch size, and on the
  planted pool (seed 0, B = 512) they fall to Spearman 0.15 with ours at the pool level, and the paper's
  max-score top 5% to 44% target-source examples (ours: 100%).
* Projection: ours is one Rademacher sketch of the whole flat Γ to ``projection_dim``; dattri-llm's ``"dense"``
  projection is per layer (each hooked layer gets its own ``proj_dim`` sketch from dattri's ``random_project``),
  so 1024 there means 2 × 1024 features for the two-layer MLP. Different random maps of the same exact cosine:
  the exact runs (``projection_dim=None`` on both sides; the MLP has 9,610 parameters) isolate the definitions,
  the 1024 runs show the two sketches' noise, with ours-1024 against ours-exact as the reference.
* Aggregation and selection: dattri-llm returns the per-(pool, target example) matrix only; the per-subtask mean of
  cosines, the max over subtasks and the top-5% allocation (ours: ``per-subtask``; the paper: ``max``) are ours,
  applied to both matrices.
* Speed (CPU, one thread): exact, dattri-llm's hooks (materialise each per-example layer gradient and precondition
  it) take about half our time. With a ``"dense"`` projection its time is dominated by building each layer's
  projection matrix, recovered by pushing an identity through dattri's CPU ``random_project`` once per
  ``HookManager``: 8 builds on the cache path (4 checkpoints x 2 sides), 4 on the live path (shared hooks).
* Sample identity: dattri-llm keys rows/columns by a content hash of the model inputs, and the planted pool
  repeats (image, source) pairs, so the MLP is wrapped to take an ignored ``idx`` argument that is hashed (live)
  or read as the id (``sample_id_key="idx"``, cache) instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.selection.less import LESS, AdamCheckpoint, WarmupConfig, allocate, warmup
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.planted import load_planted_pool

sys.path.insert(0, str(Path(__file__).parent))
from peers import IndexedModel  # noqa: E402

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Rows(torch.utils.data.Dataset):
    """An ``AttributionDataset`` as dict rows ``{"x", "y", "idx"}`` for dattri-llm's streamer."""

    def __init__(self, data: AttributionDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.data.inputs[i], "y": self.data.labels[i], "idx": torch.tensor(i)}


def from_adam_checkpoints(model: nn.Module, checkpoints: Sequence[AdamCheckpoint],
                          ) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[torch.optim.Optimizer],
                                     list[float]]:
    """Our ``AdamCheckpoint`` list in dattri-llm's frozen-form inputs: a copy of ``model``, one state dict and one
    ``torch.optim.AdamW`` per checkpoint (over the copy's parameters, holding that checkpoint's moments and step),
    and the checkpoints' mean learning rates."""
    model = copy.deepcopy(model).cpu()
    named = dict(model.named_parameters())
    states, optimizers, lrs = [], [], []
    for c in checkpoints:
        if set(c.params) != set(named):
            raise ValueError("dattri-llm's LESS here covers every parameter: capture checkpoints of the whole model")
        state = model.state_dict()
        state.update({k: v.detach().clone() for k, v in c.params.items()})
        optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=0.0)
        for name, p in named.items():
            optimizer.state[p] = {"step": torch.tensor(float(c.step)), "exp_avg": c.exp_avg[name].clone(),
                                  "exp_avg_sq": c.exp_avg_sq[name].clone()}
        states.append(state)
        optimizers.append(optimizer)
        lrs.append(float(c.lr))
    return model, states, optimizers, lrs


def _hook_config(projection_dim: int | None, proj_type: str, proj_seed: int):
    from dattri_llm import REGISTER_ALL, HookManagerConfig

    projection = None
    if projection_dim is not None:
        projection = {"__default__": {"style": "dense", "proj_dim": projection_dim, "proj_type": proj_type,
                                      "proj_seed": proj_seed, "proj_max_batch_size": 64}}
    return HookManagerConfig(linear_io=REGISTER_ALL, projection_kwargs=projection)


def dattri_llm_less_scores(model: nn.Module, model_checkpoints: Sequence[dict[str, torch.Tensor]],
                           optimizers: Sequence[torch.optim.Optimizer], lrs: Sequence[float],
                           pool: AttributionDataset, target: AttributionDataset, *,
                           projection_dim: int | None = None, proj_type: str = "rademacher", proj_seed: int = 0,
                           loss_fn: LossFn = cross_entropy, batch_size: int = 512, path: str = "cache",
                           ) -> torch.Tensor:
    """dattri-llm 0.1's LESS, frozen-checkpoint form: ``[n_target, n_pool]`` = Σ_k lrs[k] · cos(∇ℓ(target; θ_k),
    Γ_k(pool)), with Γ_k the Adam direction from ``optimizers[k]``'s state.

    ``model`` is loaded with each of ``model_checkpoints`` in turn (its own state-dict keys) and must be the module
    whose parameters ``optimizers`` hold (see ``from_adam_checkpoints``). Every ``nn.Linear`` is hooked;
    ``projection_dim`` None keeps the gradients exact, an int projects each layer (``"dense"``) to that width.
    The loss backpropagated is the batch *sum* of ``loss_fn``'s per-example losses (see the module docstring).
    ``path`` is ``"cache"`` (torch only) or ``"live"`` (``LESSAttributor.attribute``; imports transformers).
    """
    from dattri_llm.attribution import AttributionArguments, LESSAttributor

    if not (len(model_checkpoints) == len(optimizers) == len(lrs)) or not lrs:
        raise ValueError("model_checkpoints, optimizers and lrs must match one to one and not be empty")
    if path not in ("cache", "live"):
        raise ValueError(f"path must be 'cache' or 'live', got {path!r}")
    wrapped = IndexedModel(model).cpu().eval()
    config = _hook_config(projection_dim, proj_type, proj_seed)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        # torch warns that the first layer's full backward hook sees no input gradient (its input is data)
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        args = AttributionArguments(output_dir=f"{out}/scores", use_cpu=True, per_device_train_batch_size=batch_size,
                                    per_device_eval_batch_size=batch_size, max_grad_norm=None)
        if path == "live":
            return _live(wrapped, model_checkpoints, optimizers, lrs, pool, target, config, args, loss_fn)
        total = torch.zeros(len(pool), len(target), dtype=torch.float64)
        for state, optimizer, lr in zip(model_checkpoints, optimizers, lrs):
            model.load_state_dict(state)
            stores = {}
            for name, data, opt in (("test", target, None), ("train", pool, optimizer)):
                stores[name] = _capture(wrapped, data, config, opt, loss_fn, batch_size, f"{out}/{name}")
            score = LESSAttributor(args).attribute_from_cache(stores["train"], stores["test"], checkpoint_weight=lr)
            total += score.query([str(i) for i in range(len(pool))],
                                 [str(j) for j in range(len(target))]).double()
    return total.T.contiguous()


def _capture(wrapped: nn.Module, data: AttributionDataset, config, optimizer: torch.optim.Optimizer | None,
             loss_fn: LossFn, batch_size: int, where: str):
    """Per-example gradients of ``data`` (Adam directions when ``optimizer`` is given) into an in-memory store."""
    from dattri_llm import GradientStorageManager, HookManager, OffloadCallback

    store = GradientStorageManager(where, residency="memory")
    offload = OffloadCallback(offload_interval=1, file_manager=store)
    hooks = HookManager(wrapped, config=config, callbacks=[offload], sample_id_key="idx", optimizer=optimizer)
    with hooks.collect(deregister_on_exit=True):
        for start in range(0, len(data), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data)))
            loss_fn(wrapped(data.inputs[rows], idx=rows), data.labels[rows]).sum().backward()
            wrapped.zero_grad(set_to_none=True)
    return store


def _live(wrapped, model_checkpoints, optimizers, lrs, pool, target, config, args, loss_fn) -> torch.Tensor:
    from dattri_llm import hash_batch
    from dattri_llm.attribution import LESSAttributor
    from dattri_llm.task import AttributionTask

    def loss(m: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(m(batch["x"], idx=batch["idx"]), batch["y"]).sum()

    checkpoints = [{f"net.{k}": v for k, v in state.items()} for state in model_checkpoints]
    task = AttributionTask(loss, wrapped, checkpoints=checkpoints)
    less = LESSAttributor(args, task=task, optimizers=list(optimizers), checkpoint_weights=list(lrs))
    score = less.attribute(_Rows(pool), _Rows(target), hook_config=config)
    ids = lambda n: hash_batch({"idx": torch.arange(n)}, n)
    return score.query(ids(len(pool)), ids(len(target))).double().T.contiguous()


def batch_mean_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy divided by the batch size: summed by the adapter, the batch-mean loss (what
    ``model(**batch).loss``, dattri-llm's default ``loss_func``, returns for a Hugging Face classifier)."""
    return cross_entropy(outputs, targets) / len(targets)


def our_less_scores(model: nn.Module, checkpoints: Sequence[AdamCheckpoint], pool: AttributionDataset,
                    target: AttributionDataset, projection_dim: int | None = 1024) -> torch.Tensor:
    """Ours, per (target example, pool example): ``[n_target, n_pool]`` = Σ_k η̄_k cos (η̄ summing to one); every
    target example its own subtask, so a subtask's mean-cosine score is the mean of its rows."""
    less = LESS(model, checkpoints, projection_dim=projection_dim, device="cpu").fit(pool)
    total, _ = less.subtask_scores(target, list(range(len(target))))
    return total.T.contiguous()


def subtask_totals(pairs: torch.Tensor, subtasks: Sequence[Any]) -> tuple[torch.Tensor, list[Any]]:
    """``[n_pool, J]``: the mean over each subtask's target rows of ``pairs`` ``[n_target, n_pool]``."""
    names = list(dict.fromkeys(subtasks))
    rows = torch.tensor([names.index(s) for s in subtasks])
    return torch.stack([pairs[rows == j].mean(0) for j in range(len(names))], 1), names


def compare(a: torch.Tensor, b: torch.Tensor, subtasks: Sequence[Any], k: int, source: np.ndarray,
            target_source: str) -> dict[str, Any]:
    """Pair-level and selection-level agreement of two ``[n_target, n_pool]`` score matrices on the same scale."""
    ta, _ = subtask_totals(a, subtasks)
    tb, _ = subtask_totals(b, subtasks)
    out: dict[str, Any] = {
        "pairs_max_abs_diff": float((a - b).abs().max()),
        "pairs_max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        "pairs_spearman": float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0]),
        "pool_spearman": float(spearmanr(ta.max(1).values.numpy(), tb.max(1).values.numpy())[0]),
    }
    for allocation in ("per-subtask", "max"):
        sa, sb = allocate(ta, k, allocation), allocate(tb, k, allocation)
        out[f"top5_overlap_{allocation}"] = len(set(sa) & set(sb)) / k
        out[f"precision_{allocation}"] = [float(np.mean(source[s] == target_source)) for s in (sa, sb)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--live", action="store_true",
                        help="also run LESSAttributor.attribute (imports transformers), checked against the cache path")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    import dattri_llm
    import dattri_llm.attribution  # noqa: F401  (resolved lazily on first use; its import is not timed)

    planted = load_planted_pool(seed=opts.seed)
    pool, target = planted.pool, planted.target
    subtasks = target.labels.tolist()
    source = np.array(planted.source)
    k = max(1, round(opts.fraction * len(pool)))
    model = make_model("mlp", pool.inputs.shape[1], pool.n_classes, seed=opts.seed)
    t0 = time.perf_counter()
    warmed, checkpoints, _ = warmup(model, pool, WarmupConfig(seed=opts.seed), device="cpu")
    seconds = {"warmup": time.perf_counter() - t0}
    lrs = [c.lr for c in checkpoints]
    lr_sum = sum(lrs)

    scores: dict[str, torch.Tensor] = {}
    runs = [("ours_exact", None, "ours"), ("dattri_llm_exact", None, "cache"),
            (f"ours_{opts.projection_dim}", opts.projection_dim, "ours"),
            (f"dattri_llm_{opts.projection_dim}", opts.projection_dim, "cache")]
    if opts.live:
        import transformers  # noqa: F401  (imported by the live streamer; its import is not timed)

        runs += [("dattri_llm_exact_live", None, "live"),
                 (f"dattri_llm_{opts.projection_dim}_live", opts.projection_dim, "live")]
    runs.append(("dattri_llm_exact_batch_mean_loss", None, "mean"))
    for name, dim, path in runs:
        if path == "ours":
            t0 = time.perf_counter()
            scores[name] = our_less_scores(warmed, checkpoints, pool, target, dim)
        else:
            peer, states, optimizers, peer_lrs = from_adam_checkpoints(warmed, checkpoints)
            t0 = time.perf_counter()
            loss_fn = batch_mean_cross_entropy if path == "mean" else cross_entropy
            scores[name] = dattri_llm_less_scores(peer, states, optimizers, peer_lrs, pool, target, loss_fn=loss_fn,
                                                  projection_dim=dim, path="cache" if path == "mean" else path
                                                  ) / lr_sum
        seconds[name] = time.perf_counter() - t0

    # Our per-pair matrix reproduces LESS.select, so the comparison below is of our selection itself.
    less = LESS(warmed, checkpoints, projection_dim=opts.projection_dim, device="cpu").fit(pool)
    ours_table = less.select(target, opts.fraction, subtasks)
    mine = allocate(subtask_totals(scores[f"ours_{opts.projection_dim}"], subtasks)[0], k)
    reproduces = [pool.ids[i] for i in mine] == ours_table["train_id"].tolist()

    p = opts.projection_dim
    pairs = {"exact: ours vs dattri-llm": ("ours_exact", "dattri_llm_exact"),
             f"{p}: ours vs dattri-llm": (f"ours_{p}", f"dattri_llm_{p}"),
             f"ours {p} vs ours exact (sketch noise)": (f"ours_{p}", "ours_exact"),
             f"dattri-llm {p} vs dattri-llm exact (sketch noise)": (f"dattri_llm_{p}", "dattri_llm_exact"),
             "exact: ours vs dattri-llm on a batch-mean loss (B = 512)": ("ours_exact",
                                                                          "dattri_llm_exact_batch_mean_loss")}
    if opts.live:
        pairs["dattri-llm exact: live attribute vs cache"] = ("dattri_llm_exact_live", "dattri_llm_exact")
        pairs[f"dattri-llm {p}: live attribute vs cache"] = (f"dattri_llm_{p}_live", f"dattri_llm_{p}")
    result = {
        "scenario": "planted-pool", "seed": opts.seed, "pool": len(pool), "n_target": len(target),
        "target_source": planted.target_source, "fraction": opts.fraction, "k": k,
        "model": "mlp 64-128-10", "n_params": sum(q.numel() for q in model.parameters()),
        "checkpoints": len(checkpoints), "checkpoint_lrs": lrs, "dattri_llm_version": dattri_llm.__version__,
        "our_select_reproduced": reproduces, "seconds": {key: round(v, 3) for key, v in seconds.items()},
        "comparisons": {label: compare(scores[a], scores[b], subtasks, k, source, planted.target_source)
                        for label, (a, b) in pairs.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
