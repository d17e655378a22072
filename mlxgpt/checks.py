"""Checks for values that come from outside (options, config files, model metadata): a wrong
type or an out-of-range value is refused with one line naming the setting and its range, before
anything uses it (a string compared with a number, or a size of 10^12, fails far from the cause
otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import MlxgptError

SEED_MAX = 2**64 - 1  # MLX's random keys take an unsigned 64-bit seed
# What model loaders read: configs, weights, tokenizer files, chat templates.
LOADED_SUFFIXES = frozenset({".json", ".safetensors", ".bin", ".txt", ".tiktoken", ".jinja"})


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message names a bad value without
    quoting a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def span(lo: float | None, hi: float | None, above: bool = False) -> str:
    """The allowed range in words: "at least 1", "in 0..255", "more than 0"."""
    low = f"more than {lo}" if above else f"at least {lo}"
    if hi is None:
        return low if lo is not None else "any value"
    if lo is None:
        return f"at most {hi}"
    return f"{low} and at most {hi}" if above else f"in {lo}..{hi}"


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (either end open when None); a bool, a float or a
    string is refused, not converted."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MlxgptError(f"{name} must be an integer ({span(lo, hi)}), got {shown(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MlxgptError(f"{name} must be {span(lo, hi)}, got {value}")
    return value


def check_number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
                 above: bool = False) -> float:
    """``value`` as a float in ``lo..hi`` (``above``: strictly more than ``lo``); NaN, a bool or
    a string is refused."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise MlxgptError(f"{name} must be a number ({span(lo, hi, above)}), got {shown(value)}")
    low_ok = lo is None or (value > lo if above else value >= lo)
    if not low_ok or (hi is not None and value > hi):
        raise MlxgptError(f"{name} must be {span(lo, hi, above)}, got {value}")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is true or false; "no", 0 or 1 are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise MlxgptError(f"{name} must be true or false, got {shown(value)}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(value, name, 0, SEED_MAX)


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a value whose type is not its dataclass field's (``int``, ``float``, ``str``,
    ``bool``, each optionally ``| None``), naming the key: settings read from a file."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
    annotations = {k: str(v) for c in reversed(cls.__mro__)
                   for k, v in getattr(c, "__annotations__", {}).items()}
    for key, value in values.items():
        parts = [p.strip() for p in annotations.get(key, "").split("|")]
        base = next((p for p in parts if p != "None"), "")
        if base not in kinds or (value is None and "None" in parts):
            continue
        if isinstance(value, bool) and base != "bool" or not isinstance(value, kinds[base]):
            raise MlxgptError(f"{where}: {key} must be {names[base]}, got {shown(value)}")


def check_links(folder: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """Refuse a model folder whose files (``names``, or every file a loader reads) are
    symbolic links leading out of it: a folder from elsewhere must not make mlxgpt read, and
    quote in its errors, another file of this user's (``merges.txt`` -> ``~/.ssh/...``).
    Hugging Face's cache is the one layout allowed: ``snapshots/REV/f`` -> ``../../blobs/...``.
    """
    root = Path(folder)
    try:
        if names is None:
            names = [p.name for p in root.iterdir() if p.suffix in LOADED_SUFFIXES]
        inside = [root.resolve()]
        if root.parent.name == "snapshots":
            inside.append((root.parent.parent / "blobs").resolve())
        for name in names:
            path = root / name
            if path.is_symlink() and not any(path.resolve().is_relative_to(d) for d in inside):
                raise MlxgptError(f"{path}: a link to a file outside the model folder; mlxgpt "
                                  "reads a model's files from its own folder only")
    except (OSError, RuntimeError):  # unreadable, or a link loop: the loader says so itself
        return
