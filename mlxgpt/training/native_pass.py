"""The native C pass (:mod:`mlxgpt.cpu.native`) as the training step on the CPU.

Where it applies (:func:`native_unsupported` says why not), :class:`mlxgpt.training.step.Stepper`
takes a step's loss sum, token count and gradient sum from one native forward + backward pass
over the step's micro-batches (the rows split over one thread per core) instead of MLX's graph,
and applies them with the native clip + AdamW update (:class:`NativeUpdate`; MLX's compiled
update for another optimizer); :class:`~mlxgpt.training.step.Evaluator` takes the pass's
forward. It applies to full-model training
of a float32 GPT with the language-model loss, on the CPU: ``mlxgpt pretrain`` and full
fine-tuning (dropout masks come from the C code's own counter-based hash, seeded from MLX's
random state). LoRA, classifiers, quantized or frozen weights and GPUs train through MLX's
graph. Which pass a run takes is :class:`TrainConfig`'s ``train_pass`` (``mlxgpt pretrain`` and
``finetune --train-pass auto|native|mlx``), decided once by :func:`choose_train_pass`: ``auto``
the native pass where it applies (``MLXGPT_NATIVE_TRAINING`` may make ``auto`` mean ``mlx``, 0,
or ``native``, 1), ``native`` it or an error saying why not, ``mlx`` MLX's graph always.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..core.backend import NATIVE_ENV, Backend
from ..core.backend import backend as current_backend
from ..core.gpt2 import GPT, Block
from ..cpu import native
from ..errors import MlxgptError
from .config import TRAIN_PASSES
from .loss import lm_loss
from .optim import GPTAdamW

# what the native pass needs, said when it is chosen (the reasons below say what is missing)
NATIVE_NEEDS = "CPU, float32 GPT-2, C library built"


@dataclass(frozen=True)
class TrainPass:
    """The pass a run trains with ("native" or "mlx", as checkpoints record it) and why."""

    name: str
    why: str

    def line(self) -> str:
        """What a run prints: ``training pass: native (CPU, float32 GPT-2, ...)``."""
        shown = "native" if self.name == "native" else "MLX's graph"
        return f"training pass: {shown} ({self.why})"


def choose_train_pass(model: nn.Module, loss_fn: Callable[..., Any], requested: str = "auto",
                      *, training: bool = True, backend: Backend | None = None) -> TrainPass:
    """The pass that trains ``model`` on ``loss_fn`` (with ``training`` False: evaluates that
    loss) for ``requested`` (auto, native or mlx) on ``backend`` (default: the default device's
    record). ``native`` where the pass cannot run is an error when training; evaluation then
    takes MLX's graph."""
    if requested not in TRAIN_PASSES:
        raise MlxgptError(f"train-pass must be {', '.join(TRAIN_PASSES)}, not {requested!r}")
    setting = os.environ.get(NATIVE_ENV, "")
    if setting not in ("", "0", "1"):
        raise MlxgptError(f"{NATIVE_ENV} must be 0 or 1, not {setting!r}")
    source = f"--train-pass {requested}"
    if requested == "auto" and setting:  # the variable only says what auto means
        requested, source = ("native" if setting == "1" else "mlx"), f"{NATIVE_ENV}={setting}"
    if requested == "mlx":
        return TrainPass("mlx", source)
    reason = _reason(model, loss_fn, training, backend or current_backend())
    if reason is None:
        return TrainPass("native", NATIVE_NEEDS + (f"; {source}" if requested == "native"
                                                   else ""))
    if requested == "native" and training:
        raise MlxgptError(f"{source}, but the native training pass cannot run: {reason}")
    return TrainPass("mlx", reason)


def native_unsupported(model: nn.Module, loss_fn: Callable[..., Any], *,
                       training: bool = True, requested: str = "auto",
                       backend: Backend | None = None) -> str | None:
    """Why :func:`choose_train_pass` takes MLX's graph (None: it takes the native pass)."""
    chosen = choose_train_pass(model, loss_fn, requested, training=training, backend=backend)
    return None if chosen.name == "native" else chosen.why


_ONLY = "the native pass trains every weight of a plain float32 GPT-2 only"


def _reason(model: nn.Module, loss_fn: Callable[..., Any], training: bool,
            backend: Backend) -> str | None:
    if not backend.on_cpu:
        return backend.native_error  # the device rules it out before the model is looked at
    if type(model) is not GPT:
        return (f"a {type(model).__name__} model: the native pass trains a plain GPT-2 on the "
                f"language-model loss only")
    if loss_fn is not lm_loss:
        return "another loss: the native pass trains a plain GPT-2 on the language-model loss only"
    if any(type(block) is not Block for block in model.h):
        return ("the blocks recompute their activations (--grad-checkpoint), which the native "
                "pass does not")
    cfg = model.config
    names = native.parameter_names(cfg.n_layer, cfg.tie_word_embeddings)
    params = dict(tree_flatten(model.parameters()))
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    if sorted(params) != sorted(names):
        extra = " ".join(sorted(set(params) - set(names)))
        kind = ("LoRA adapters" if "lora" in extra else
                "quantized weights" if "scales" in extra else "other parameters than GPT-2's")
        return f"{kind}: {_ONLY}"
    if training and sorted(trainable) != sorted(names):
        return f"frozen weights: {_ONLY}"
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for v in params.values()
                     if v.dtype != mx.float32})
    if dtypes:
        return f"{'/'.join(dtypes)} weights: {_ONLY}"
    return backend.native_error


