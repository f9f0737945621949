"""``AttributionTask``: *what* is attributed — kept apart from *how* (the attributors).

The model is taken as it is: every forward in the engine goes through ``call_model`` (``model(**inputs)`` for dict
inputs, ``model(inputs)`` otherwise), and the logits are picked from whatever it returns (a tensor, a dict, a
``transformers`` ``ModelOutput`` or a tuple) by ``pick_output`` with the task's ``output``.
"""

from __future__ import annotations

import hashlib
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from tda_explorer._validation import TDAError, check_choice
from tda_explorer.compute.engine.losses import Batch, cross_entropy, neg_margin, takes_batch
from tda_explorer.compute.training.train import Checkpoint
from tda_explorer.data.batching import describe, n_rows

MEASUREMENTS = ("loss", "margin")
ACCESS_LEVELS = ("full", "architecture", "query", "final-model")
Output = None | str | int | Callable[[Any], torch.Tensor]


def call_model(model: nn.Module, inputs: Any, state: Mapping[str, torch.Tensor] | None = None) -> Any:
    """The one forward of the engine: ``model(**inputs)`` for dict inputs, ``model(inputs)`` otherwise; with
    ``state`` (parameters and buffers by name) the model runs on those in place of its own (``functional_call``)."""
    if isinstance(inputs, Mapping):
        if state is None:
            return model(**inputs)
        return functional_call(model, _untied(model, state), (), dict(inputs))
    if state is None:
        return model(inputs)
    return functional_call(model, _untied(model, state), (inputs,))


_ALIASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {second name: first name}, once


