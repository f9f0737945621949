"""tda_explorer: interactive training data attribution — which training data made the model do that."""

from tda_explorer._validation import TDAError
from tda_explorer.compute import Attribution, AttributionTask, available_methods, get_method
from tda_explorer.data import AttributionDataset, load_digits_split
from tda_explorer.session import Session

__version__ = "0.1.0"

__all__ = [
    "TDAError", "Attribution", "AttributionTask", "available_methods", "get_method",
    "AttributionDataset", "load_digits_split", "Session", "__version__",
]
