"""LAVA (Just et al., ICLR 2023): model-agnostic data valuation by optimal transport to a clean validation set.

Each training example (x, y) and validation example (x', y') are points of a labelled cloud. The ground cost is

    C((x, y), (x', y')) = ‖φ(x) − φ(x')‖² / scale + λ · W(y, y')

with φ a frozen embedding (the model's penultimate layer by default), ``scale`` the mean squared feature distance
(so λ weighs the two terms on one footing whatever the embedding's units) and W(c, c') the exact optimal transport
distance between the class-c training cloud and the class-c' validation cloud under the same feature cost (the
OTDD label distance). Entropic OT between the uniform measures gives the training-side dual potential f, and
the *calibrated gradient*

    s_i = f_i − Σ_{j≠i} f_j / (N − 1)

is the derivative of the OT distance when mass moves onto example i while the weights still sum to one. A high
s_i means example i raises the distance to clean data, so it is harmful; the value returned here is −s_i
(positive = helpful, as everywhere in tda_explorer).

Choices the sources leave open, taken here and measured on digits with flipped labels (figures: design choices in
benchmarks/README.md):
- ε (entropic regularisation) = 0.1 on the scaled cost, i.e. a tenth of the mean feature distance (LAVA's code
  uses blur² = 0.1 on raw features); log-domain Sinkhorn (POT ``sinkhorn_log``) so small ε cannot underflow;
- the validation measure is weighted so each class carries its share of the *training* labels (uniform within a
  class). With a uniform validation measure, a class with more training than validation mass must ship its excess
  across classes at the label-distance price, which shifts whole classes' potentials and buries the per-example
  signal (it detected the flipped labels markedly worse);
- λ = 1 (LAVA's default); ``lambda_label=0`` is the no-label-term ablation, which cannot see label flips;
- the embedding: the trained model's penultimate layer (the input of its last ``nn.Linear``), or ``features=``
  any callable ``inputs -> [n, d]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from tda_explorer._validation import TDAError, as_device
from tda_explorer.compute.catalogue import (
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Family,
    build_arguments,
    option,
    register,
)
from tda_explorer.data.dataset import AttributionDataset


def _ot():
    try:
        import ot
    except ImportError as err:  # pragma: no cover - pot is a dependency; this guards broken installs
        raise TDAError("LAVA needs the optimal-transport package POT: pip install pot") from err
    return ot


def penultimate_features(model: nn.Module, device: str | torch.device | None = None,
                         batch_size: int = 1024) -> Callable[[torch.Tensor], torch.Tensor]:
    """A feature function ``inputs -> [n, d]``: the input of ``model``'s last ``nn.Linear`` (its penultimate layer)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise TDAError("model has no nn.Linear layer to take penultimate features from: pass features=callable")
    head, device = last[-1], as_device(device)

    def embed(inputs: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(inputs), batch_size):
                    model(inputs[start:start + batch_size].to(device))
        finally:
            hook.remove()
            model.train(was)
        return torch.cat(captured).flatten(1).cpu()

    return embed


def label_distances(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                    classes: list[int]) -> np.ndarray:
    """Exact OT distance W(c, c') between every training class cloud and validation class cloud ``[C, C]``."""
    ot = _ot()
    W = np.zeros((len(classes), len(classes)))
    for a, c in enumerate(classes):
        xc = train_x[train_y == c]
        for b, d in enumerate(classes):
            xd = val_x[val_y == d]
            W[a, b] = ot.emd2(np.full(len(xc), 1 / len(xc)), np.full(len(xd), 1 / len(xd)), ot.dist(xc, xd))
    return W


@dataclass
class LAVAArguments:
    """LAVA's options (``LAVA(features=None, *, model=None, lambda_label=1.0, epsilon=0.1, max_iter=5000,
    device=None)``)."""

    features: Callable[[torch.Tensor], torch.Tensor] | None = option(None, "the embedding φ, a callable inputs -> "
                                                                           "[n, d]; None: the penultimate layer of "
                                                                           "model", config=False)
    model: nn.Module | None = option(None, "the trained model whose penultimate layer (the input of its last "
                                           "nn.Linear) embeds the data when features is None", config=False)
    lambda_label: float = option(1.0, "weight λ of the label distance W(y, y') in the ground cost (0: the "
                                      "no-label-term ablation)", NONNEGATIVE)
    epsilon: float = option(0.1, "entropic regularisation of the transport, relative to the mean feature cost (the "
                                 "cost is scaled to mean 1)", POSITIVE)
    max_iter: int = option(5000, "Sinkhorn iterations at most", POSITIVE_INT)
    device: str | torch.device | None = option(None, "where the default embedding runs: 'cpu', 'cuda', … (default "
                                                     "CPU)", config=False)


