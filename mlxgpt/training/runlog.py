"""A run's record: ``log.jsonl`` (one JSON object per logged step or evaluation) and its loss
curve, ``loss.png`` (when matplotlib is installed: ``pip install 'mlxgpt[plot]'``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoints.files import atomic_file, atomic_write_text

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


class JsonlLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(path, "")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if _record_step(line) is not None and _record_step(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(log_path: Path, out_path: Path, title: str = "") -> str | None:
    """Write the loss curve PNG (train + val vs step). Returns a note when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install 'mlxgpt[plot]')"
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return "no losses logged: no loss plot"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], lw=1, alpha=0.8, label="train")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=3, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        # a failed save (a full disk) leaves no temporary behind, and is one line
        with atomic_file(out_path, suffix=".png") as tmp:  # the suffix picks the format
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return None
