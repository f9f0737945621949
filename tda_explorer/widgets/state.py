"""The explorer's shared state: every panel observes it, none owns it."""

from __future__ import annotations

from collections.abc import Sequence

from traitlets import Any, HasTraits, Int, List, Unicode


class ExplorerState(HasTraits):
    """What is selected: test id, method, k, the training example in detail, the mislabel list's method,
    position and lasso selection, the compared methods, and a revision counter bumped on every flag."""

    test_id = Any(None)
    method = Unicode("")
    k = Int(5)
    detail_train_id = Any(None)
    flags_revision = Int(0)
    mislabel_method = Unicode("")
    mislabel_index = Int(0)
    selection = List()
    compare_a = Unicode("")
    compare_b = Unicode("")


def refill(dropdown, options: Sequence) -> None:
    """Offer ``options`` in ``dropdown``, keeping its selected value when still offered, else the first (None when
    there are none)."""
    current = dropdown.value
    dropdown.options = options
    dropdown.value = current if current in options else (options[0] if options else None)
