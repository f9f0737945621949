"""``--entry package.module:function``: the command line on your own model and data.

The function takes no arguments and returns what the commands attribute:

- ``(model, train, test)`` or ``(model, train, test, retrain)``, or
- a dict with the keys ``model``, ``train``, ``test`` and optionally ``retrain``, ``task`` (keyword options of
  ``AttributionTask``, e.g. ``output=``, ``loss_fn=``, ``parameters=``, ``checkpoints=``; or an ``AttributionTask``),
  ``resources`` (what the catalogue's needs ask for: ``{"base_model": {"base_model": model}}``) and ``class_names``.

``train`` and ``test`` are ``AttributionDataset``s, map-style ``torch.utils.data.Dataset``s (read lazily through
``AttributionDataset.from_torch``) or ``(inputs, labels)`` tensor pairs; ``retrain(train_ids, seed) -> nn.Module``
trains a fresh model on those training ids (``retraining.own``). The function is imported from ``sys.path`` and the
current directory, or from a file (``path/to/file.py:function``). Whatever goes wrong is a ``TDAError`` naming
``--entry`` and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# the catalogue's needs: what an entry's resources supply
from tda_explorer.compute.catalogue import NEEDS, Resources
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.errors import TDAError

#: What an entry function may return, for messages.
RETURNS = ("(model, train, test), (model, train, test, retrain) or a dict with keys model, train, test and optionally "
           "retrain, task, resources, class_names")
#: The keys a returned dict may have.
KEYS = ("model", "train", "test", "retrain", "task", "resources", "class_names")
#: What ``train`` / ``test`` may be, for messages.
DATA_FORMS = ("an AttributionDataset, a map-style torch.utils.data.Dataset (items (x, y) or dicts with 'labels') or "
              "an (inputs, labels) pair of tensors")


@dataclass
class Entry:
    """What an entry function returned, normalised: the model, the two splits as ``AttributionDataset``s, the
    optional retrain function, the ``AttributionTask`` options and the resources for methods' needs."""

    spec: str
    model: nn.Module
    train: AttributionDataset
    test: AttributionDataset
    retrain: Callable[[list, int], nn.Module] | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=dict)

    def task(self, parameters: Any = None) -> AttributionTask:
        """The ``AttributionTask`` of the entry's model with its options; ``parameters`` applies when the entry chose
        none (e.g. the Linear layers LoGra projects)."""
        options = dict(self.task_options)
        if parameters is not None and options.get("parameters") is None:
            options["parameters"] = parameters
        try:
            return AttributionTask(self.model, **options)
        except TypeError as err:  # an unknown keyword
            known = [f.name for f in dataclasses.fields(AttributionTask) if f.name != "model"]
            raise TDAError(f"--entry {self.spec}: task: {err}; AttributionTask takes {', '.join(known)}") from None
        except TDAError as err:
            raise TDAError(f"--entry {self.spec}: task: {err}") from None

    def provided(self, task: AttributionTask) -> set[str]:
        """The needs (``compute.catalogue.NEEDS``) this entry supplies: its resources, and checkpoints when the task
        has some."""
        return set(self.resources) | ({"checkpoints"} if task.checkpoints else set())