@register("lava", Family.VALUES, LAVAArguments, needs=("validation",))
class LAVA:
    """Data values by optimal transport to a clean validation set (see the module docstring).

    Options: ``LAVAArguments`` (``features=`` or ``model=`` gives the embedding). ``fit(train, validation)``.

    Attributes (after ``fit``)
    --------------------------
    values_ : Tensor [n_train]
        −calibrated gradient: positive helps, the most negative are the likeliest mislabeled or corrupted.
    calibrated_gradient_ : Tensor [n_train]
        LAVA's own score (higher is worse).
    label_distances_ : DataFrame
        W(c, c') between training and validation classes.
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 model: nn.Module | None = None, lambda_label: float = 1.0, epsilon: float = 0.1,
                 max_iter: int = 5000, device: str | torch.device | None = None):
        if features is None and model is None:
            raise TDAError("LAVA needs features=callable (inputs -> [n, d]) or model= for its penultimate layer")
        if features is not None and not callable(features):
            raise TDAError(f"features must be a callable inputs -> [n, d], got {type(features).__name__}")
        self.args = build_arguments(LAVAArguments, "lava", {
            "features": features, "model": model, "lambda_label": lambda_label, "epsilon": epsilon,
            "max_iter": max_iter, "device": device})
        self.features = features or penultimate_features(model, device)
        self.lambda_label, self.epsilon = float(lambda_label), float(epsilon)
        self.max_iter = max_iter
        self.train_: AttributionDataset | None = None

    def _embed(self, data: AttributionDataset, argument: str) -> np.ndarray:
        emb = torch.as_tensor(self.features(data.inputs))
        if emb.ndim != 2 or emb.shape[0] != len(data):
            raise TDAError(f"features must map {argument}'s {len(data)} inputs to [n, d], got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise TDAError(f"features of {argument} contain NaN or inf")
        return emb.double().numpy()

    def fit(self, train: AttributionDataset, validation: AttributionDataset) -> LAVA:
        """Value every example of ``train`` against the clean ``validation`` set; returns ``self``."""
        for data, name in ((train, "train"), (validation, "validation")):
            if not isinstance(data, AttributionDataset):
                raise TDAError(f"{name} must be an AttributionDataset, got {type(data).__name__}")
            data.check_class_labels(name)
        if len(train) < 2:
            raise TDAError(f"train must hold at least 2 examples to value them against each other, got {len(train)}")
        ty, vy = train.labels.numpy(), validation.labels.numpy()
        only_train, only_val = sorted(set(ty) - set(vy)), sorted(set(vy) - set(ty))
        if only_train or only_val:
            named = lambda cs: ", ".join(train.class_names[c] if c < len(train.class_names) else str(c) for c in cs)
            problems = ([f"training classes without validation examples: {named(only_train)}"] if only_train else []) \
                + ([f"validation classes without training examples: {named(only_val)}"] if only_val else [])
            raise TDAError("LAVA compares class clouds, so train and validation need the same classes; "
                           + "; ".join(problems))
        ot = _ot()
        tx, vx = self._embed(train, "train"), self._embed(validation, "validation")
        feature_cost = ot.dist(tx, vx)
        scale = float(feature_cost.mean()) or 1.0
        tx, vx, feature_cost = tx / np.sqrt(scale), vx / np.sqrt(scale), feature_cost / scale
        classes = sorted(set(ty.tolist()))
        W = label_distances(tx, ty, vx, vy, classes) if self.lambda_label else np.zeros((len(classes),) * 2)
        index = {c: i for i, c in enumerate(classes)}
        ti, vi = np.vectorize(index.get)(ty), np.vectorize(index.get)(vy)
        cost = torch.from_numpy(feature_cost + self.lambda_label * W[ti][:, vi])
        n, m = cost.shape
        train_share = np.bincount(ti, minlength=len(classes)) / n
        val_mass = torch.from_numpy(train_share[vi] / np.bincount(vi, minlength=len(classes))[vi])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, log = ot.sinkhorn(torch.full((n,), 1 / n, dtype=cost.dtype), val_mass, cost, self.epsilon,
                                 method="sinkhorn_log", numItermax=self.max_iter, stopThr=1e-7, log=True)
        self.converged_ = not any("converge" in str(w.message) for w in caught)
        f = self.epsilon * log["log_u"].numpy()
        calibrated = f - (f.sum() - f) / (n - 1)
        self.calibrated_gradient_ = torch.from_numpy(calibrated)
        self.values_ = -self.calibrated_gradient_
        self.label_distances_ = pd.DataFrame(W, index=[train.class_names[c] for c in classes],
                                             columns=[train.class_names[c] for c in classes])
        self.train_ = train
        return self

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy values: ``train_id, label, value, rank`` with rank 1 the least valuable (inspect first)."""
        if self.train_ is None:
            raise TDAError("LAVA is not fitted: call fit(train, validation) first")
        order = torch.argsort(self.values_)
        return pd.DataFrame({"rank": np.arange(1, len(order) + 1),
                             "train_id": [self.train_.ids[i] for i in order.tolist()],
                             "label": self.train_.labels[order].tolist(),
                             "value": self.values_[order].tolist()})
