"""Adapters that run peer libraries on our experiments, in the same process (optional extras).

Install with ``make bench-deps`` (cleanlab, and dattri with ``--no-deps`` so it cannot replace torch).
Each adapter returns scores as ``[n_test, n_train]`` with our sign convention, and its wall time.
"""

from __future__ import annotations

import importlib.util
import time

import torch
from torch import nn

from tda_explorer.compute.training import out_of_fold_probabilities, train_ensemble, unstack
from tda_explorer.evaluate.experiment import Experiment


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _loaders(exp: Experiment, batch_size: int = 64):
    from torch.utils.data import DataLoader, TensorDataset

    tr, te = exp.split.train, exp.split.test
    train = DataLoader(TensorDataset(tr.inputs, tr.labels), batch_size=batch_size, shuffle=False)
    test = DataLoader(TensorDataset(te.inputs, te.labels), batch_size=batch_size, shuffle=False)
    return train, test


def dattri_scores(exp: Experiment, method: str, ensemble: int = 1, device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Grad-Dot, Grad-Cos, TracIn or TRAK through dattri 0.3 with its defaults (512-d projection)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = exp.factory(0).to(device).eval()
    ce = nn.CrossEntropyLoss()

    def loss_func(params, data):
        x, y = data
        return ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def margin(params, data):
        x, y = data
        logp = -ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data):
        x, y = data
        return torch.exp(-ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0)))

    train_loader, test_loader = _loaders(exp)
    # dattri's defaults (512-d projection) with the device set: its default projector device is "cpu"
    projector = {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0, "device": device}
    final = exp.record.model.state_dict()
    t0 = time.perf_counter()
    if method in ("grad-dot", "grad-cos"):
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=[final])
        attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=method == "grad-cos",
                                      device=device, projector_kwargs=projector)
        scores = attributor.attribute(train_loader, test_loader)
    elif method == "tracin":
        ckpts = [c.state_dict for c in exp.record.checkpoints]
        lrs = torch.tensor([c.learning_rate for c in exp.record.checkpoints])
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ckpts)
        scores = TracInAttributor(task, weight_list=lrs, normalized_grad=False, device=device,
                                  projector_kwargs=projector).attribute(
            train_loader, test_loader)
    elif method == "trak":
        states = [final]
        if ensemble > 1:
            tr = exp.split.train
            stacked = train_ensemble(exp.factory, tr.inputs, tr.labels, torch.arange(len(tr)).expand(ensemble - 1, -1),
                                     exp.config, seeds=[exp.config.seed + 1 + i for i in range(ensemble - 1)])
            states += [unstack(stacked, i) for i in range(ensemble - 1)]
        task = AttributionTask(loss_func=margin, model=model, checkpoints=states)
        attributor = TRAKAttributor(task, correct_probability_func=correct_probability, device=device,
                                    projector_kwargs=projector)
        attributor.cache(train_loader)
        scores = attributor.attribute(test_loader)
    else:
        raise ValueError(f"no dattri adapter for {method}")
    return scores.T.contiguous().float(), time.perf_counter() - t0


def cleanlab_suspicion(exp: Experiment, folds: int = 5) -> tuple[torch.Tensor, float]:
    """cleanlab's confident-learning label quality on out-of-fold probabilities of the same model."""
    from cleanlab.rank import get_label_quality_scores

    tr = exp.split.train
    t0 = time.perf_counter()
    probs = out_of_fold_probabilities(exp.factory, tr.inputs, tr.labels, exp.config, folds=folds, seed=exp.config.seed)
    quality = get_label_quality_scores(tr.labels.numpy(), probs.double().numpy())
    return -torch.as_tensor(quality), time.perf_counter() - t0
