"""Atomic writes, file locks and a JSON cache of measurements, with no MLX import (the BLAS
preload uses them before MLX loads).

A file or folder is written under a temporary name next to its destination, ``.NAME.tmp-PID-*``,
and renamed into place; a folder being replaced waits as ``.NAME.old-PID-*`` for the moment
between the two renames. The writer's process id in those names lets a later writer tell the
leftovers of a killed one (whose process is gone) from those of one still running:
:func:`clean_leftovers` removes them, or finishes an interrupted replacement. Written files and
folders get the modes the umask gives (``mkstemp``/``mkdtemp`` make them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import MlxgptError

T = TypeVar("T")

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
# In every folder mlxgpt writes, written last: who wrote it (``--force`` replaces only such
# folders) and, in a temporary folder, that it is complete.
MARKER = ".mlxgpt"


class WriteError(MlxgptError, OSError):
    """A write that failed (disk full, no permission, read-only): one line for the user, and
    still an OSError for code that handles those."""


def write_error(e: BaseException, target: str | os.PathLike) -> WriteError:
    """``e`` as one line naming what could not be written and why."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return WriteError(f"cannot write to {target}: {reason}")


def umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a temporary file (0600) or folder (0700) the mode a plain write would have."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask())


def temp_prefix(path: Path, tag: str = TMP_TAG) -> str:
    return f".{path.name}{tag}{os.getpid()}-"


def make_temp_dir(path: Path) -> Path:
    """An empty temporary folder next to ``path``, with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    follow_umask(tmp)
    return tmp


def remove(path: Path) -> None:
    """Remove a file or folder, quietly (cleaning up must not hide the error being reported)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def swap_in(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` to ``path``; an existing folder there is renamed aside
    first and removed last, so a kill in between leaves both for :func:`clean_leftovers`."""
    if path.exists() or path.is_symlink():
        old = path.with_name(f"{temp_prefix(path, OLD_TAG)}{secrets.token_hex(4)}")
        path.rename(old)
        tmp.rename(path)
        remove(old)
    else:
        tmp.rename(path)


def _writer(entry: str, name: str) -> tuple[str, int] | None:
    """(tag, pid) when ``entry`` is a temporary of a writer of ``name``."""
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{name}{tag}"
        if entry.startswith(prefix):
            pid = entry[len(prefix):].partition("-")[0]
            return (tag, int(pid)) if pid.isdigit() else None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def clean_leftovers(folder: str | os.PathLike, name: str | None = None) -> None:
    """Remove what killed writers left in ``folder`` (for the entry ``name``, or for every
    entry): their temporaries, and a folder renamed aside. Where the entry itself is missing
    (a kill between the two renames of a replacement), the newest complete new folder, else
    the old one, becomes it again. Writers still running are left alone."""
    folder = Path(folder)
    try:
        entries = [e.name for e in os.scandir(folder)] if folder.is_dir() else []
    except OSError:
        return
    stale: dict[str, list[tuple[str, Path]]] = {}
    for entry in entries:
        names = [name] if name is not None else [
            e for e in {entry[1:].split(TMP_TAG)[0], entry[1:].split(OLD_TAG)[0]}
            if e and not e.startswith(".")]
        for target in names:
            found = _writer(entry, target)
            if found and not _alive(found[1]):
                stale.setdefault(target, []).append((found[0], folder / entry))
    for target, found in stale.items():
        path = folder / target
        if not (path.exists() or path.is_symlink()):
            done = [p for tag, p in found if tag == TMP_TAG and (p / MARKER).is_file()]
            old = [p for tag, p in found if tag == OLD_TAG and p.is_dir()]
            for candidate in (done, old):
                if candidate:
                    best = max(candidate, key=lambda p: p.stat().st_mtime)
                    with contextlib.suppress(OSError):
                        best.rename(path)
                        found = [f for f in found if f[1] != best]
                    break
        for _, p in found:
            remove(p)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path (ending in ``suffix``) next to ``path`` to write; it replaces ``path``
    when the block succeeds and is removed otherwise. A failed write is a :class:`WriteError`."""
    path = Path(path)
    clean_leftovers(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        yield Path(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        remove(Path(tmp))
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(e, path) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
                make: Callable[[], Any], keep: int = 0, fresh: bool = False) -> T:
    """``read(entry)`` for the entry stored under ``key`` in the JSON object at ``path``; where
    there is none (or ``read`` finds it malformed: KeyError, TypeError, ValueError), or with
    ``fresh``, ``make()``'s entry, stored there first. Under a lock, so that processes started
    together make it once and keep each other's entries; with ``keep``, only the latest
    ``keep`` entries stay. A file that cannot be read or written is measured over (or again
    next time)."""
    path = Path(path)
    with locked(path.with_suffix(".lock")):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        if key in saved:
            try:
                if not fresh:
                    return read(saved[key])
            except (KeyError, TypeError, ValueError):
                pass
            del saved[key]
        entry = make()
        saved[key] = entry
        if keep:
            saved = dict(list(saved.items())[-keep:])
        with contextlib.suppress(OSError):
            atomic_write_text(path, json.dumps(saved, indent=1) + "\n")
        return read(entry)
