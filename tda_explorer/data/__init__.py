"""Data layer: what is attributed — datasets with ids, labels, class names and renderers."""

from tda_explorer.data.dataset import IGNORE, AttributionDataset, DataSplit
from tda_explorer.data.digits import load_augmented_digits, load_digits_split
from tda_explorer.data.noise import flip_labels
from tda_explorer.data.renderers import ImageRenderer, RowRenderer, TextRenderer
from tda_explorer.data.text import WordTokenizer, language_model_dataset, load_reviews_split, make_reviews

__all__ = [
    "AttributionDataset", "DataSplit", "load_digits_split", "load_augmented_digits", "flip_labels",
    "ImageRenderer", "RowRenderer", "TextRenderer", "IGNORE", "WordTokenizer", "make_reviews", "load_reviews_split",
    "language_model_dataset",
]
