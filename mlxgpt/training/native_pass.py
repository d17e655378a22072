"""Gradients from the native C pass (:mod:`mlxgpt.cpu.native`) for the training step on the CPU.

Where it applies (:func:`native_unsupported` says why not), :class:`mlxgpt.training.step.Stepper`
takes a step's loss sum, token count and gradient sum from one native forward + backward pass
over the step's micro-batches (the rows split over one thread per core) instead of MLX's graph,
and applies them with the same compiled clip + AdamW update. It applies to full-model training
of a float32 GPT with the language-model loss and no dropout, on the CPU: ``mlxgpt pretrain``
and full fine-tuning. LoRA, classifiers, quantized or frozen weights, dropout and GPUs train
through MLX's graph. ``MLXGPT_NATIVE_TRAINING=0`` turns it off, ``=1`` makes its absence an
error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..core.backend import on_cpu
from ..core.model import GPT
from ..cpu import native
from ..errors import MlxgptError
from .loss import lm_loss

NATIVE_ENV = "MLXGPT_NATIVE_TRAINING"  # 0: MLX's graph always; 1: the native pass or an error


def native_unsupported(model: nn.Module, loss_fn: Callable[..., Any]) -> str | None:
    """Why training ``model`` on ``loss_fn`` cannot use the native pass here (None: it can)."""
    setting = os.environ.get(NATIVE_ENV, "")
    if setting not in ("", "0", "1"):
        raise MlxgptError(f"{NATIVE_ENV} must be 0 or 1, not {setting!r}")
    if setting == "0":
        return f"{NATIVE_ENV}=0"
    reason = _reason(model, loss_fn)
    if reason and setting == "1":
        raise MlxgptError(f"{NATIVE_ENV}=1, but the native training pass cannot run: {reason}")
    return reason


def _reason(model: nn.Module, loss_fn: Callable[..., Any]) -> str | None:
    if not on_cpu():
        return "MLX computes on a GPU"
    if loss_fn is not lm_loss or type(model) is not GPT:
        return "it trains a plain GPT on the language-model loss only"
    cfg = model.config
    if cfg.dropout > 0:
        return "the model uses dropout"
    names = native.parameter_names(cfg.n_layer, cfg.tie_word_embeddings)
    params = dict(tree_flatten(model.parameters()))
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    if sorted(params) != sorted(names) or sorted(trainable) != sorted(names):
        return "the model has other or frozen parameters (LoRA, quantized layers)"
    if any(v.dtype != mx.float32 for v in params.values()):
        return "the weights are not float32"
    return native.build_error()


class NativeGradients:
    """One step's accumulator (loss sum, token count, gradient sum) from the native pass."""

    def __init__(self, model: GPT, workers: int):
        self.model = model
        self.net = native.NativeGPT(model.config, workers)

    def __call__(self, batches: Sequence[Sequence[mx.array]]) -> dict[str, Any]:
        # zero-copy views of the (evaluated) weights and batches
        params = {k: np.asarray(v) for k, v in tree_flatten(self.model.parameters())}
        host = [tuple(np.asarray(a) for a in b) for b in batches]
        loss, count, flat = self.net.run(params, host)
        grads = [(k, mx.array(v)) for k, v in self.net.unflatten(flat).items()]
        return {"loss": mx.array(loss, mx.float32), "n": mx.array(count, mx.float32),
                "grads": tree_unflatten(grads)}
