"""The optimizer: AdamW with warmup and cosine decay, and its state on disk (for resume)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxgptError
from .config import TrainConfig

OPTIMIZER_FILE = "optimizer.safetensors"


def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr`` at ``steps``.

    Written with array ops so it runs inside the compiled step (``step`` is the optimizer's
    update count before this update, as MLX optimizers pass it).
    """
    lr, min_lr, warmup = cfg.lr, cfg.min_lr, cfg.warmup
    decay = max(1, cfg.steps - warmup)

    def schedule(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = lr * (s + 1) / (warmup + 1)
        ratio = mx.clip((s - warmup) / decay, 0.0, 1.0)
        cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + mx.cos(math.pi * ratio))
        return mx.where(s < warmup, warm, cos)

    return schedule


class GPTAdamW(optim.MultiOptimizer):
    """AdamW (bias-corrected, like PyTorch's) on :func:`lr_schedule`; no weight decay on
    biases, norms and other 1-D parameters (``optimizers[0]``), ``cfg.weight_decay`` on the rest
    (``optimizers[1]``). Keeps the config it was made from, so that another implementation of
    the same update (:mod:`mlxgpt.training.native_pass`) can take over its state."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.schedule = lr_schedule(cfg)
        betas = [cfg.beta1, cfg.beta2]
        no_decay = optim.AdamW(self.schedule, betas=betas, weight_decay=0.0, bias_correction=True)
        decay = optim.AdamW(self.schedule, betas=betas, weight_decay=cfg.weight_decay,
                            bias_correction=True)
        super().__init__([no_decay, decay], filters=[lambda path, p: p.ndim < 2])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The training optimizer: :class:`GPTAdamW`."""
    return GPTAdamW(cfg)


def save_optimizer(opt: optim.Optimizer, path: Path) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(opt.state)))


def load_optimizer(opt: optim.Optimizer, path: Path) -> None:
    """Restore optimizer state saved by :func:`save_optimizer` into ``opt`` (initialised)."""
    try:
        saved = mx.load(str(path))
    except Exception as e:
        raise MlxgptError(f"{path}: cannot read optimizer state ({e})") from None
    current = dict(tree_flatten(opt.state))
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in saved):
        raise MlxgptError(f"{path}: optimizer state does not match the model being trained")
    opt.state = tree_unflatten(list(saved.items()))
