"""The one exception type the library raises for bad input (the CLI prints it as one line), and
the one way it warns."""

import sys


class MlxgptError(Exception):
    """A user-facing error: bad input, a missing file, a model that does not fit."""


def warn(msg: str) -> None:
    """A user-facing warning: one line on stderr."""
    print(f"warning: {msg}", file=sys.stderr)
