"""Data layer: what is attributed — datasets with ids, labels, class names and renderers."""

from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.digits import DataSplit, load_augmented_digits, load_digits_split
from tda_explorer.data.noise import flip_labels
from tda_explorer.data.renderers import ImageRenderer, RowRenderer, TextRenderer

__all__ = [
    "AttributionDataset", "DataSplit", "load_digits_split", "load_augmented_digits", "flip_labels",
    "ImageRenderer", "RowRenderer", "TextRenderer",
]
