"""The task zoo: small tasks that together span the axes along which a user's model varies (data, architecture,
optimizer, weight decay, training length, batch size, label noise, number of classes, training-set size), each with
cached fresh-seed LDS ground truth, so that a method's defaults can be judged across all of them at once
(``benchmarks/bench_zoo.py``).

A task is data (``ZooTask``, one frozen record each, in ``ZOO``); ``build_zoo_task(name)`` generates its data, trains
its model with recorded checkpoints and returns a ``ZooExperiment`` (an ``Experiment``: the ``Scenario`` protocol,
``recipe()``, ``split.flipped``); ``zoo_ground_truth(experiment)`` retrains on 100 random halves of the training set
with fresh seeds (two seeds per subset, averaged) and caches the test losses on disk. Everything is deterministic given
the task's seed: data, noise, training and the subsets.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.atomic import load_tensors, save_tensors
from tda_explorer.compute.engine.losses import cross_entropy
from tda_explorer.compute.models.reference import make_model
from tda_explorer.compute.models.transformer import make_transformer
from tda_explorer.compute.training.train import TrainConfig, train_ensemble, train_model, unstack
from tda_explorer.data.dataset import AttributionDataset, DataSplit
from tda_explorer.data.noise import confuse_pairs, flip_labels
from tda_explorer.data.renderers import ImageRenderer
from tda_explorer.experiments.digits import Experiment
from tda_explorer.retraining.ground_truth import SubsetGroundTruth, _test_losses, default_cache_dir, random_subsets

DATA = ("digits", "wine", "synth20", "synth200", "shapes16", "shapes32", "reviews")
ARCHITECTURES = ("logreg", "mlp-relu", "mlp-gelu", "mlp-tanh", "mlp-dropout", "cnn-bn", "cnn-wide", "transformer")
OPTIMIZERS = ("sgd", "sgdm", "adam", "adamw")
NOISE = ("none", "uniform10", "pairs")
REGIMES = ("under-trained", "fitted")
#: classes of each data kind (synthetic data: chosen by the task through ``classes``)
_CLASSES = {"digits": 10, "wine": 3, "shapes16": 6, "shapes32": 6, "reviews": 2}
SHAPES = ("disk", "square", "ring", "cross", "triangle", "diamond")


@dataclass(frozen=True)
class ZooTask:
    """One zoo task as data. ``batch_size=0`` is full batch; ``regime`` says whether training stops early
    ("under-trained") or runs to about 100% training accuracy ("fitted"); ``noise``: "none", "uniform10" (10% of
    the training labels flipped to a uniformly drawn other class) or "pairs" (class-pair confusions: 20% of each
    class 2k relabelled 2k+1 and 20% of 2k+1 relabelled 2k)."""

    name: str
    data: str
    architecture: str
    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    noise: str
    n_train: int
    n_test: int
    regime: str
    classes: int | None = None  # synthetic data only; the others have their own
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.data, "data", DATA)
        check_choice(self.architecture, "architecture", ARCHITECTURES)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.noise, "noise", NOISE)
        check_choice(self.regime, "regime", REGIMES)

    @property
    def n_classes(self) -> int:
        return self.classes if self.classes is not None else _CLASSES[self.data]

    @property
    def full_batch(self) -> bool:
        return self.batch_size == 0 or self.batch_size >= self.n_train

    @property
    def stochastic(self) -> bool:
        """Whether retraining the same subset can end elsewhere: minibatches, Dropout or a non-convex model. Only
        full-batch logistic regression is not (its ground truth then needs one seed; the zoo still takes two)."""
        return not (self.full_batch and self.architecture == "logreg")

    def config(self) -> TrainConfig:
        sgdm = self.optimizer == "sgdm"
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size or self.n_train, lr=self.lr,
                           weight_decay=self.weight_decay, optimizer="sgd" if sgdm else self.optimizer,
                           momentum=0.9 if sgdm else 0.0, n_checkpoints=5, seed=self.seed)


T = ZooTask
#: The zoo. Names say data, architecture and optimizer.
ZOO: tuple[ZooTask, ...] = (
    T("digits-logreg-sgd", "digits", "logreg", "sgd", 0.5, 1e-2, 100, 0, "uniform10", 1000, 300, "fitted"),
    T("digits-mlp-sgdm", "digits", "mlp-relu", "sgdm", 0.05, 1e-4, 30, 32, "none", 1200, 300, "fitted"),
    T("digits-mlp-gelu-adamw", "digits", "mlp-gelu", "adamw", 3e-3, 1e-2, 20, 64, "pairs", 1000, 300, "fitted"),
    T("digits-mlp-dropout-sgd", "digits", "mlp-dropout", "sgd", 0.1, 1e-4, 15, 16, "uniform10", 600, 300, "fitted"),
    T("wine-mlp-adam", "wine", "mlp-relu", "adam", 1e-2, 0.0, 40, 16, "none", 130, 48, "fitted"),
    T("wine-logreg-sgdm", "wine", "logreg", "sgdm", 0.05, 1e-2, 60, 0, "uniform10", 130, 48, "fitted"),
    T("synth20-mlp-tanh-sgd", "synth20", "mlp-tanh", "sgd", 0.05, 0.0, 3, 32, "none", 800, 300, "under-trained",
      classes=2),
    T("synth20-logreg-adam", "synth20", "logreg", "adam", 5e-2, 1e-4, 50, 0, "pairs", 600, 300, "fitted",
      classes=2),
    T("synth200-mlp-adamw", "synth200", "mlp-relu", "adamw", 1e-3, 1e-4, 15, 128, "uniform10", 2000, 300, "fitted",
      classes=4),
    T("shapes16-cnn-bn-sgdm", "shapes16", "cnn-bn", "sgdm", 0.01, 1e-2, 8, 32, "none", 300, 300, "fitted"),
    T("shapes32-cnn-sgd", "shapes32", "cnn-wide", "sgd", 0.05, 1e-2, 4, 64, "none", 500, 200, "under-trained"),
    T("shapes16-mlp-adam", "shapes16", "mlp-relu", "adam", 3e-3, 1e-2, 15, 32, "pairs", 800, 300, "fitted"),
    T("reviews-transformer-adam", "reviews", "transformer", "adam", 3e-3, 1e-3, 8, 32, "uniform10", 400, 150,
      "fitted"),
)
del T


def zoo_tasks() -> tuple[ZooTask, ...]:
    """Every zoo task's spec (data: nothing is built)."""
    return ZOO


