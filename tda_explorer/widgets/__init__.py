"""Widgets: ipywidgets panels that observe a ``Session`` (views only; logic lives below)."""

from tda_explorer.widgets.explorer import Explorer, InfluenceBrowser, TestPicker
from tda_explorer.widgets.state import ExplorerState

__all__ = ["Explorer", "InfluenceBrowser", "TestPicker", "ExplorerState"]
