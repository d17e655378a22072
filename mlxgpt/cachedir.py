"""Where mlxgpt keeps what it can recompute: tokenized corpora, measurements of the machine."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MLXGPT_CACHE_DIR"


def cache_root() -> Path:
    """``$MLXGPT_CACHE_DIR``, or ``~/.cache/mlxgpt`` (``$XDG_CACHE_HOME`` respected)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mlxgpt"
