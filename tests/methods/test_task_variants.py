"""Methods that rebuild the task around another model (model randomization, score stability, the LoRA ensemble,
DDA) keep the user's output selection and losses: a model returning ``{"scores": ...}`` goes through them as is."""

import torch
from torch import nn

from tda_explorer import AttributionDataset, AttributionTask, get_method
from tda_explorer.evaluate.stability import score_stability
from tda_explorer.evaluate.trust import model_randomization, randomized_task


class DictModel(nn.Module):
    """A model returning a dict: its logits under a key of its own (no "logits" to find by default)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return {"scores": self.body(x), "hidden": x}


def _data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return AttributionDataset(x[:30], y[:30]), AttributionDataset(x[30:], y[30:])


def _task():
    torch.manual_seed(0)
    return AttributionTask(DictModel(), output="scores", batch_loss_fn=lambda logits, batch: nn.functional
                           .cross_entropy(logits, batch.labels, reduction="none"))


def test_rebuilt_tasks_keep_the_output_and_the_loss():
    task = _task()
    randomized = randomized_task(task)
    assert randomized.output == "scores" and randomized.batch_loss_fn is task.batch_loss_fn
    assert randomized.model is not task.model


def test_randomization_stability_and_lora_ensemble_run_on_dict_outputs():
    train, test = _data()
    task = _task()
    scores = get_method("grad-dot", task).fit(train).attribute(test).scores
    correlation = model_randomization(scores, "grad-dot", task, train, test)
    assert -1.0 <= correlation <= 1.0
    variants = [{k: v + 0.01 * i for k, v in task.model.state_dict().items()} for i in range(2)]
    stability = score_stability("grad-dot", task, variants, train, test)
    assert torch.isfinite(stability.mean).all() and stability.mean.shape == (10, 30)
    ensemble = get_method("lora-ensemble", task, members=1, epochs=1, rank=2, inner="grad-dot").fit(train)
    assert torch.isfinite(ensemble.attribute(test).scores).all()