def zoo_task(name: str) -> ZooTask:
    by_name = {t.name: t for t in ZOO}
    check_choice(name, "task", tuple(by_name))
    return by_name[name]


# ----------------------------------------------------------------------------------------------------- data


def _standardise(x: torch.Tensor, n_train: int) -> torch.Tensor:
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
    return (x - mean) / std


def _shapes(n: int, side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated ``side``×``side`` images of six shapes (random centre, size and brightness, pixel noise)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(SHAPES), (n,), generator=gen)
    r = 0.35 + 0.3 * torch.rand(n, 1, 1, generator=gen)
    cx, cy = [(torch.rand(n, 1, 1, generator=gen) - 0.5) * 0.6 for _ in range(2)]
    grid = torch.linspace(-1, 1, side)
    dy, dx = grid.view(1, side, 1) - cy, grid.view(1, 1, side) - cx
    radius = (dx**2 + dy**2).sqrt()
    masks = torch.stack([
        radius < r,
        torch.maximum(dx.abs(), dy.abs()) < r,
        (radius - r).abs() < 0.25 * r,
        ((dx.abs() < 0.3 * r) & (dy.abs() < r)) | ((dy.abs() < 0.3 * r) & (dx.abs() < r)),
        (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),
        dx.abs() + dy.abs() < r,
    ], 1)  # [n, 6, side, side]
    shape = masks[torch.arange(n), y].float()
    brightness = 0.6 + 0.4 * torch.rand(n, 1, 1, generator=gen)
    x = (shape * brightness + 0.15 * torch.randn(n, side, side, generator=gen)).clamp(0, 1)
    return x.flatten(1), y


