"""The compiled training step, and evaluation of a loss over batches.

:class:`Stepper` builds, for one model and optimizer, the functions one optimizer update runs:
with one micro-batch on one process and one stream, loss, gradients, clipping and the AdamW
update are one compiled function; otherwise a compiled micro-step accumulates token-weighted
gradients and a compiled update sums them (across streams and ranks) and applies them. On the
CPU each micro-batch's rows are split over one stream per core (:mod:`mlxgpt.cpu.parallel`), or,
where it applies, the gradients come from one native C pass (:mod:`.native_pass`).
:class:`Evaluator` gives the token-weighted mean loss over any batches (the training loop's
validation and ``mlxgpt eval`` alike), split over the same streams (or by the native pass's
forward where it applies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..core.backend import Backend, keep_freed_buffers
from ..core.backend import backend as current_backend
from ..cpu import parallel
from ..cpu.blas import training_threads
from ..cpu.parallel import new_streams, on_streams, split_rows
from .config import TrainConfig
from .distributed import Batch, all_sum_tree, shard, world
from .native_pass import NativeGradients, TrainPass, choose_train_pass, native_update_for

# MLX reads its breadth-first width once, at its first evaluation: training code is imported
# before a run builds (and evaluates) its model, so this is where the CPU streams' setting goes.
parallel.configure()

LossFn = Callable[..., tuple[mx.array, mx.array]]  # (model, *batch) -> (mean loss, n tokens)


class Stepper:
    """The compiled functions of one optimizer update, for one model and optimizer.

    Fast path (grad_accum 1, one process, one stream): loss, gradients, clipping and the AdamW
    update in one compiled function. Native path (the CPU, where :mod:`.native_pass` applies):
    the loss and gradient sums from one C pass, then the AdamW update in C too (for
    :class:`~.optim.GPTAdamW`; another optimizer: the compiled update). Otherwise: a compiled
    micro-step per stream that accumulates the gradient of its rows' summed loss (``n * grad``:
    the loss is scaled before differentiating, so no pass scales the gradients), and a compiled
    update that sums the streams' accumulators, all-sums across ranks and divides by the token
    count.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, opt: optim.Optimizer,
                 cfg: TrainConfig, group: mx.distributed.Group,
                 train_pass: TrainPass | None = None, backend: Backend | None = None):
        """``train_pass``: the one the run chose (else chosen here from ``cfg.train_pass``);
        ``backend``: the device's record (default: the default device's)."""
        self.model, self.opt, self.cfg, self.group = model, opt, cfg, group
        backend = backend or current_backend()
        self.train_pass = train_pass or choose_train_pass(model, loss_fn, cfg.train_pass,
                                                          backend=backend)
        workers = backend.cpu_streams(group.size())
        self.native = (NativeGradients(model, workers) if self.train_pass.name == "native"
                       else None)
        self.native_update = (None if self.native is None else native_update_for(
            self.native, opt, cfg.grad_clip, group))
        self.streams = new_streams(workers) if self.native is None else []
        self.split = workers > 1
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

        def summed_loss(m: nn.Module, *batch: mx.array) -> tuple[mx.array, mx.array]:
            loss, n = loss_fn(m, *batch)
            n = n.astype(mx.float32)
            return loss * n, n  # gradients come out token-weighted: no pass to scale them

        sum_grad = nn.value_and_grad(model, summed_loss)

        def weighted(*batch: mx.array) -> dict[str, Any]:
            """One micro-batch's loss sum, token count and gradient of the loss sum."""
            (loss, n), grads = sum_grad(model, *batch)
            return {"loss": loss, "n": n, "grads": grads}

        def micro(acc: dict[str, Any], *batch: mx.array) -> dict[str, Any]:
            return tree_map(mx.add, acc, weighted(*batch))

        def apply(*accs: dict[str, Any]) -> tuple[mx.array, mx.array, mx.array]:
            acc = tree_map(lambda *a: sum(a[1:], a[0]), *accs)
            acc = all_sum_tree(acc, group)
            n = mx.maximum(acc["n"], 1.0)
            grads = tree_map(lambda g: g / n, acc["grads"])
            return acc["loss"] / n, acc["n"], update(grads)

        wrap = partial(mx.compile, inputs=self.state, outputs=self.state) if cfg.compile else None
        self.fast = (cfg.grad_accum == 1 and group.size() == 1 and not self.streams
                     and self.native is None)
        self._fused = wrap(fused) if wrap else fused
        micros = on_streams(micro, self.streams)
        self._micros = [wrap(m) for m in micros] if wrap else micros
        # a stream's first micro-batch starts its accumulator: no zeros to add to
        starts = on_streams(weighted, self.streams)
        self._starts = [wrap(f) for f in starts] if wrap else starts
        self._apply = wrap(apply) if wrap else apply

    def step(self, batches: Sequence[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        """One optimizer update over this rank's shards of ``grad_accum`` micro-batches.

        Returns (mean loss, tokens, gradient norm before clipping), all ranks together,
        evaluated, with the model and optimizer state.
        """
        with training_threads(self.split):
            if self.native_update is not None:
                out = self.native_update(*self.native.sums(batches))
            else:
                out = self._fused(*batches[0]) if self.fast else self._accumulate(batches)
            mx.eval(out, self.state)
        return out

    def host_bytes(self) -> int:
        """Memory a step holds outside MLX's allocator (the native pass's buffers)."""
        extra = self.native.host_bytes() if self.native is not None else 0
        if self.native_update is not None:
            extra += self.native_update.adamw.out.nbytes
        return extra

    def _accumulate(self, batches: Sequence[Batch]) -> tuple[mx.array, mx.array, mx.array]:
        return self._apply(*self.accumulators(batches))

    def accumulators(self, batches: Sequence[Batch]) -> list[dict[str, Any]]:
        """Each stream's loss sum, token count and gradient sum over its rows of ``batches``,
        lazy: the step up to the update (``tools/bench_train.py --profile`` times it alone).
        The native pass gives one, computed already."""
        if self.native is not None:
            return [self.native(batches)]
        accs: list[dict[str, Any]] = []
        for b in batches:
            for j, rows in enumerate(split_rows(b, len(self._micros))):
                if j == len(accs):
                    accs.append(self._starts[j](*rows))
                else:
                    accs[j] = self._micros[j](accs[j], *rows)
        return accs


class Evaluator:
    """Token-weighted mean loss of ``loss_fn`` over batches, every rank's shard together."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, compile: bool = True,
                 group: mx.distributed.Group | None = None,
                 native: NativeGradients | None = None, train_pass: str = "auto",
                 backend: Backend | None = None):
        """``native``: a training Stepper's pass, to share its buffers (else one of its own
        where ``train_pass``, auto, native or mlx, takes it); ``backend`` as for Stepper."""
        self.group = group or world()
        backend = backend or current_backend()
        workers = backend.cpu_streams(self.group.size())
        self.split = workers > 1
        if native is None and choose_train_pass(model, loss_fn, train_pass, training=False,
                                                backend=backend).name == "native":
            native = NativeGradients(model, workers)
        self.native = native
        self.streams = new_streams(workers) if self.native is None else []

        def loss_sum(*batch: mx.array) -> mx.array:
            loss, n = loss_fn(model, *batch)
            n = n.astype(mx.float32)
            return mx.stack([loss * n, n])

        fns = on_streams(loss_sum, self.streams)
        self._loss_sums = [mx.compile(f, inputs=model.state) for f in fns] if compile else fns

    def __call__(self, batches: Iterable[Batch]) -> tuple[float, int]:
        """(mean loss, tokens counted) over ``batches`` (global batches; each rank its rows)."""
        total = mx.zeros((2,))
        with training_threads(self.split):
            for batch in batches:
                if self.native is not None:
                    loss, n, _ = self.native.sums([shard(batch, self.group)], grads=False)
                    total = total + mx.array([loss, n])
                    continue
                parts = split_rows(shard(batch, self.group), len(self._loss_sums))
                sums = [f(*rows) for f, rows in zip(self._loss_sums, parts, strict=False)]
                total = total + sum(sums[1:], sums[0])
                mx.eval(total)
        loss_sum, n = all_sum_tree(total, self.group).tolist()
        return loss_sum / max(n, 1.0), int(n)
