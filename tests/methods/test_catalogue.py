"""The method catalogue: every entry's options, family and needs, and the import graph behind it.

A method that is not an ``Attributor`` keeps its own constructor (or function) signature beside its ``Arguments``
dataclass, so the two are compared here: the dataclass's fields are the factory's keyword options, with the same
defaults, and cannot drift apart unnoticed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import tda_explorer.compute.methods  # noqa: F401 - importing it fills the catalogue
from tda_explorer.compute.catalogue import CATALOGUE, Family, build_arguments
from tda_explorer.compute.methods import METHODS, Attributor, get_method
from tda_explorer.errors import TDAError

ROOT = Path(__file__).resolve().parents[2]


def _is_attributor(factory) -> bool:
    return isinstance(factory, type) and issubclass(factory, Attributor)


NON_ATTRIBUTORS = sorted(name for name, spec in CATALOGUE.items() if not _is_attributor(spec.factory))


def _named_parameters(factory) -> list[inspect.Parameter]:
    """The parameters that can be given by keyword (no ``*args`` / ``**kwargs``)."""
    return [p for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _parameter_taking_arguments(factory, arguments: type) -> str | None:
    """The parameter that takes the whole ``Arguments`` dataclass as one object (UnTrac's ``config``), if any."""
    hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    for name, hint in hints.items():
        if any(isinstance(c, type) and dataclasses.is_dataclass(c) and issubclass(arguments, c)
               for c in (hint, *typing.get_args(hint))):
            return name
    return None


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_the_catalogue_holds_every_family():
    expected = {
        "dvemb": (Family.PAIRWISE, ("recording",)),
        "magic": (Family.PAIRWISE, ("trajectory",)),
        "source": (Family.PAIRWISE, ("checkpoints",)),
        "trackstar": (Family.TRACING, ()),
        "lava": (Family.VALUES, ("validation",)),
        "inrun-shapley": (Family.VALUES, ("training_loop", "validation")),
        "untrac": (Family.GROUPS, ("groups",)),
        "untrac-inv": (Family.GROUPS, ("groups",)),
        "less": (Family.SELECTION, ("pool_and_target",)),
        "fasttrack": (Family.TRACING, ("text",)),
        "bm25": (Family.TRACING, ("text",)),
    }
    for name, (family, needs) in expected.items():
        assert (CATALOGUE[name].family, CATALOGUE[name].needs) == (family, needs), name
    assert {"lava", "inrun-shapley", "untrac", "untrac-inv", "less", "fasttrack", "bm25"} <= set(NON_ATTRIBUTORS)
    assert not set(NON_ATTRIBUTORS) & set(METHODS)
    assert {"dvemb", "magic", "source", "trackstar"} <= set(METHODS)


@pytest.mark.parametrize("name", NON_ATTRIBUTORS)
def test_non_attributor_arguments_are_the_factory_options(name):
    """Fields == the factory's keyword options (those with a default, and any required one the dataclass lists,
    whose help then says it is required), with equal defaults; a factory that takes the dataclass whole (UnTrac's
    ``config``) has no other option than its ``device``."""
    spec = CATALOGUE[name]
    params = _named_parameters(spec.factory)
    fields = {f.name: f for f in dataclasses.fields(spec.arguments)}
    whole = _parameter_taking_arguments(spec.factory, spec.arguments)
    if whole is not None:
        others = {p.name for p in params if p.default is not p.empty} - {whole}
        assert others <= {"device"}, f"{name}: options outside its Arguments {sorted(others - {'device'})}"
        return
    options = {p.name for p in params if p.default is not p.empty}
    required = {p.name for p in params if p.default is p.empty}
    assert set(fields) == options | (set(fields) & required), (
        f"{name}: Arguments {sorted(fields)} but the factory's keyword options are {sorted(options)}")
    for p in params:
        if p.name not in fields:
            continue
        if p.default is p.empty:
            assert "required" in fields[p.name].metadata["help"], f"{name}.{p.name} is required: say so in its help"
        else:
            assert _default(fields[p.name]) == p.default, f"{name}.{p.name}: the defaults differ"


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_option_has_help_and_describes(name):
    described = CATALOGUE[name].describe()
    assert described["summary"] and all(a["help"] for a in described["arguments"])


def test_non_attributors_check_their_options_through_the_catalogue(tiny_mlp):
    from tda_explorer.compute.selection.less import select
    from tda_explorer.compute.tracing.fasttrack import TwoStageTracer
    from tda_explorer.compute.valuation.lava import LAVA
    from tda_explorer.compute.valuation.untrac import InverseUnlearnConfig, UnlearnConfig

    embed, verify = lambda texts: torch.ones(len(texts), 2), lambda query, texts: [0.0] * len(texts)
    with pytest.raises(TDAError, match=r"n_clusters must be an integer in \[1, inf\), got 0"):
        TwoStageTracer(embed, verify, n_clusters=0)
    with pytest.raises(TDAError, match=r"epsilon must be a number in \(0, inf\)"):
        LAVA(model=tiny_mlp, epsilon=0.0)
    with pytest.raises(TDAError, match="unknown optimizer 'rmsprop'"):
        UnlearnConfig(optimizer="rmsprop")
    with pytest.raises(TDAError, match=r"batch_size must be an integer in \[1, inf\)"):
        InverseUnlearnConfig(batch_size=0)
    with pytest.raises(TDAError, match="unknown allocation 'greedy'"):  # refused before any data is touched
        select(nn.Linear(2, 2), None, None, allocation="greedy")
    assert TwoStageTracer(embed, verify, threshold=-float("inf")).threshold == -float("inf")  # keep every candidate
    assert build_arguments(CATALOGUE["less"].arguments, "less", {"projection_dim": None}).projection_dim is None


def test_non_attributors_are_not_built_by_get_method(tiny_mlp):
    from tda_explorer.compute.engine.task import AttributionTask

    with pytest.raises(TDAError, match="'lava' is a data values method, not an attributor: build LAVA directly"):
        get_method("lava", AttributionTask(tiny_mlp))


def test_catalogue_imports_no_method_module():
    """The catalogue sits below every method: it imports none of them (the import graph stays acyclic)."""
    tree = ast.parse((ROOT / "tda_explorer" / "compute" / "catalogue.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    method_packages = ("tda_explorer.compute.methods", "tda_explorer.compute.valuation",
                       "tda_explorer.compute.selection", "tda_explorer.compute.tracing")
    assert not [m for m in imported if m.startswith(method_packages)]


def test_importing_the_methods_registers_all_without_optional_packages():
    """``import tda_explorer.compute.methods`` fills the catalogue, and BM25's rank-bm25 waits for its first call."""
    code = ("import sys, tda_explorer.compute.methods as m; from tda_explorer.compute.catalogue import CATALOGUE; "
            "assert {'lava', 'inrun-shapley', 'untrac', 'untrac-inv', 'less', 'fasttrack', 'bm25'} <= set(CATALOGUE); "
            "assert 'rank_bm25' not in sys.modules, 'rank_bm25 imported at module import time'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
