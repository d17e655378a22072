"""Training settings and what a run reports back."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..checks import check_bool, check_int, check_number, check_seed
from ..errors import MlxgptError

TRAIN_PASSES = ("auto", "native", "mlx")  # TrainConfig.train_pass


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` counts optimizer updates (each ``grad_accum`` batches)."""

    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here at the last step
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay, on weights with 2+ dimensions only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1
    eval_every: int = 250  # 0: evaluate at the end only
    eval_batches: int = 20
    save_every: int = 0  # 0: save "last" at every evaluation
    log_every: int = 10
    seed: int = 1337
    compile: bool = True
    # auto: the native C pass where it applies, else MLX's graph; native: it or an error; mlx
    # (see mlxgpt/training/native_pass.py). Checkpoints record the pass taken (compute.train_pass)
    train_pass: str = "auto"

    def __post_init__(self) -> None:
        # Types first (a config file's "100" is a string), each with its range, named as the
        # options are; then how the values relate.
        for name in ("steps", "grad_accum", "eval_batches", "log_every"):
            check_int(getattr(self, name), _option(name), 1)
        for name in ("warmup", "eval_every", "save_every"):
            check_int(getattr(self, name), _option(name), 0)
        check_seed(self.seed, "seed")
        check_number(self.lr, "lr", 0, above=True)
        for name in ("min_lr", "weight_decay", "grad_clip"):
            check_number(getattr(self, name), _option(name), 0)
        for name in ("beta1", "beta2"):
            check_number(getattr(self, name), name, 0, 1)
        check_bool(self.compile, "compile")
        if self.train_pass not in TRAIN_PASSES:
            raise MlxgptError(f"train-pass must be {', '.join(TRAIN_PASSES)}, not "
                              f"{self.train_pass!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise MlxgptError(f"need 0 <= min-lr <= lr and lr > 0 (lr={self.lr}, "
                              f"min-lr={self.min_lr})")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise MlxgptError("weight-decay and grad-clip must not be negative")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _option(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainResult:
    step: int  # optimizer steps done (including those before a resume)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss) this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float | None = None
    tokens: int = 0  # tokens trained on, all ranks, including before a resume
    elapsed: float = 0.0  # seconds of training, including before a resume
    interrupted: bool = False
    # bytes held at most during a training step (this run): MLX's peak plus the native pass's
    # buffers outside MLX
    peak_memory: int = 0
    checkpoint: Path | None = None  # the last checkpoint written