def _slot(tree: Any, name: str) -> tuple[Any, str]:
    """The container holding ``name`` ("h.0.ln_1.weight") in a tree of dicts and lists (a
    module, an optimizer state) and its key there."""
    *path, key = name.split(".")
    for part in path:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree, key


class NativeGradients:
    """One step's loss sum, token count and gradient sum from the native pass."""

    def __init__(self, model: GPT, workers: int):
        self.model = model
        self.net = native.NativeGPT(model.config, workers)
        self.slots = [_slot(model, n) for n in self.net.names]  # where each weight lives

    def host_bytes(self) -> int:
        """Memory the pass holds outside MLX (activations and gradients, all workers)."""
        return self.net.host_bytes()

    def weights(self) -> list[mx.array]:
        """The model's weights in the native pass's order."""
        return [holder[key] for holder, key in self.slots]

    def sums(self, batches: Sequence[Sequence[mx.array]],
             grads: bool = True) -> tuple[float, float, np.ndarray | None]:
        """(loss sum, token count, flat gradient sum or None) over this process's
        ``batches``."""
        # zero-copy views of the (evaluated) weights and batches
        params = dict(zip(self.net.names, map(np.asarray, self.weights()), strict=True))
        host = [tuple(np.asarray(a) for a in b) for b in batches]
        rate = self.model.config.dropout if grads and self.model.training else 0.0
        # masks from MLX's random state, which the training loop seeds per step (exact resume)
        seed = mx.random.randint(0, 2**31 - 1, ()).item() if rate > 0 else 0
        return self.net.run(params, host, grads, dropout=rate, seed=seed)

    def __call__(self, batches: Sequence[Sequence[mx.array]]) -> dict[str, Any]:
        """The sums as the accumulator MLX's compiled update takes."""
        loss, count, flat = self.sums(batches)
        grads = [(k, mx.array(v)) for k, v in self.net.unflatten(flat).items()]
        return {"loss": mx.array(loss, mx.float32), "n": mx.array(count, mx.float32),
                "grads": tree_unflatten(grads)}


class NativeUpdate:
    """:class:`~mlxgpt.training.optim.GPTAdamW`'s update with gradient clipping, in one C call
    (:class:`mlxgpt.cpu.native.NativeAdamW`) instead of MLX's ~15 operations per tensor.

    The model's weights and the optimizer's state stay MLX arrays, replaced each step as MLX's
    update replaces them (new arrays from the C call's results), so checkpoints, evaluation and
    a resume through MLX's update see the same state."""

    def __init__(self, grads: NativeGradients, opt: GPTAdamW, clip: float,
                 group: mx.distributed.Group):
        self.grads, self.opt, self.clip, self.group = grads, opt, clip, group
        net = grads.net
        # make_optimizer's filter: 1-D parameters go to optimizers[0] (no decay)
        self.sub = [0 if len(s) < 2 else 1 for s in net.shapes.values()]
        self.adamw = native.NativeAdamW(net.sizes, [k == 1 for k in self.sub])
        # the new weights, m and v: views of the C call's output, one per tensor
        self.out = [list(net.unflatten(row).values()) for row in self.adamw.out]
        self._names = net.names
        self._states: list[Any] = []
        self._moments: list[dict[str, mx.array]] = []

    def moments(self) -> list[dict[str, mx.array]]:
        """Each tensor's {"m", "v"} in the optimizer's state (found again when that state was
        replaced, as loading a checkpoint's optimizer state does)."""
        states = [o.state for o in self.opt.optimizers]
        if [id(s) for s in states] != [id(s) for s in self._states]:
            self._states = states
            self._moments = [holder[key] for holder, key in
                             (_slot(states[k], n) for n, k in zip(self._names, self.sub,
                                                                   strict=True))]
        return self._moments

    def __call__(self, loss: float, count: float,
                 grad_sum: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
        if self.group.size() > 1:  # one all-sum of everything the ranks add up
            vec = mx.distributed.all_sum(mx.array(np.append(grad_sum, [loss, count])),
                                         group=self.group)
            summed = np.array(vec)
            grad_sum, loss, count = summed[:-2], float(summed[-2]), float(summed[-1])
        decay = self.opt.optimizers[1]
        step = decay.state["step"]
        lr = self.opt.schedule(step)
        moments = self.moments()
        norm = self.adamw.step(
            [np.asarray(w) for w in self.grads.weights()], [np.asarray(m["m"]) for m in moments],
            [np.asarray(m["v"]) for m in moments], grad_sum, count, clip=self.clip,
            lr=lr.item(), weight_decay=decay.weight_decay, betas=tuple(decay.betas),
            eps=decay.eps, t=int(step.item()) + 1)
        for (holder, key), w in zip(self.grads.slots, self.out[0], strict=True):
            holder[key] = mx.array(w)
        for node, m, v in zip(moments, self.out[1], self.out[2], strict=True):
            node["m"], node["v"] = mx.array(m), mx.array(v)
        for sub in self.opt.optimizers:
            sub.state["step"] = step + 1
            sub.state["learning_rate"] = lr
        n = max(count, 1.0)
        return mx.array(loss / n, mx.float32), mx.array(count, mx.float32), mx.array(norm)


def native_update_for(grads: NativeGradients, opt: Any, clip: float,
                      group: mx.distributed.Group) -> NativeUpdate | None:
    """The native update where ``opt`` is :class:`GPTAdamW` (else MLX's compiled one)."""
    return NativeUpdate(grads, opt, clip, group) if type(opt) is GPTAdamW else None
