"""Training checkpoints: a folder with what ``save_weights`` writes, the optimizer state and
``trainer_state.json`` (step, best validation loss, tokens, time, settings, and the compute
setup: device, model kernels, BLAS library and kernels), written atomically
by rank 0; and reading one back for ``--resume``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.nn as nn
import mlx.optimizers as optim

from ..checkpoints.files import atomic_dir
from ..errors import MlxgptError
from .optim import OPTIMIZER_FILE, save_optimizer

STATE_FILE = "trainer_state.json"


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
