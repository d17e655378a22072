"""Atomic text writes, file locks and a JSON cache of measurements, with no MLX import (the BLAS
preload uses them before MLX loads)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block (none where it cannot be taken), so
    that processes updating one cache file do not lose each other's entries."""
    import fcntl

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115  (closed below, after the block)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: go on unlocked
        yield
    finally:
        f.close()  # releases the lock


def cached_json(path: str | os.PathLike, key: str, read: Callable[[Any], T],
                make: Callable[[], Any], keep: int = 0) -> T:
    """``read(entry)`` for the entry stored under ``key`` in the JSON object at ``path``; where
    there is none (or ``read`` finds it malformed: KeyError, TypeError, ValueError), ``make()``'s
    entry, stored there first. Under a lock, so that processes started together make it once
    and keep each other's entries; with ``keep``, only the latest ``keep`` entries stay. A file
    that cannot be read or written is measured over (or again next time)."""
    path = Path(path)
    with locked(path.with_suffix(".lock")):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        if key in saved:
            try:
                return read(saved[key])
            except (KeyError, TypeError, ValueError):
                del saved[key]
        entry = make()
        saved[key] = entry
        if keep:
            saved = dict(list(saved.items())[-keep:])
        with contextlib.suppress(OSError):
            atomic_write_text(path, json.dumps(saved, indent=1) + "\n")
        return read(entry)
