"""The explorer's shared state: every panel observes it, none owns it."""

from __future__ import annotations

from traitlets import Any, HasTraits, Int, Unicode


class ExplorerState(HasTraits):
    """Selected test id, method, k, the training example in detail, and a flags revision counter."""

    test_id = Any(None)
    method = Unicode("")
    k = Int(5)
    detail_train_id = Any(None)
    flags_revision = Int(0)
