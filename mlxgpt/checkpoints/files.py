"""Files written safely and read with one-line errors.

Every write is atomic: a file or folder is built under a temporary name next to its destination
and renamed into place, so an interrupted or failed write never leaves half a result
(:mod:`mlxgpt.atomicio` has the names, the clean-up after killed writers and the umask). A
failed write is one line (:class:`~mlxgpt.atomicio.WriteError`). ``--force`` replaces only a
folder mlxgpt wrote, and no output may be one of the inputs (:func:`check_output`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..atomicio import (  # noqa: F401  (atomic_write_text is part of this module's interface)
    MARKER,
    WriteError,
    atomic_file,
    atomic_write_text,
    clean_leftovers,
    make_temp_dir,
    remove,
    swap_in,
    write_error,
)
from ..errors import MlxgptError

CHECKPOINT_STATE = "trainer_state.json"  # training/state.py's: a checkpoint folder


def output_path(out: str | os.PathLike) -> Path:
    """``out`` made absolute, so that "." or "model/" have a name to write next to."""
    path = Path(os.path.abspath(out))
    if not path.name:
        raise MlxgptError(f"cannot write a folder at {out}: choose a folder below it")
    return path


def check_apart(out: str | os.PathLike, inputs: Mapping[str, Any], out_label: str = "--out"
                ) -> None:
    """Refuse an output that is, holds, or lies inside one of ``inputs`` (label -> path; names
    that are no local path, such as hub ids, pass): writing it would destroy what is read."""
    target = Path(out).resolve()
    for label, source in inputs.items():
        if source is None or not Path(source).exists():
            continue
        src = Path(source).resolve()
        how = ("is" if src == target else "holds" if target in src.parents
               else "is inside" if src in target.parents else None)
        if how:
            raise MlxgptError(f"{out_label} {out} {how} {label} {source}: writing it would "
                              f"destroy what is read; choose another {out_label}")


def check_output(out: str | os.PathLike, *, force: bool = False,
                 inputs: Mapping[str, Any] | None = None, out_label: str = "--out") -> Path:
    """Check, before anything is read or written, that ``out`` may be written: it is new (or,
    with ``force``, a folder mlxgpt wrote) and apart from ``inputs``. Returns it absolute."""
    path = output_path(out)
    if (path.exists() or path.is_symlink()) and not force:
        raise MlxgptError(f"{out} already exists (use --force to replace it)")
    check_apart(out, inputs or {}, out_label)
    if path.exists() or path.is_symlink():
        why = not_replaceable(path)
        if why:
            raise MlxgptError(why)
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker mlxgpt leaves in the folders it writes, or None."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "mlxgpt" else None


def write_marker(folder: Path, **facts: Any) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "mlxgpt", **facts}) + "\n",
                                 encoding="utf-8")


def _older_mlxgpt_folder(folder: Path) -> bool:
    """A folder written before markers: a model folder (config.json with an "mlxgpt" section)
    or a training checkpoint."""
    if (folder / CHECKPOINT_STATE).is_file():
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("mlxgpt"), dict)


def named(entries: list[str], limit: int = 3) -> str:
    """A few names of a list, and how many more."""
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def not_replaceable(path: Path) -> str | None:
    """Why ``--force`` must not replace ``path`` (None: it may): only an empty folder or one
    mlxgpt wrote, holding nothing it did not write, is replaced."""
    hint = "--force replaces only a folder mlxgpt wrote: move it away or choose another output"
    if path.is_symlink() or not path.is_dir():
        what = "a symbolic link" if path.is_symlink() else "a file"
        return f"{path} is {what}, not a folder mlxgpt wrote; {hint}"
    try:
        entries = sorted(e.name for e in path.iterdir())
    except OSError as e:
        return f"{path}: cannot read it ({e.strerror or e})"
    marker = read_marker(path)
    if marker is None and entries and not _older_mlxgpt_folder(path):
        return f"{path} was not written by mlxgpt (it holds {named(entries)}); {hint}"
    listed = marker.get("entries") if marker else None
    foreign = ([e for e in entries if e not in listed and e != MARKER]
               if isinstance(listed, list) else [])
    if foreign:
        return (f"{path} holds {named(foreign)}, which mlxgpt did not write; move "
                f"{'them' if len(foreign) > 1 else 'it'} away or choose another output")
    return None


def mlx_write_failure(e: BaseException) -> bool:
    """MLX reports a failed save (a full disk, no permission) as a RuntimeError."""
    return isinstance(e, RuntimeError) and str(e).startswith(
        ("[write]", "[save"))


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block succeeds.

    An existing ``out_dir`` is refused unless ``force``; with ``force`` it is replaced only
    after the new folder is complete, and only if mlxgpt wrote it (:func:`not_replaceable`),
    so a failure never leaves a half-written result or costs the old one. A failed write is
    one line (:class:`WriteError`), with the temporary folder removed.
    """
    out = output_path(out_dir)
    clean_leftovers(out.parent, out.name)
    check_output(out_dir, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out)
    except OSError as e:
        raise write_error(e, out.parent) from None
    try:
        yield tmp
        # Written last: the folder is complete (what clean_leftovers looks for) and whose.
        write_marker(tmp, entries=sorted(os.listdir(tmp)))
        swap_in(tmp, out)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, WriteError):
            raise
        if isinstance(e, OSError) or mlx_write_failure(e):
            raise write_error(e, out) from None
        raise


def atomic_save_safetensors(
    path: str | os.PathLike, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> None:
    """``mx.save_safetensors`` through a temporary file and a rename."""
    with atomic_file(path, suffix=".safetensors") as tmp:  # MLX adds it where it is missing
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        except RuntimeError as e:
            if mlx_write_failure(e):
                raise write_error(e, path) from None
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
    except RecursionError:
        raise MlxgptError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MlxgptError(f"{path}: expected a JSON object")
    return data
