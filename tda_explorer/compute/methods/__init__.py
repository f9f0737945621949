"""Attribution methods: ``get_method("tracin", task, **options)``.

Importing this package imports every method module, and each registers itself in ``compute.catalogue``;
``METHODS`` is the catalogue's attributors (pairwise and self-influence methods with ``fit`` / ``attribute``).
"""

from __future__ import annotations

# the catalogue's other families (values, groups, selection, tracing): imported so that they register
import tda_explorer.compute.selection.less  # noqa: F401
import tda_explorer.compute.tracing.bm25  # noqa: F401
import tda_explorer.compute.tracing.fasttrack  # noqa: F401
import tda_explorer.compute.valuation.inrun_shapley  # noqa: F401
import tda_explorer.compute.valuation.lava  # noqa: F401
import tda_explorer.compute.valuation.untrac  # noqa: F401
from tda_explorer._validation import TDAError
from tda_explorer.compute.catalogue import CATALOGUE, method_spec
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor, AttributorArguments
from tda_explorer.compute.methods.dda import DebiasDenoise
from tda_explorer.compute.methods.dvemb import DataValueEmbedding
from tda_explorer.compute.methods.grad_similarity import GradCos, GradDot
from tda_explorer.compute.methods.influence.arnoldi import ArnoldiInfluence
from tda_explorer.compute.methods.influence.astra import ASTRAInfluence
from tda_explorer.compute.methods.influence.datainf import DataInfInfluence
from tda_explorer.compute.methods.influence.direct import CGInfluence, ExplicitInfluence, InfluenceFunction
from tda_explorer.compute.methods.influence.ekfac import EKFACInfluence, KFACInfluence
from tda_explorer.compute.methods.influence.lissa import LiSSAInfluence
from tda_explorer.compute.methods.lora_ensemble import LoRAEnsemble
from tda_explorer.compute.methods.magic import ReplayMetagradient
from tda_explorer.compute.methods.source import SOURCE
from tda_explorer.compute.methods.suspicion import Suspicion
from tda_explorer.compute.methods.synset_loo import SynsetLOO
from tda_explorer.compute.methods.tracin import TracIn
from tda_explorer.compute.methods.trak import TRAK
from tda_explorer.compute.tracing.trackstar import TrackStar

METHODS: dict[str, type[Attributor]] = {
    name: spec.factory for name, spec in CATALOGUE.items()
    if isinstance(spec.factory, type) and issubclass(spec.factory, Attributor)
}


def available_methods() -> list[str]:
    """Names of the attributors accepted by ``get_method`` and the CLI's ``--method``."""
    return sorted(METHODS)


def get_method(name: str, task: AttributionTask, **options) -> Attributor:
    """Build the attributor registered as ``name`` for ``task`` with its ``options``."""
    if name not in METHODS:
        method_spec(name)  # unknown names: the catalogue's error
        raise TDAError(f"{name!r} is a {CATALOGUE[name].family.value} method, not an attributor: build "
                       f"{CATALOGUE[name].factory.__name__} directly; attributors are {', '.join(available_methods())}")
    return METHODS[name](task, **options)


__all__ = [
    "Attributor", "AttributorArguments", "InfluenceFunction", "ExplicitInfluence", "CGInfluence", "GradDot", "GradCos",
    "TracIn", "TRAK", "Suspicion", "KFACInfluence", "EKFACInfluence", "ASTRAInfluence", "LiSSAInfluence",
    "ArnoldiInfluence", "DataInfInfluence", "SynsetLOO", "DataValueEmbedding", "ReplayMetagradient", "SOURCE",
    "DebiasDenoise", "LoRAEnsemble", "TrackStar", "METHODS", "available_methods", "get_method",
]
