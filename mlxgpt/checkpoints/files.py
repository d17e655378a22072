"""Files written safely and read with one-line errors.

Every write is atomic: a file or folder is built under a temporary name next to its destination
and renamed into place, so an interrupted or failed write never leaves half a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..atomicio import atomic_write_text  # noqa: F401  (part of this module's interface)
from ..errors import MlxgptError


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is refused unless ``force``; with ``force`` it is replaced only
    after the new folder is complete, so a failure never leaves a half-written result.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise MlxgptError(f"{out} already exists (use --force to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise MlxgptError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_safetensors(
    path: str | os.PathLike, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    """``mx.save_safetensors`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, not after minutes of work, when ``folder`` cannot be written; a folder this
    creates for the probe is removed again."""
    out = Path(folder)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
        if created:
            out.rmdir()
    except OSError as e:
        raise MlxgptError(f"cannot write to {out}: {e.strerror or e}") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlxgptError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MlxgptError(f"{path}: expected a JSON object")
    return data
