"""tda_explorer: interactive training data attribution — which training data made the model do that.

Names are imported on first use (PEP 562), so ``import tda_explorer.flags`` does not load torch.
"""

from importlib import import_module

from tda_explorer.errors import TDAError

__version__ = "0.1.0"

_LAZY = {
    "Attribution": "tda_explorer.compute",
    "AttributionTask": "tda_explorer.compute",
    "available_methods": "tda_explorer.compute",
    "get_method": "tda_explorer.compute",
    "AttributionDataset": "tda_explorer.data",
    "load_digits_split": "tda_explorer.data",
    "Session": "tda_explorer.session",
    "select": "tda_explorer.compute.selection.less",
    "LAVA": "tda_explorer.compute.valuation.lava",
    "TwoStageTracer": "tda_explorer.compute.tracing.fasttrack",
    "SolverBackoffWarning": "tda_explorer.compute.methods.influence.backoff",
}

__all__ = ["TDAError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tda_explorer' has no attribute {name!r}")
