"""Training checkpoints: a folder with what ``save_weights`` writes, the optimizer state and
``trainer_state.json`` (step, best validation loss, tokens, time, settings, and the compute
setup: device, model kernels, BLAS library and kernels), written atomically
by rank 0; and reading one back for ``--resume``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.nn as nn
import mlx.optimizers as optim

from ..atomicio import clean_leftovers, make_temp_dir, remove, swap_in, write_error
from ..checkpoints.files import CHECKPOINT_STATE, atomic_dir, write_marker
from ..errors import MlxgptError
from .optim import OPTIMIZER_FILE, save_optimizer

STATE_FILE = CHECKPOINT_STATE
LAST_DIR = "last"


def write_checkpoint(folder: Path, model: nn.Module,
                     save_weights: Callable[[nn.Module, Path], None], meta: dict[str, Any],
                     opt: optim.Optimizer | None = None) -> Path:
    """Write a checkpoint folder (replacing an older one only once the new one is complete)."""
    with atomic_dir(folder, force=True) as tmp:
        save_weights(model, tmp)
        if opt is not None:
            save_optimizer(opt, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The resume information of a checkpoint folder, or a one-line error saying what is wrong."""
    path = folder / STATE_FILE
    if not folder.is_dir():
        raise MlxgptError(f"cannot resume: no checkpoint at {folder}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlxgptError(f"cannot resume: {path} not found (not a training checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"cannot resume: {path} is corrupt ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise MlxgptError(f"cannot resume: {path} is corrupt (no step)")
    if not (folder / OPTIMIZER_FILE).is_file():
        raise MlxgptError(f"cannot resume: {folder / OPTIMIZER_FILE} not found")
    return state


def has_checkpoint(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a checkpoint to resume from."""
    return (run_dir / LAST_DIR / STATE_FILE).is_file()


def recover_run(out: Path) -> None:
    """Undo what killed writers left in and next to a run folder: temporaries are removed,
    and a checkpoint caught between the two renames of its replacement is put back."""
    clean_leftovers(out.parent, out.name)
    clean_leftovers(out)


@contextlib.contextmanager
def run_folder(out: Path, *, resume: bool = False, replace: bool = False,
               write: bool = True) -> Iterator[Path]:
    """The folder a training run writes, and what becomes of it when the run ends.

    A resumed run (or ``write`` False: ranks other than 0) writes OUT itself and leaves it as
    it is. A new run writes OUT (made, and marked as mlxgpt's when it was new or empty); one
    that fails before its first checkpoint leaves nothing behind. With ``replace`` (``--force``
    over an old run) it writes a temporary folder next to OUT that replaces OUT when the run
    ends (finished, or stopped by Ctrl-C with a checkpoint to resume); a run that fails, or
    is killed, leaves the old one as it was.
    """
    if resume or not write:
        yield out
        return
    try:
        if replace:
            folder = make_temp_dir(out)
        else:
            before = {e.name for e in out.iterdir()} if out.is_dir() else None
            out.mkdir(parents=True, exist_ok=True)
            folder = out
            if not before:  # all in it is the run's: a killed run is still known as mlxgpt's
                write_marker(out, run=True)
    except OSError as e:
        raise write_error(e, out) from None
    try:
        yield folder
    except BaseException:
        if replace:
            remove(folder)
        elif not has_checkpoint(out):  # nothing to resume: the run leaves no trace
            if before is None:
                remove(out)
            else:  # what was there before the run stays
                for entry in list(out.iterdir()):
                    if entry.name not in before:
                        remove(entry)
        raise
    if replace:
        _publish_run(folder, out)


def _publish_run(folder: Path, out: Path) -> None:
    try:
        write_marker(folder, run=True)
        swap_in(folder, out)
    except OSError as e:
        remove(folder)
        raise write_error(e, out) from None
