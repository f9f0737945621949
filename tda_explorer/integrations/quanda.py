"""Any tda_explorer method as a quanda ``Explainer``, so quanda users can evaluate our methods in their own harness.

    from tda_explorer.integrations.quanda import quanda_explainer
    explainer_cls = quanda_explainer("if-ekfac", damping=1e-3)   # a subclass of quanda.explainers.Explainer
    metric = ModelRandomizationMetric(model, train_dataset, explainer_cls=explainer_cls, expl_kwargs={})

Needs quanda installed (it is not a dependency of this package). The train dataset may be any map-style dataset of
``(input, label)`` pairs; checkpoints given to quanda are loaded with its own loader and become TracIn's
checkpoints (learning rate 1 each, as quanda's TracIn wrappers assume).
"""

from __future__ import annotations

from typing import Any

import torch

from tda_explorer._validation import TDAError
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods import get_method
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.data.dataset import AttributionDataset


def _as_dataset(dataset: Any) -> AttributionDataset:
    items = [dataset[i] for i in range(len(dataset))]
    inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items])
    return AttributionDataset(inputs, labels, name="quanda-train")


def quanda_explainer(method: str, **options: Any) -> type:
    """A ``quanda.explainers.Explainer`` subclass running ``get_method(method, task, **options)``."""
    try:
        from quanda.explainers import Explainer
    except ImportError as err:
        raise TDAError("quanda_explainer needs quanda: pip install quanda (in an environment of its own if its "
                       "pins clash with yours)") from err

    class TDAExplorerExplainer(Explainer):
        accepted_tasks = ["image_classification", "text_classification"]

        def __init__(self, model, train_dataset, task: str = "image_classification", checkpoints=None,
                     checkpoints_load_func=None, **kwargs):
            super().__init__(model=model, train_dataset=train_dataset, task=task, checkpoints=checkpoints,
                             checkpoints_load_func=checkpoints_load_func)
            states = []
            for path in self.checkpoints:
                self.checkpoints_load_func(model, path)
                states.append(Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, 1.0, 1))
            self.train_ = _as_dataset(train_dataset)
            task_ = AttributionTask(model, checkpoints=states)
            self.attributor = get_method(method, task_, device=self.device, **{**options, **kwargs}).fit(self.train_)

        def explain(self, test_data: torch.Tensor, targets) -> torch.Tensor:
            test = AttributionDataset(torch.as_tensor(test_data).cpu(), torch.as_tensor(targets).cpu(),
                                      name="quanda-test")
            return self.attributor.attribute(test).scores

        def self_influence(self, batch_size: int = 32) -> torch.Tensor:
            return self.attributor.self_influence()

    TDAExplorerExplainer.__name__ = f"TDAExplorer_{method.replace('-', '_')}"
    return TDAExplorerExplainer
