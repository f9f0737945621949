"""Widgets: ipywidgets + plotly panels that observe a ``Session`` (views only; logic lives below)."""

from tda_explorer.widgets.browser import InfluenceBrowser
from tda_explorer.widgets.compare import ComparePanel
from tda_explorer.widgets.detail import TrainingDetail
from tda_explorer.widgets.explorer import ComputeBar, Explorer
from tda_explorer.widgets.mislabel import MislabelPanel
from tda_explorer.widgets.picker import TestPicker
from tda_explorer.widgets.state import ExplorerState

__all__ = ["Explorer", "ComputeBar", "InfluenceBrowser", "ComparePanel", "TrainingDetail", "MislabelPanel",
           "TestPicker", "ExplorerState"]
