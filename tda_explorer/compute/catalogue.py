"""The method catalogue: every method registered once with its family, needs and arguments.

A method's options are one dataclass (``Arguments``) whose fields carry their help text and constraints in their
metadata (``option``); ``check_arguments`` is the one place constraints are enforced. The catalogue entry
(``MethodSpec``) gives everything else that lists options: ``config()``, the CLI's flags, the explorer's compute bar
and the tests' parametrisation. ``needs`` names what a method must be given besides the model and data (``NEEDS``
says what each one is and how to get it), so a caller can tell what it lacks before running anything.

Shared words mean one thing everywhere: ``damping`` is the absolute λ added to the curvature of the *mean* training
objective, except where a method's help says it is relative to the spectrum (TRAK's); ``projection_dim`` is the
number of features per example (LoGra: the rank of each layer side).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from tda_explorer.errors import TDAError


class Family(str, enum.Enum):
    """What a method answers."""

    PAIRWISE = "pairwise attribution"  # scores [n_test, n_train]
    MISLABEL = "self-influence / mislabel ranking"  # one suspicion per training example
    VALUES = "data values"  # one value per training example, no test point
    GROUPS = "group effects"  # scores of groups of training data
    SELECTION = "selection"  # a subset of a pool chosen for a target task
    TRACING = "tracing"  # the documents that support a query's fact


@dataclass(frozen=True)
class Need:
    """Something a method must be given besides the model and data: what it is and how to get it, and the options
    that supply it directly (any one group of ``options`` given in full satisfies it)."""

    help: str
    options: tuple[tuple[str, ...], ...] = ()


NEEDS: dict[str, Need] = {
    "checkpoints": Need("checkpoints of the training run: AttributionTask(checkpoints=...) (train_model records them, "
                        "or the Hugging Face callback), or recording=RunRecorder(...) of your own loop",
                        (("checkpoints",), ("recording",))),
    "trajectory": Need("a recorded run: trajectory=Trajectory(init_state, config, checkpoints) of a built-in recipe "
                       "(Experiment.trajectory()), or recording=RunRecorder(...) of your own loop",
                       (("trajectory",), ("recording",))),
    "recording": Need("a recording of the training run: recording=RunRecorder(...) around your own loop (or a "
                      "StepRecorder used as the training loop's step callback)", (("recording",),)),
    "recipe": Need("a training recipe to retrain with: model_factory=seed -> nn.Module and train_config=TrainConfig "
                   "(or out-of-fold probabilities from your own cross-validation)",
                   (("model_factory", "train_config"), ("oof_probabilities",))),
    "base_model": Need("the base model before fine-tuning: base_model=nn.Module or its state dict", (("base_model",),)),
    "validation": Need("a clean validation set to compare the training set with"),
    "training_loop": Need("your training loop, instrumented while it runs (values accumulate during training)"),
    "groups": Need("a partition of the training set into groups"),
    "pool_and_target": Need("a pool to select from and a target set to select for"),
    "text": Need("text inputs: a corpus of documents and queries as strings"),
}

#: What a caller can supply for a need: a function returning the options that satisfy it (called only when used).
Resources = dict[str, Callable[[], dict[str, Any]]]


@dataclass(frozen=True)
class Interval:
    """A number in [low, high] (either bound may be open or absent); ``integer`` asks for an int."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, name: str, value: Any) -> None:
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            raise TDAError(f"{name} must be {kind} {self}, got {type(value).__name__} ({value!r})")
        bad_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        bad_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if bad_low or bad_high or value != value or value in (float("inf"), float("-inf")):
            raise TDAError(f"{name} must be {kind} {self}, got {value!r}")

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"in {low}, {high}"


@dataclass(frozen=True)
class Options:
    """One of the listed values."""

    values: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise TDAError(f"unknown {name} {value!r}; expected one of: {', '.join(map(str, self.values))}")

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


POSITIVE = Interval(0, None, low_open=True)
NONNEGATIVE = Interval(0, None)
POSITIVE_INT = Interval(1, None, integer=True)
FRACTION = Interval(0, 1, low_open=True)


def option(default: Any = None, help: str = "", check: Interval | Options | None = None, *,
           config: bool = True, cli: bool | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A field of an ``Arguments`` dataclass: its default, help, constraint, and whether it belongs in ``config()``
    (plain values) and on the command line (default: the plain values of a simple type)."""
    meta = {"help": help, "check": check, "config": config, "cli": config if cli is None else cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_arguments(args: Any) -> Any:
    """Enforce every field's declared constraint (``None`` passes where the field's type allows it); returns
    ``args``."""
    for f in dataclasses.fields(args):
        value, check = getattr(args, f.name), f.metadata.get("check")
        if check is None or (value is None and (f.default is None or "None" in str(f.type))):
            continue
        check.check(f.name, value)
    return args


def build_arguments(cls: type, method: str, options: dict[str, Any]) -> Any:
    """``cls(**options)`` checked, or a ``TDAError`` naming the unknown option and listing the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TDAError(f"{method} has no option {', '.join(map(repr, unknown))}; its options are: "
                       f"{', '.join(sorted(known))}")
    return check_arguments(cls(**options))


