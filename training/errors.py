"""The one error type that the CLI turns into a single stderr line and exit status 2."""


class VillesError(ValueError):
    """Bad input: an unknown character, a missing checkpoint, an out-of-range setting. Nothing has been written."""
