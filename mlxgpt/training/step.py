"""The compiled training step, and evaluation of a loss over batches.

:class:`Stepper` builds, for one model and optimizer, the functions one optimizer update runs:
with one micro-batch on one process, loss, gradients, clipping and the AdamW update are one
compiled function; otherwise a compiled micro-step accumulates token-weighted gradients and a
compiled update all-sums them across ranks. :class:`Evaluator` gives the token-weighted mean
loss over any batches (the training loop's validation and ``mlxgpt eval`` alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..core.backend import keep_freed_buffers
from .config import TrainConfig
from .distributed import Batch, all_sum_tree, shard, world

LossFn = Callable[..., tuple[mx.array, mx.array]]  # (model, *batch) -> (mean loss, n tokens)


class Stepper:
    """The compiled functions of one optimizer update, for one model and optimizer.

    Fast path (grad_accum 1, one process): loss, gradients, clipping and the AdamW update in
    one compiled function. Otherwise: a compiled micro-step that accumulates ``n * grad`` and a
    compiled update that all-sums across ranks and divides by the token count.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, opt: optim.Optimizer,
                 cfg: TrainConfig, group: mx.distributed.Group):
        self.model, self.opt, self.cfg, self.group = model, opt, cfg, group
        keep_freed_buffers()
        self.state = [model.state, opt.state, mx.random.state]
        value_grad = nn.value_and_grad(model, loss_fn)
        clip = cfg.grad_clip

        def update(grads: Any) -> mx.array:
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.sqrt(sum(mx.sum(g * g) for _, g in tree_flatten(grads)))
            opt.update(model, grads)
            return norm

        def fused(*batch: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            (loss, n), grads = value_grad(model, *batch)
            return loss, n.astype(mx.float32), update(grads)

        def micro(acc: dict[str, Any], *batch: mx.array) -> dict[str, Any]:
            (loss, n), grads = value_grad(model, *batch)
            n = n.astype(mx.float32)
            return {
                "loss": acc["loss"] + loss * n,
                "n": acc["n"] + n,
                "grads": tree_map(lambda a, g: a + g * n, acc["grads"], grads),
            }

        def apply(acc: dict[str, Any]) -> tuple[mx.array, mx.array, mx.array]:
            acc = all_sum_tree(acc, group)
            n = mx.maximum(acc["n"], 1.0)
            grads = tree_map(lambda g: g / n, acc["grads"])
            return acc["loss"] / n, acc["n"], update(grads)

        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if cfg.compile else None
        self.fast = cfg.grad_accum == 1 and group.size() == 1
        self._fused = wrap(fused) if wrap else fused
        self._micro = wrap(micro) if wrap else micro
        self._apply = wrap(apply) if wrap else apply

    def step(self, batches: Sequence[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        """One optimizer update over this rank's shards of ``grad_accum`` micro-batches.

        Returns (mean loss, tokens, gradient norm before clipping), all ranks together.
        """
        if self.fast:
            return self._fused(*batches[0])
        zeros = tree_map(mx.zeros_like, self.model.trainable_parameters())
        acc = {"loss": mx.array(0.0), "n": mx.array(0.0), "grads": zeros}
        for b in batches:
            acc = self._micro(acc, *b)
        return self._apply(acc)


class Evaluator:
    """Token-weighted mean loss of ``loss_fn`` over batches, every rank's shard together."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, compile: bool = True,
                 group: mx.distributed.Group | None = None):
        self.group = group or world()

        def loss_sum(*batch: mx.array) -> mx.array:
            loss, n = loss_fn(model, *batch)
            n = n.astype(mx.float32)
            return mx.stack([loss * n, n])

        self._loss_sum = mx.compile(loss_sum, inputs=model.state) if compile else loss_sum

    def __call__(self, batches: Iterable[Batch]) -> tuple[float, int]:
        """(mean loss, tokens counted) over ``batches`` (global batches; each rank its rows)."""
        total = mx.zeros((2,))
        for batch in batches:
            total = total + self._loss_sum(*shard(batch, self.group))
            mx.eval(total)
        loss_sum, n = all_sum_tree(total, self.group).tolist()
        return loss_sum / max(n, 1.0), int(n)
