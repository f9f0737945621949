"""LoRA ensemble (Deng, Li, Zhang, Ma, 2024): M low-rank adapters on the frozen trained model, each fine-tuned
briefly with its own seed; an inner method (TRAK by default) attributes each adapted model through its adapter
parameters only, and the scores are averaged — ensemble members for the price of a few adapter epochs instead of M
trainings from scratch. ``training_seconds_`` and ``stored_bytes_`` say what it cost.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

# the method catalogue: this method registers itself, and builds its inner method from it
from tda_explorer.compute.catalogue import POSITIVE, POSITIVE_INT, Family, create, option, register
from tda_explorer.compute.methods.base import Attributor, AttributorArguments, attributor_spec, shared_options
from tda_explorer.compute.methods.plan import fitted_bytes
from tda_explorer.compute.training.lora import adapter_names, add_lora, train_adapters
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.torch_dataset import in_memory


@dataclass
class LoRAEnsembleArguments(AttributorArguments):
    members: int = option(5, "M, the number of adapters (seeds 0 … M−1), each an ensemble member", POSITIVE_INT)
    rank: int | None = option(None, "the adapters' rank (1 … the narrower side of each Linear layer); None: 4, or a "
                                    "layer's narrower side where that is smaller", POSITIVE_INT)
    epochs: int = option(3, "epochs of each adapter's fine-tuning (Adam on the mean training loss)", POSITIVE_INT)
    lr: float = option(1e-2, "Adam's learning rate for the adapters", POSITIVE)
    batch_size: int = option(64, "mini-batch size of the adapters' fine-tuning (at most the training set)",
                             POSITIVE_INT)
    inner: str = option("trak", "the method run on each adapted model, over its adapter parameters: any "
                                "attributor's catalogue name but lora-ensemble")
    inner_options: dict = option(help="the inner method's options; the options every attributor takes (device, "
                                      "max_memory, projection_*, store) given to lora-ensemble are passed on unless "
                                      "set here", factory=dict, cli=False)


@register("lora-ensemble", Family.PAIRWISE, LoRAEnsembleArguments)
class LoRAEnsemble(Attributor):
    """Average of ``inner`` over ``members`` LoRA-adapted copies of the task's model."""

    tensor_inputs = True  # dict inputs (a tokenizer's) are refused

    def _setup(self) -> None:
        a = self.args
        attributor_spec(a.inner, "inner", self.name, a.inner_options)
        self.members, self.rank, self.epochs, self.lr, self.batch_size = a.members, a.rank, a.epochs, a.lr, a.batch_size
        add_lora(self.task.model, self.rank)  # validates the rank against every layer now, not after training
        self.inner, self.inner_options = a.inner, dict(a.inner_options)

    def _fit(self, train: AttributionDataset) -> None:
        self.attributors_, self.training_seconds_ = [], 0.0
        for seed in range(self.members):
            started = time.perf_counter()
            model = add_lora(self.task.model, self.rank, seed=seed).to(self.device)
            train_adapters(model, in_memory(train, self.name).inputs.to(self.device), train.labels.to(self.device),
                           self.epochs, self.lr,
                           min(self.batch_size, len(train)), seed, self.task.train_loss)
            self.training_seconds_ += time.perf_counter() - started
            task = dataclasses.replace(self.task, model=model, parameters=adapter_names(model), checkpoints=[],
                                       weight_decay=0.0)  # the adapters' own run; the user's output and losses
            inner = create(self.inner, task, **{**shared_options(self.args), **self.inner_options})
            self.attributors_.append(inner.fit(train))
        self.stored_bytes_ = sum(fitted_bytes(a) for a in self.attributors_)

    def _attribute(self, test: AttributionDataset) -> torch.Tensor:
        return torch.stack([a.attribute(test).scores for a in self.attributors_]).mean(0)

    def _self_influence(self) -> torch.Tensor:
        return torch.stack([a.self_influence() for a in self.attributors_]).mean(0)