def _where(err: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame of ``err``'s traceback in a real file (not importlib's frozen
    frames), or nothing."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<")]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _failure(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _import_module(spec: str, target: str) -> Any:
    """The module ``target`` names: a file (``.py`` or a path) or a dotted module on ``sys.path`` / the current
    directory."""
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise TDAError(f"--entry {spec}: no such file {path} (expected path/to/file.py:function or "
                           "package.module:function)")
        name = f"_tda_entry_{path.stem}"
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the file's own imports of its neighbours work
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise TDAError(f"--entry {spec}: {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # so that classes defined there pickle and dataclasses resolve
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as err:
            sys.modules.pop(name, None)
            raise TDAError(f"--entry {spec}: loading {path} raised {_failure(err)}{_where(err)}") from err
        return module
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # `tda-explorer` (unlike `python -m`) does not look in the current directory
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            raise TDAError(f"--entry {spec}: no module named {err.name!r} on sys.path (the current directory and "
                           f"PYTHONPATH); expected package.module:function importable from there, or "
                           "path/to/file.py:function") from None
        raise TDAError(f"--entry {spec}: importing {target} failed: {_failure(err)}{_where(err)} (a dependency of "
                       "your module is missing)") from err
    except (Exception, SystemExit) as err:
        raise TDAError(f"--entry {spec}: importing {target} raised {_failure(err)}{_where(err)}") from err


def load_function(spec: str) -> Callable[[], Any]:
    """The function ``spec`` (``package.module:function`` or ``path/to/file.py:function``) names."""
    if not isinstance(spec, str):
        raise TDAError(f"--entry must be package.module:function, got {type(spec).__name__}")
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise TDAError(f"--entry {spec}: expected package.module:function or path/to/file.py:function (a function "
                       f"returning {RETURNS})")
    module = _import_module(spec, target)
    function: Any = module
    for part in name.split("."):
        if not hasattr(function, part):
            defined = sorted(k for k, v in vars(module).items()
                             if callable(v) and not k.startswith("_") and getattr(v, "__module__", None)
                             == module.__name__)
            raise TDAError(f"--entry {spec}: {target} has no {name!r}; functions defined there: "
                           f"{', '.join(defined) or 'none'}")
        function = getattr(function, part)
    if not callable(function):
        raise TDAError(f"--entry {spec}: {name} is not callable ({type(function).__name__} {function!r:.40}); "
                       f"expected a function returning {RETURNS}")
    return function


def _dataset(spec: str, value: Any, which: str, class_names: list[str] | None) -> AttributionDataset:
    """``train`` or ``test`` as an ``AttributionDataset``."""
    try:
        if isinstance(value, AttributionDataset):
            return value
        if isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise TDAError(f"expected {DATA_FORMS}; got a {type(value).__name__} of {len(value)}")
            inputs, labels = value
            if isinstance(inputs, Mapping):
                raise TDAError("(inputs, labels) pairs take one input tensor; for dict inputs return a torch Dataset "
                               "whose items are dicts (with a 'labels' key)")
            if not isinstance(inputs, (torch.Tensor, np.ndarray)):
                raise TDAError(f"expected {DATA_FORMS}; the pair's inputs are a {type(inputs).__name__}, not a "
                               "tensor")
            return AttributionDataset(inputs, labels, class_names=class_names, name=which)
        if isinstance(value, (torch.Tensor, np.ndarray)):
            raise TDAError(f"expected {DATA_FORMS}; got a {type(value).__name__} alone (no labels): return "
                           f"({which}_inputs, {which}_labels)")
        lazy = hasattr(value, "__len__") and hasattr(value, "__getitem__")
        if isinstance(value, (str, bytes, Mapping)) or not lazy:
            raise TDAError(f"expected {DATA_FORMS}; got {type(value).__name__}")
        return AttributionDataset.from_torch(value, class_names=class_names, name=which)
    except TDAError as err:
        message = str(err)
        raise TDAError(f"--entry {spec}: {which}: {message}") from None


def _resources(spec: str, value: Any) -> Resources:
    """``resources``: need name -> its options (a dict, or a function returning one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TDAError(f"--entry {spec}: resources must be a dict of need name -> options, e.g. "
                       f"{{'base_model': {{'base_model': model}}}}; got {type(value).__name__}")
    out: Resources = {}
    for need, options in value.items():
        if need not in NEEDS:
            raise TDAError(f"--entry {spec}: resources: unknown need {need!r}; the needs are {', '.join(NEEDS)}")
        if callable(options):
            out[need] = options
        elif isinstance(options, Mapping):
            out[need] = (lambda o=dict(options): dict(o))
        else:
            raise TDAError(f"--entry {spec}: resources[{need!r}] must be a dict of method options (or a function "
                           f"returning one), got {type(options).__name__}")
    return out


def normalise(spec: str, returned: Any) -> Entry:
    """What an entry function returned as an ``Entry``; a ``TDAError`` naming ``--entry`` for anything else."""
    if isinstance(returned, Mapping):
        unknown = sorted(str(k) for k in returned if k not in KEYS)
        if unknown:
            raise TDAError(f"--entry {spec}: the returned dict has unknown keys {unknown}; expected {RETURNS}")
        parts = dict(returned)
    elif isinstance(returned, (tuple, list)) and len(returned) in (3, 4):
        parts = dict(zip(("model", "train", "test", "retrain"), returned))
    else:
        got = (f"a {type(returned).__name__} of {len(returned)}" if isinstance(returned, (tuple, list))
               else type(returned).__name__)
        raise TDAError(f"--entry {spec}: the function must return {RETURNS}; it returned {got}")
    task = parts.get("task")
    task_options: dict[str, Any] = {}
    model = parts.get("model")
    if isinstance(task, AttributionTask):
        if model is not None and model is not task.model:
            raise TDAError(f"--entry {spec}: model and task.model are two different modules; return one of them")
        model = task.model
        task_options = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.name != "model"}
    elif isinstance(task, Mapping):
        task_options = dict(task)
        if "model" in task_options:
            raise TDAError(f"--entry {spec}: task holds AttributionTask's options besides the model; return the "
                           "model under 'model', not inside task")
    elif task is not None:
        raise TDAError(f"--entry {spec}: task must be a dict of AttributionTask options (output=, loss_fn=, "
                       f"parameters=, checkpoints=, ...) or an AttributionTask, got {type(task).__name__}")
    missing = (["model"] if model is None else []) + [k for k in ("train", "test") if parts.get(k) is None]
    if missing:
        raise TDAError(f"--entry {spec}: the returned dict lacks {', '.join(missing)}; expected {RETURNS}")
    if not isinstance(model, nn.Module):
        raise TDAError(f"--entry {spec}: model must be a torch.nn.Module (the trained model), got "
                       f"{type(model).__name__}")
    retrain = parts.get("retrain")
    if retrain is not None and not callable(retrain):
        raise TDAError(f"--entry {spec}: retrain must be a function (train_ids, seed) -> nn.Module, got "
                       f"{type(retrain).__name__}")
    class_names = parts.get("class_names")
    if class_names is not None:
        if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
            raise TDAError(f"--entry {spec}: class_names must be a list of strings, got {class_names!r:.80}")
        class_names = list(class_names)
    train = _dataset(spec, parts["train"], "train", class_names)
    test = _dataset(spec, parts["test"], "test", class_names)
    entry = Entry(spec, model, train, test, retrain, task_options, _resources(spec, parts.get("resources")))
    entry.task()  # its options are checked now, whatever command runs
    return entry


def load_entry(spec: str) -> Entry:
    """Import ``spec``'s function, call it and normalise what it returns."""
    function = load_function(spec)
    name = spec.rpartition(":")[2]
    try:
        returned = function()
    except TDAError as err:
        raise TDAError(f"--entry {spec}: {name}() raised: {err}") from err
    except (Exception, SystemExit) as err:
        raise TDAError(f"--entry {spec}: {name}() raised {_failure(err)}{_where(err)}") from err
    return normalise(spec, returned)


def refuse_with_entry(args: Any, defaults: Mapping[str, Any]) -> None:
    """With ``--entry``: a ``TDAError`` naming the built-in task flags also given (their ``dest`` in ``defaults``,
    parsed with default None). Without it: those flags get their defaults."""
    given = [name for name in defaults if getattr(args, name, None) is not None]
    if getattr(args, "entry", None):
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise TDAError(f"--entry {args.entry} attributes the model and data your function returns; {flags} "
                           f"{'chooses' if len(given) == 1 else 'choose'} a built-in task: leave "
                           f"{'it' if len(given) == 1 else 'them'} out, or drop --entry")
        return
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def entry_argument(parser: Any, what: str) -> None:
    parser.add_argument("--entry", default=None, metavar="MODULE:FUNCTION",
                        help=f"{what} on your own model and data: a function (package.module:function importable "
                             "from the current directory or PYTHONPATH, or path/to/file.py:function) returning "
                             "(model, train, test), (model, train, test, retrain) or a dict with those keys and "
                             "optionally task (AttributionTask options); train and test are AttributionDatasets, "
                             "torch Datasets or (inputs, labels) tensors. Excludes the built-in task flags")