def _untied(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second names of tied tensors (a ``state_dict()`` lists a weight shared by two modules
    under both names, which ``functional_call`` refuses: it ties them itself) where their first name is given."""
    aliases = _ALIASES.get(model)
    if aliases is None:
        first = {id(t): n for n, t in model.named_parameters()} | {id(t): n for n, t in model.named_buffers()}
        every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        aliases = _ALIASES[model] = {n: first[id(t)] for n, t in every if first.get(id(t), n) != n}
    drop = [n for n, head in aliases.items() if n in state and head in state]
    return {k: v for k, v in state.items() if k not in drop} if drop else dict(state)


def tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """Modules that own a parameter another module owns too (tied weights), each with the others sharing it: a
    Kronecker factor belongs to one layer's use of its weight, and a tied weight's gradient sums several uses."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # a module registered twice shares it too
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    shared: dict[str, dict[str, None]] = {}  # ordered sets
    for names in owners.values():
        for name in names if len(names) > 1 else ():
            shared.setdefault(name, {}).update(dict.fromkeys(n for n in names if n != name))
    return {name: list(others) for name, others in shared.items()}


def eval_mode(model: nn.Module) -> Callable[[], None]:
    """Put ``model`` in eval mode and return the function that gives every module back its own mode (a wrapper in
    training mode around a model in eval mode stays so)."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()

    def restore() -> None:
        for module, training in saved:
            module.training = training

    return restore


def _keys(outputs: Any) -> str:
    if isinstance(outputs, Mapping):
        return f"keys {list(outputs)}"
    if isinstance(outputs, (tuple, list)):
        return f"a {type(outputs).__name__} of {len(outputs)}"
    return type(outputs).__name__


class OutputChoiceWarning(UserWarning):
    """The logits were taken from a model's outputs by a default that may not be the user's (a tuple's first
    element among several tensors): ``AttributionTask(output=...)`` chooses them and silences it."""


def _warn_if_ambiguous(outputs: tuple | list) -> None:
    tensors = [i for i, t in enumerate(outputs)
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2]
    if len(tensors) > 1:
        shapes = ", ".join(f"[{i}]: {tuple(outputs[i].shape[1:])}" for i in tensors)
        warnings.warn(f"the model returns a tuple of {len(outputs)} whose tensors per example are {shapes}; its first "
                      "element is read as the logits: choose with AttributionTask(output=index) if they are not",
                      OutputChoiceWarning, stacklevel=3)


def pick_output(outputs: Any, output: Output = None) -> torch.Tensor:
    """The logits in a model's ``outputs``.

    ``output=None``: a tensor as it is, else the ``"logits"`` key or attribute, else a tuple's first element;
    a string: that key (or attribute; a tensor is taken as already chosen); an int: that element of a tuple;
    a callable: ``output(outputs)``. Anything else, or a missing key, is a ``TDAError`` naming ``output``.
    """
    if callable(output) and not isinstance(output, (str, int)):
        picked = output(outputs)
    elif isinstance(outputs, torch.Tensor) and not isinstance(output, int):
        return outputs
    elif output is None:
        if isinstance(outputs, Mapping) and "logits" in outputs:
            picked = outputs["logits"]
        elif not isinstance(outputs, Mapping) and hasattr(outputs, "logits"):
            picked = outputs.logits
        elif isinstance(outputs, (tuple, list)) and outputs:
            picked = outputs[0]
            _warn_if_ambiguous(outputs)
        else:
            raise TDAError(f"output: the model returned {_keys(outputs)} and none is the logits; choose them with "
                           "AttributionTask(output='key' or a function of the model's outputs)")
    elif isinstance(output, str):
        if isinstance(outputs, Mapping):
            if output not in outputs:
                raise TDAError(f"output={output!r}: the model's outputs have {_keys(outputs)}, not {output!r}")
            picked = outputs[output]
        elif hasattr(outputs, output):
            picked = getattr(outputs, output)
        else:
            raise TDAError(f"output={output!r}: the model returned {_keys(outputs)}, which has no {output!r}")
    elif isinstance(output, int) and not isinstance(output, bool):
        if not isinstance(outputs, (tuple, list)) or not -len(outputs) <= output < len(outputs):
            raise TDAError(f"output={output}: the model returned {_keys(outputs)}, not a tuple with element {output}")
        picked = outputs[output]
    else:
        raise TDAError(f"output must be None, a key, a tuple index or a function of the model's outputs, got "
                       f"{type(output).__name__}")
    if not isinstance(picked, torch.Tensor):
        raise TDAError(f"output={output!r} chose a {type(picked).__name__} from the model's outputs, not a tensor of "
                       "logits")
    return picked


def apply_loss(loss_fn: Callable[..., torch.Tensor], outputs: Any, batch: Batch, output: Output = None,
               ) -> torch.Tensor:
    """A per-example loss on a batch, whichever its kind: a loss marked ``takes_batch`` (the task's own) gets the
    model's outputs as they are and the ``Batch``; a plain ``(outputs, targets)`` loss gets the logits chosen by
    ``output`` and the labels."""
    if getattr(loss_fn, "takes_batch", False):
        return loss_fn(outputs, batch)
    return loss_fn(pick_output(outputs, output), batch.labels)


@dataclass
class AttributionTask:
    """The model, its training loss, the test measurement and the tracked parameters.

    Sign convention: both the training loss and the measurement are *loss-oriented* (lower is
    better), so a positive score means the training example lowers the test measurement's loss:
    a proponent, whose removal would raise it.

    Parameters
    ----------
    model : nn.Module
        The trained model (final parameters), called as ``model(**inputs)`` for dict inputs and ``model(inputs)``
        otherwise.
    checkpoints : list of Checkpoint
        Parameters saved during training with their learning rates (for TracIn and ensembles).
    measurement : "loss", "margin" or callable (outputs, batch) -> per-example values
        What is attributed on a test example: its training loss, TRAK's (negated) margin, or the user's own
        loss-oriented function of the logits (chosen by ``output``) and the ``Batch`` (``batch.inputs``,
        ``batch.labels``, ``batch["attention_mask"]``).
    parameters : None, "last_layer" or list of str
        Which parameters are tracked: all trainable (None), those of the last module with
        parameters, or those whose name starts with one of the given prefixes.
    loss_fn : callable (logits, targets) -> per-example loss
        Training loss per example (cross-entropy by default). The Gauss-Newton curvature and the Kronecker methods'
        expected Fisher take its own curvature in the outputs (``losses.loss_curvature``); their ``fisher="true"``
        (labels drawn from the softmax) is the cross-entropy's, and the expected Fisher under another loss.
    weight_decay : float
        L2 coefficient of the training objective (enters curvature-based methods).
    access : {"full", "architecture", "query", "final-model"}
        What was available of the model attributed: everything, its architecture only (a proxy retrained with
        guessed hyperparameters), query access only (a distilled proxy), or the final model only. Recorded with
        every result so a reader knows how far to trust it.
    output : None, str, int or callable
        Where the logits are in the model's outputs (``pick_output``): None for a tensor, a ``"logits"`` key or
        attribute (every Hugging Face model) or a tuple's first element; a key such as ``"logits"``; a tuple index;
        or a function of the outputs.
    batch_loss_fn : callable (logits, batch) -> per-example loss, optional
        The training loss as a function of the logits and the whole ``Batch`` (e.g. to use an attention mask),
        in place of ``loss_fn``; give one or the other.
    """

    model: nn.Module
    checkpoints: Sequence[Checkpoint] = field(default_factory=list)
    measurement: str | Callable[[torch.Tensor, Batch], torch.Tensor] = "loss"
    parameters: None | str | Sequence[str] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    weight_decay: float = 0.0
    access: str = "full"
    output: Output = None
    batch_loss_fn: Callable[[torch.Tensor, Batch], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TDAError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not callable(self.measurement):
            check_choice(self.measurement, "measurement", MEASUREMENTS)
        check_choice(self.access, "access", ACCESS_LEVELS)
        if not callable(self.loss_fn):
            raise TDAError(f"loss_fn must be a function (logits, targets) -> per-example loss, got "
                           f"{type(self.loss_fn).__name__}")
        if self.batch_loss_fn is not None:
            if not callable(self.batch_loss_fn):
                raise TDAError(f"batch_loss_fn must be a function (logits, batch) -> per-example loss, got "
                               f"{type(self.batch_loss_fn).__name__}")
            if self.loss_fn is not cross_entropy:
                raise TDAError("give either loss_fn (logits, targets) or batch_loss_fn (logits, batch), not both")
        if not (self.output is None or callable(self.output) or isinstance(self.output, str)
                or (isinstance(self.output, int) and not isinstance(self.output, bool))):
            raise TDAError(f"output must be None, a key such as 'logits', a tuple index or a function of the model's "
                           f"outputs, got {self.output!r}")
        if isinstance(self.checkpoints, (str, bytes, Mapping)) or not isinstance(self.checkpoints, Sequence):
            raise TDAError(f"checkpoints must be a list of Checkpoint, got {type(self.checkpoints).__name__}")
        for i, c in enumerate(self.checkpoints):
            if not isinstance(c, Checkpoint):
                raise TDAError(f"checkpoints[{i}] must be a Checkpoint(state_dict, learning_rate, step), got "
                               f"{type(c).__name__} (from tda_explorer.compute.training.train import Checkpoint)")
        self.tracked_names()  # validates ``parameters``

    def tracked_names(self) -> list[str]:
        """Names of the tracked parameters, in the model's order."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.parameters is None:
            names = [n for n, _ in named]
        elif self.parameters == "last_layer":
            last = [m for m in self.model.modules() if any(True for _ in m.parameters(recurse=False))][-1]
            ids = {id(p) for p in last.parameters(recurse=False)}
            names = [n for n, p in named if id(p) in ids]
        elif isinstance(self.parameters, str):
            raise TDAError(
                f"parameters must be None, 'last_layer' or a list of name prefixes, got {self.parameters!r}"
            )
        else:
            prefixes = list(self.parameters)
            names = [n for n, _ in named if any(n == q or n.startswith(q + ".") for q in prefixes)]
        if not names:
            available = sorted({n.rsplit(".", 1)[0] for n, _ in named})
            raise TDAError(
                f"parameters={self.parameters!r} selects no trainable parameter; modules with parameters: "
                f"{available}"
            )
        return names

    @property
    def cross_entropy_loss(self) -> bool:
        """Whether the training loss is the default cross-entropy (whose curvature in the logits is known in closed
        form: ``losses.loss_curvature``)."""
        return self.batch_loss_fn is None and self.loss_fn is cross_entropy

    # -- the model as it is ------------------------------------------------------------------
    def logits(self, outputs: Any) -> torch.Tensor:
        """The logits in the model's ``outputs`` (``pick_output`` with the task's ``output``)."""
        return pick_output(outputs, self.output)

    def forward(self, inputs: Any, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The logits of the model on batched ``inputs`` (a tensor or a dict of tensors), at ``state`` if given."""
        return self.logits(call_model(self.model, inputs, state))

    @takes_batch
    def train_loss(self, outputs: Any, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Per-example training loss of the model's ``outputs`` (as returned, or the logits) on ``batch`` (a
        ``Batch``, or just the targets)."""
        batch = batch if isinstance(batch, Batch) else Batch(None, batch)
        logits = self.logits(outputs)
        if self.batch_loss_fn is not None:
            return self.batch_loss_fn(logits, batch)
        return self.loss_fn(logits, batch.labels)

    @takes_batch
    def test_measurement(self, outputs: Any, batch: Batch | torch.Tensor) -> torch.Tensor:
        """Per-example loss-oriented measurement on test examples (``outputs`` and ``batch`` as ``train_loss``)."""
        batch = batch if isinstance(batch, Batch) else Batch(None, batch)
        if callable(self.measurement):
            return self.measurement(self.logits(outputs), batch)
        if self.measurement == "loss":
            return self.train_loss(outputs, batch)
        return neg_margin(self.logits(outputs), batch.labels)

    def config(self) -> dict:
        """A JSON-able description used in fingerprints."""
        out = {
            "measurement": self.measurement if isinstance(self.measurement, str) else _function_id(self.measurement),
            "parameters": self.parameters if self.parameters is None or isinstance(self.parameters, str)
            else list(self.parameters),
            "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
            "weight_decay": self.weight_decay,
            "n_checkpoints": len(self.checkpoints),
            "access": self.access,
        }
        if self.output is not None:
            out["output"] = self.output if isinstance(self.output, (str, int)) else _function_id(self.output)
        if self.batch_loss_fn is not None:
            out["batch_loss_fn"] = _function_id(self.batch_loss_fn)
        return out


def _function_id(fn: Callable) -> str:
    """A user function's name with a hash of its code, so that two lambdas do not share cache keys."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    return f"{name}#{hashlib.sha256(_code_bytes(code)).hexdigest()[:8]}"


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's bytecode and constants, nested code included (never a memory address)."""
    parts = [code.co_code]
    for const in code.co_consts:
        parts.append(_code_bytes(const) if isinstance(const, types.CodeType) else repr(const).encode())
    return b"|".join(parts)


def predict(task: AttributionTask, data: Any, device: str | torch.device = "cpu", batch_size: int | None = None,
            argument: str = "data") -> torch.Tensor:
    """The model's logits on every example of ``data`` (an ``AttributionDataset``), batch by batch on ``device``,
    without gradients, gathered on the CPU; the model is not moved (it runs on a copy of its state on ``device``).
    A model failure is a ``TDAError`` naming ``argument``."""
    model, device = task.model, torch.device(device)
    state = None
    if any(p.device.type != device.type or (device.index is not None and p.device.index != device.index)
           for p in model.parameters()):
        state = {**{k: v.to(device) for k, v in model.named_buffers()},
                 **{k: v.detach().to(device) for k, v in model.named_parameters()}}
    restore = eval_mode(model)
    parts = []
    try:
        with torch.no_grad():
            for rows, inputs, _ in data.batches(batch_size, device=device):
                try:
                    logits = task.forward(inputs, state)
                except TDAError:
                    raise
                except (RuntimeError, IndexError, TypeError, ValueError) as err:  # shape / dtype / device mismatches
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    where = f"{rows.start}..{rows.stop - 1}" if isinstance(rows, slice) else f"at rows {rows[:5]}"
                    raise TDAError(f"{argument}: the model failed on examples {where} (inputs {describe(inputs)}): "
                                   f"{first}") from err
                if len(logits) != n_rows(inputs):
                    raise TDAError(f"output: the model returned {len(logits)} rows of logits for a batch of "
                                   f"{n_rows(inputs)} examples of {argument}")
                parts.append(logits.float().cpu())
    finally:
        restore()
    return torch.cat(parts)