def _tensor_split(spec: ZooTask, x: torch.Tensor, y: torch.Tensor, renderer=None) -> DataSplit:
    n, names = spec.n_train, [str(c) for c in range(spec.n_classes)]
    if spec.data.startswith("shapes"):
        names = list(SHAPES)
    train = AttributionDataset(x[:n], y[:n], list(range(n)), names, renderer, f"{spec.name}-train")
    test = AttributionDataset(x[n : n + spec.n_test], y[n : n + spec.n_test], list(range(spec.n_test)), names,
                              renderer, f"{spec.name}-test")
    return DataSplit(train, test, torch.zeros(n, dtype=torch.bool), y[:n].clone())


def zoo_data(spec: ZooTask) -> DataSplit:
    """The task's split, with its label noise applied to the training labels (``flipped`` marks the changed ones)."""
    total, seed = spec.n_train + spec.n_test, spec.seed
    if spec.data == "reviews":
        from tda_explorer.data.text import load_reviews_split

        split = load_reviews_split(spec.n_train, spec.n_test, noise=0.0, seed=seed)
    elif spec.data == "digits":
        from tda_explorer.data.digits import load_digits_split

        split = load_digits_split(spec.n_train, spec.n_test, noise=0.0, seed=seed)
    elif spec.data == "wine":
        from sklearn.datasets import load_wine

        wine = load_wine()
        if total > len(wine.target):
            raise TDAError(f"{spec.name}: wine has {len(wine.target)} examples, asked for {total}")
        order = torch.randperm(len(wine.target), generator=torch.Generator().manual_seed(seed))[:total]
        x = torch.tensor(wine.data, dtype=torch.float32)[order]
        split = _tensor_split(spec, _standardise(x, spec.n_train), torch.tensor(wine.target)[order].long())
    elif spec.data.startswith("synth"):
        from sklearn.datasets import make_classification

        width = int(spec.data[len("synth"):])
        x, y = make_classification(n_samples=total, n_features=width, n_informative=min(width, 10),
                                   n_redundant=min(width - min(width, 10), 10), n_classes=spec.n_classes,
                                   n_clusters_per_class=2, class_sep=1.0, flip_y=0.0, random_state=seed)
        x = torch.tensor(x, dtype=torch.float32)
        split = _tensor_split(spec, _standardise(x, spec.n_train), torch.tensor(y).long())
    else:
        side = int(spec.data[len("shapes"):])
        x, y = _shapes(total, side, seed)
        split = _tensor_split(spec, x, y, ImageRenderer((side, side)))
    clean = split.train.labels.clone()
    if spec.noise == "uniform10":
        noisy, flipped = flip_labels(clean, 0.1, spec.n_classes, seed=seed + 1)
    elif spec.noise == "pairs":
        noisy, flipped = confuse_pairs(clean, 0.2, spec.n_classes, seed=seed + 1)
    else:
        return split
    return replace(split, train=split.train.with_labels(noisy), flipped=flipped, clean_train_labels=clean)


# --------------------------------------------------------------------------------------------------- models


class BatchNorm2d(nn.Module):
    """BatchNorm over channels whose running statistics are *exact* ("precise BN"): training normalises by the
    batch's statistics and leaves the buffers alone (so many models train stacked under ``torch.func.vmap``);
    ``calibrate_batchnorm`` then sets the buffers to the statistics of the whole training set, which evaluation
    uses. The buffers are not in ``state_dict`` (checkpoints are parameters); the zoo's factory restores them."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels), persistent=False)
        self.register_buffer("running_var", torch.ones(channels), persistent=False)
        self.eps, self.collect = eps, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            if self.collect:
                self.running_mean.copy_(mean.detach())
                self.running_var.copy_(var.detach())
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight / (var + self.eps).sqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


def calibrate_batchnorm(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Set every zoo ``BatchNorm2d``'s statistics to those of ``inputs`` (one pass, in place); returns ``model`` in
    evaluation mode."""
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    for m in norms:
        m.collect = True
    model.train()
    with torch.no_grad():
        model(inputs)
    for m in norms:
        m.collect = False
    return model.eval()


def _norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers() if name.endswith(("running_mean",
                                                                                             "running_var"))}