def arguments_config(args: Any) -> dict[str, Any]:
    """The plain-valued options of ``args`` (those whose metadata says ``config``), for ``config()``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.metadata.get("config", True)}


@dataclass(frozen=True)
class ArgumentInfo:
    """One option as the catalogue describes it."""

    name: str
    type: str
    default: Any
    help: str
    constraint: str
    cli: bool

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "default": self.default if _plain(self.default) else repr(self.default)}

    def parse(self, text: str) -> Any:
        """A value of this option from text (a command-line flag or a form field): "none" gives None where the type
        allows it; the number and bool types by their names in the type."""
        text = text.strip()
        if text.lower() == "none" and "None" in self.type:
            return None
        try:
            if "bool" in self.type:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes")
            if "float" in self.type:
                return float(text)
            if "int" in self.type:
                return int(text)
        except ValueError:
            raise TDAError(f"{self.name} must be of type {self.type}, got {text!r}") from None
        return text


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclass(frozen=True)
class MethodSpec:
    """A catalogue entry: how to build the method, what it answers, what it needs and its options."""

    name: str
    family: Family
    factory: type
    arguments: type
    needs: tuple[str, ...] = ()
    summary: str = ""
    uses: tuple[str, ...] = ()  # what it takes when a caller has it (NEEDS' names), never required

    def argument_info(self) -> list[ArgumentInfo]:
        hints = get_type_hints(self.arguments)
        rows = []
        for f in dataclasses.fields(self.arguments):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            check = f.metadata.get("check")
            rows.append(ArgumentInfo(f.name, _type_name(hints.get(f.name, Any)), default, f.metadata.get("help", ""),
                                     "" if check is None else str(check), bool(f.metadata.get("cli"))))
        return rows

    def missing(self, provided: Iterable[str], options: Iterable[str] = ()) -> list[str]:
        """What this method needs that neither ``provided`` (names of ``NEEDS``) nor the given ``options`` supply,
        each as a sentence ("needs a recorded run: …")."""
        have, given = set(provided), set(options)
        return [f"needs {NEEDS[n].help}" for n in self.needs
                if n not in have and not any(set(group) <= given or set(group) <= have for group in NEEDS[n].options)]

    def fill(self, options: dict[str, Any], resources: Resources) -> dict[str, Any]:
        """``options`` with what ``resources`` supply for each need the options leave open (and, for what the method
        ``uses``, the options it has a field for); a ``TDAError`` that says what is lacking when neither supplies a
        need."""
        filled = dict(options)
        for need in self.needs:
            if any(set(group) <= set(filled) for group in NEEDS[need].options):
                continue
            if need in resources:
                filled.update({k: v for k, v in resources[need]().items() if k not in filled})
                continue
            # a resource named like one group of the need's options supplies it (a recording serves every need
            # it can: {"recording": ...} fills the trajectory and checkpoints needs too)
            group = next((g for g in NEEDS[need].options if set(g) <= set(resources)), None)
            if group is None:
                raise TDAError(f"{self.name} {self.missing(resources, filled)[0]}")
            for name in group:
                filled.update({k: v for k, v in resources[name]().items() if k not in filled})
        names = {f.name for f in dataclasses.fields(self.arguments)}
        for use in self.uses:
            if use in resources:
                filled.update({k: v for k, v in resources[use]().items() if k in names and k not in filled})
        return filled

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family.value, "needs": list(self.needs), "uses": list(self.uses),
                "summary": self.summary,
                "arguments": [a.as_dict() for a in self.argument_info()]}


CATALOGUE: dict[str, MethodSpec] = {}


def register(name: str, family: Family, arguments: type, needs: tuple[str, ...] = (),
             uses: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: enter ``name`` in the catalogue (the class keeps ``name`` and ``Arguments``). ``uses``: what
    the method takes when a caller has it (names of ``NEEDS``; ``fill`` passes on the options it has a field for)."""
    unknown = [n for n in (*needs, *uses) if n not in NEEDS]
    if unknown:
        raise TDAError(f"{name}: unknown needs {unknown}; declared needs are {sorted(NEEDS)}")
    missing_help = [f.name for f in dataclasses.fields(arguments) if not f.metadata.get("help")]
    if missing_help:
        raise TDAError(f"{name}: options without help {missing_help}")

    def decorate(cls: type) -> type:
        if name in CATALOGUE and CATALOGUE[name].factory is not cls:
            raise TDAError(f"method {name!r} is registered twice")
        doc = inspect.getdoc(cls) or ""
        CATALOGUE[name] = MethodSpec(name, family, cls, arguments, tuple(needs), doc.split("\n")[0], tuple(uses))
        cls.Arguments = arguments
        if isinstance(cls, type) and hasattr(cls, "name"):
            cls.name = name
        return cls

    return decorate


def method_spec(name: str) -> MethodSpec:
    """The catalogue entry of ``name``, or a ``TDAError`` listing the known methods."""
    if name not in CATALOGUE:
        raise TDAError(f"unknown method {name!r}; available: {', '.join(sorted(CATALOGUE))}")
    return CATALOGUE[name]


def create(name: str, *args: Any, **options: Any) -> Any:
    """Build the method registered as ``name`` (for methods that build another method by name, e.g. a base or inner
    method; the catalogue is complete once ``tda_explorer.compute.methods`` is imported)."""
    return method_spec(name).factory(*args, **options)
