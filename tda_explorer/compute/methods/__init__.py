"""Attribution methods and their registry: ``get_method("tracin", task, **config)``."""

from __future__ import annotations

from tda_explorer._validation import TDAError
from tda_explorer.compute.engine.task import AttributionTask
from tda_explorer.compute.methods.base import Attributor
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
    cls.name: cls for cls in (
        GradDot, GradCos, TracIn, TRAK, Suspicion, ExplicitInfluence, CGInfluence, KFACInfluence, EKFACInfluence,
        ASTRAInfluence, LiSSAInfluence, ArnoldiInfluence, DataInfInfluence, SynsetLOO,
        DataValueEmbedding, ReplayMetagradient, SOURCE, DebiasDenoise, LoRAEnsemble, TrackStar,
    )
}


def available_methods() -> list[str]:
    """Registry names accepted by ``get_method`` and the CLI's ``--method``."""
    return sorted(METHODS)


def get_method(name: str, task: AttributionTask, **config) -> Attributor:
    """Build the attributor registered as ``name`` for ``task`` with its ``config``."""
    if name not in METHODS:
        raise TDAError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return METHODS[name](task, **config)


__all__ = [
    "Attributor", "InfluenceFunction", "ExplicitInfluence", "CGInfluence", "GradDot", "GradCos",
    "TracIn", "TRAK", "Suspicion", "KFACInfluence", "EKFACInfluence", "ASTRAInfluence", "LiSSAInfluence",
    "ArnoldiInfluence", "DataInfInfluence", "SynsetLOO", "DataValueEmbedding", "ReplayMetagradient", "SOURCE",
    "DebiasDenoise", "LoRAEnsemble", "TrackStar",
    "METHODS",
    "available_methods", "get_method",
]