def make_zoo_model(architecture: str, n_features: int, n_classes: int, seed: int = 0, vocab_size: int | None = None,
                   max_len: int | None = None, hidden: int = 64) -> nn.Module:
    """A freshly initialised zoo model (seeded)."""
    check_choice(architecture, "architecture", ARCHITECTURES)
    if architecture == "transformer":
        return make_transformer("classifier", vocab_size, n_classes, seed=seed, max_len=max_len)
    kinds = {"logreg": "lr", "mlp-relu": "mlp", "mlp-gelu": "mlp-gelu", "mlp-dropout": "mlp-dropout"}
    if architecture in kinds:
        return make_model(kinds[architecture], n_features, n_classes, hidden=hidden, seed=seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if architecture == "mlp-tanh":
            return nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
        side = int(round(math.sqrt(n_features)))
        if architecture == "cnn-bn":  # 16 px: two conv-BN-ReLU-pool blocks, then a linear layer
            return nn.Sequential(
                nn.Unflatten(1, (1, side, side)),
                nn.Conv2d(1, 8, 3, padding=1), BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(16 * (side // 4) ** 2, n_classes))
        # cnn-wide, 32 px: one pooling only, so the first fully-connected layer reads 16 × 16 × 16 = 4,096 inputs
        return nn.Sequential(
            nn.Unflatten(1, (1, side, side)),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * (side // 2) ** 2, n_classes))
    finally:
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------------------------ experiment


@dataclass
class ZooExperiment(Experiment):
    """A built zoo task: an ``Experiment`` whose model comes from its spec (``ZooTask``)."""

    spec: ZooTask | None = None
    norm_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def factory(self, seed: int) -> nn.Module:
        s, x = self.spec, self.split.train.inputs
        tokenizer = getattr(self.split, "tokenizer", None)
        model = make_zoo_model(s.architecture, x.shape[1], s.n_classes, seed=seed,
                               vocab_size=tokenizer.vocab_size if tokenizer is not None else None, max_len=x.shape[1])
        if self.norm_state:  # the trained model's exact BatchNorm statistics (training ignores them)
            for name, buffer in model.named_buffers():
                if name in self.norm_state:
                    buffer.copy_(self.norm_state[name])
        return model

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(json.dumps(asdict(self.spec), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def train_accuracy(self) -> float:
        with torch.no_grad():
            pred = self.record.model(self.split.train.inputs).argmax(1)
        return float((pred == self.split.train.labels).float().mean())


def build_zoo_task(name: str | ZooTask, device: str = "cpu", epochs: int | None = None) -> ZooExperiment:
    """Generate the task's data and train its model with recorded checkpoints (deterministic given the spec's
    seed). ``epochs`` overrides the spec's (a quick check; the ground truth is keyed by the recipe)."""
    spec = name if isinstance(name, ZooTask) else zoo_task(name)
    split = zoo_data(spec)
    config = spec.config() if epochs is None else replace(spec.config(), epochs=epochs)
    model_kind = "lr" if spec.architecture == "logreg" else spec.architecture  # "lr": the retrainer's convex flag
    exp = ZooExperiment(split, model_kind, config, record=None, spec=spec)  # type: ignore[arg-type]
    exp.record = train_model(exp.factory, split.train.inputs, split.train.labels, config, device=device)
    if spec.architecture == "cnn-bn":
        calibrate_batchnorm(exp.record.model, split.train.inputs.to(device))
        exp.norm_state = _norm_state(exp.record.model)
    return exp


# ---------------------------------------------------------------------------------------------- ground truth


def zoo_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where zoo ground truth is kept: ``<cache>/zoo`` under the retraining cache (``default_cache_dir()``)."""
    return Path(cache_dir or default_cache_dir()) / "zoo"


def _stacked_test_losses(exp: ZooExperiment, params: dict[str, torch.Tensor], subsets: torch.Tensor,
                         seeds: list[int], device: str) -> torch.Tensor:
    if exp.spec.architecture != "cnn-bn":
        return _test_losses(exp, params, device)
    # BatchNorm: each model's statistics are those of its own training subset
    train, test = exp.split.train, exp.split.test
    out = []
    for m, seed in enumerate(seeds):
        model = exp.factory(seed).to(device)
        model.load_state_dict(unstack(params, m))
        calibrate_batchnorm(model, train.inputs[subsets[m]].to(device))
        with torch.no_grad():
            out.append(cross_entropy(model(test.inputs.to(device)), test.labels.to(device)).cpu())
    return torch.stack(out)


def zoo_ground_truth(exp: ZooExperiment, n_subsets: int = 100, fraction: float = 0.5, n_seeds: int = 2,
                     cache_dir: str | Path | None = None, device: str = "cpu", chunk: int = 50,
                     progress: bool = False) -> SubsetGroundTruth:
    """Fresh-seed LDS ground truth: ``n_subsets`` random ``fraction``-subsets of the training set, each retrained
    with ``n_seeds`` fresh initialisation/batch-order seeds; measurements are the test losses averaged over the
    seeds. Cached in ``zoo_cache_dir(cache_dir)/<task>-<key>.pt`` (key: the experiment's fingerprint and these
    settings); the per-seed losses are kept beside the average (``zoo_seed_ceiling``)."""
    key = hashlib.sha256(f"{exp.fingerprint()}|{n_subsets}|{fraction}|{n_seeds}".encode()).hexdigest()[:16]
    path = zoo_cache_dir(cache_dir) / f"{exp.spec.name}-{key}.pt"
    data = load_tensors(path)
    if data is not None:
        return SubsetGroundTruth(data["masks"], data["measurements"])
    train = exp.split.train
    subsets, masks = random_subsets(len(train), n_subsets, fraction, exp.spec.seed)
    per_seed = []
    for s in range(n_seeds):
        losses = []
        for start in range(0, n_subsets, chunk):
            rows = subsets[start : start + chunk]
            seeds = [(s + 1) * 100_003 + start + i for i in range(len(rows))]
            params = train_ensemble(exp.factory, train.inputs, train.labels, rows, exp.config, seeds=seeds,
                                    device=device)
            losses.append(_stacked_test_losses(exp, params, rows, seeds, device))
            if progress:
                print(f"  {exp.spec.name}: seed {s + 1}/{n_seeds}, {start + len(rows)}/{n_subsets} models", flush=True)
        per_seed.append(torch.cat(losses))
    per_seed_t = torch.stack(per_seed)
    truth = SubsetGroundTruth(masks, per_seed_t.mean(0))
    save_tensors({"masks": masks, "measurements": truth.measurements, "per_seed": per_seed_t}, path,
                 {"experiment": exp.fingerprint(), "task": exp.spec.name, "n_subsets": n_subsets,
                  "fraction": fraction, "n_seeds": n_seeds})
    return truth


def zoo_markdown_table() -> str:
    """The README's table of zoo tasks (one row per task), generated from the specs."""
    head = ["| task | data | architecture | optimizer | lr | wd | epochs | batch | noise | classes | n_train / n_test "
            "| training |", "|" + " --- |" * 12]
    rows = [f"| `{t.name}` | {t.data} | {t.architecture} | {t.optimizer} | {t.lr:g} | {t.weight_decay:g} | {t.epochs} "
            f"| {'full' if t.full_batch else t.batch_size} | {t.noise} | {t.n_classes} | {t.n_train} / {t.n_test} "
            f"| {t.regime} |" for t in ZOO]
    return "\n".join(head + rows)


def zoo_seed_agreement(exp: ZooExperiment, cache_dir: str | Path | None = None, **settings) -> float | None:
    """Mean over test points of the Spearman correlation between the first two seeds' retrained test losses of the
    same subsets (from the cached ground truth; None when absent or one seed): how much of the truth is the subsets
    rather than seed noise, a bound on the LDS any method reaches against one seed's truth."""
    import numpy as np
    from scipy.stats import spearmanr

    n_subsets, fraction, n_seeds = settings.get("n_subsets", 100), settings.get("fraction", 0.5), settings.get(
        "n_seeds", 2)
    key = hashlib.sha256(f"{exp.fingerprint()}|{n_subsets}|{fraction}|{n_seeds}".encode()).hexdigest()[:16]
    data = load_tensors(zoo_cache_dir(cache_dir) / f"{exp.spec.name}-{key}.pt")
    if data is None or data["per_seed"].shape[0] < 2:
        return None
    a, b = data["per_seed"][0].numpy(), data["per_seed"][1].numpy()
    values = [spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]
    return float(np.nanmean(values))
