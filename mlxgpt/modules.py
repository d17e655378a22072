"""Finding and replacing submodules by their dotted path (``h.3.attn.c_attn``), as
``nn.Module.named_modules`` names them; list items are indexed by number."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn


def get_module(model: nn.Module, path: str) -> Any:
    """The submodule (or list) at ``path``; ``""`` is the model itself."""
    obj: Any = model
    for part in path.split(".") if path else []:
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at ``path`` is."""
    parent_path, _, name = path.rpartition(".")
    owner = get_module(model, parent_path)
    if isinstance(owner, list):
        owner[int(name)] = new
    else:
        setattr(owner, name, new)
