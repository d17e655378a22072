"""The one exception type the library raises for bad input; the CLI prints it as one line."""


class MlxgptError(Exception):
    """A user-facing error: bad input, a missing file, a model that does not fit."""
