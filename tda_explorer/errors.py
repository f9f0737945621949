"""The library's exception type, importable without torch."""


class TDAError(ValueError):
    """Raised for bad input to the public API; the message names the argument."""
