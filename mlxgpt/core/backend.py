"""Everything that depends on the device MLX runs on, decided here and nowhere else.

- :class:`Kernels`: the few functions whose fastest form differs by backend. A GPU (Metal,
  CUDA) runs MLX's fused ``mx.fast.scaled_dot_product_attention`` and its own ``tanh``/``exp``.
  MLX's CPU backend evaluates ``exp``/``tanh`` element by element through libm, so the
  arithmetic-only kernels of :mod:`mlxgpt.cpu.fastmath` are usually faster there; which set the
  CPU runs faster is measured once per process (a few milliseconds, :func:`cpu_kernels`), or
  named by ``MLXGPT_KERNELS=fused|arithmetic``. A model takes its set when it is built
  (:func:`kernels_for`), like nanoGPT's ``self.flash``.
- :func:`default_dtype`: float32 on the CPU (no fast half-precision matmul there), float16 on a GPU.
- :func:`prepare_for_inference`: on the CPU, a weight layout that suits single-row matmuls.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cpu import fastmath
from ..errors import MlxgptError

KERNELS_ENV = "MLXGPT_KERNELS"


@dataclass(frozen=True)
class Kernels:
    """The backend-dependent functions of the model and its loss."""

    name: str
    # (q (B, H, T, D), k, v (B, H, S, D), scale, mask) -> (B, H, T, D); mask: None, "causal"
    # (query i sees keys up to i + S - T) or a boolean array broadcastable to (B, H, T, S)
    attention: Callable[..., mx.array]
    gelu_tanh: Callable[[mx.array], mx.array]  # GPT-2's GELU (Hugging Face "gelu_new")
    exp: Callable[[mx.array], mx.array]  # the loss's log-sum-exp and softmax
    silu: Callable[[mx.array], mx.array]  # Llama's SwiGLU gate


def _sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def gelu_tanh(x: mx.array) -> mx.array:
    """GPT-2's GELU, written out as the reference computes it."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


FUSED = Kernels("fused", _sdpa, gelu_tanh, mx.exp, nn.silu)
ARITHMETIC = Kernels("arithmetic", fastmath.attention, fastmath.gelu_tanh, fastmath.exp,
                     fastmath.silu)


def on_cpu(device: mx.Device | None = None) -> bool:
    return (device or mx.default_device()) == mx.cpu


def kernels_for(device: mx.Device | None = None) -> Kernels:
    """The kernels for ``device`` (default: MLX's default device)."""
    return cpu_kernels() if on_cpu(device) else FUSED


@functools.cache
def cpu_kernels() -> Kernels:
    """The faster kernel set on this CPU (or the one ``MLXGPT_KERNELS`` names).

    Times a softmax plus GELU over (16, 4096) floats, compiled, with each set (best of 3,
    interleaved). Measured here (Intel Xeon, MLX 0.32.4): fused 9.1 ms, arithmetic 2.8 ms at
    (64, 4096).
    """
    forced = os.environ.get(KERNELS_ENV)
    if forced:
        named = {k.name: k for k in (FUSED, ARITHMETIC)}
        if forced not in named:
            raise MlxgptError(f"{KERNELS_ENV}={forced!r}: choose {' or '.join(named)}")
        return named[forced]
    return min((FUSED, ARITHMETIC), key=_kernel_seconds().__getitem__)


@functools.cache
def _kernel_seconds() -> dict[Kernels, float]:
    """CPU seconds each kernel set takes for the calibration job (see :func:`cpu_kernels`).

    Process CPU time, not wall time: on a busy machine (the ranks of an ``mlx.launch`` run
    calibrating side by side, a resumed run starting under load) a descheduled measurement
    could flip the choice, and processes that train one model would round differently."""
    with mx.stream(mx.cpu):
        x = mx.random.normal((16, 4096), key=mx.random.key(0))
        jobs = {k: mx.compile(lambda a, k=k: _softmax(k, a) + k.gelu_tanh(a))
                for k in (FUSED, ARITHMETIC)}
        best = dict.fromkeys(jobs, math.inf)
        for rep in range(5):
            for k, job in jobs.items():
                t = time.process_time()
                mx.eval(job(x))
                if rep >= 2:  # the first two compile and warm up
                    best[k] = min(best[k], time.process_time() - t)
    return best


def kernels_report() -> str:
    """Which kernel set models get on this device, and why (for ``mlxgpt info``)."""
    if not on_cpu():
        return f"{FUSED.name} (GPU)"
    chosen = cpu_kernels()
    if os.environ.get(KERNELS_ENV):
        return f"{chosen.name} (set by {KERNELS_ENV})"
    t = _kernel_seconds()
    return (f"{chosen.name} (measured on this CPU, softmax + GELU, CPU time: arithmetic "
            f"{t[ARITHMETIC] * 1e3:.2f} ms, fused {t[FUSED] * 1e3:.2f} ms)")


def compute_setup(kernels: Kernels | None) -> dict[str, str | None]:
    """What decides how a training step rounds here: the device, the model's kernel set and, on
    the CPU, the BLAS library and its kernels. Kept in checkpoints so that a run resumed on
    another setup can say why its losses differ in the last digits from an uninterrupted one."""
    setup: dict[str, str | None] = {"device": str(mx.default_device()),
                                    "model_ops": kernels.name if kernels else None}
    if on_cpu():
        from ..cpu import blas

        setup["blas"] = blas.preloaded_library or blas.blas_in_use().split(" (")[0]
        setup["blas_kernels"] = blas.blis_arch() or blas.openblas_core()
    return setup


def _softmax(k: Kernels, x: mx.array) -> mx.array:
    e = k.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def default_dtype(device: mx.Device | None = None) -> mx.Dtype:
    """float32 on the CPU (no fast half-precision matmul there), float16 on a GPU."""
    return mx.float32 if on_cpu(device) else mx.float16


def keep_quantized(device: mx.Device | None = None) -> bool:
    """Whether quantized weights should stay quantized for inference on ``device``: on a GPU
    quantized matmuls are the fast path; on a CPU only when a measurement here says a one-row
    4-bit product is faster than float32 (see :func:`_quantized_seconds`)."""
    if not on_cpu(device):
        return True
    q, f = _quantized_seconds()
    return q < f


@functools.cache
def _quantized_seconds() -> tuple[float, float]:
    """CPU seconds of a one-row product with a (1536, 576) matrix (a small Llama's MLP), 4-bit
    group 32 and float32, best of 5 after a warm-up, measured once per process."""
    with mx.stream(mx.cpu):
        w = mx.random.normal((1536, 576), key=mx.random.key(0))
        x = mx.random.normal((1, 576), key=mx.random.key(1))
        wq, s, b = mx.quantize(w, group_size=32, bits=4)
        jobs = (lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4),
                lambda: x @ w.T)
        best = [math.inf, math.inf]
        for rep in range(7):
            for i, job in enumerate(jobs):
                t = time.process_time()
                for _ in range(8):
                    mx.eval(job())
                if rep >= 2:
                    best[i] = min(best[i], time.process_time() - t)
    return best[0], best[1]


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Convert ``model`` in place for fast generation on the CPU; a GPU keeps it as it is.

    Float32 weight matrices are stored in the layouts single-row matmuls of the model's shapes
    run fastest with on this machine, measured once per process (see
    :mod:`mlxgpt.cpu.layout`; e.g. column blocks that reach BLAS's small-matrix kernel): same
    numbers, another layout. The model is for inference afterwards (its parameter names may
    change: do not train or save it). Idempotent; returns the model. GPT-2 only: the layouts
    were measured for its shapes; other families keep MLX's layout.
    """
    if on_cpu() and getattr(model.config, "model_type", "gpt2") == "gpt2":
        from ..cpu.layout import prepare_layouts

        prepare_layouts(model)
    return model


def keep_freed_buffers() -> None:
    """Let MLX keep freed buffers for reuse while training (a no-op on Metal, where the cache
    limit already equals the memory limit).

    MLX's CPU allocator caches only 32 MB by default, so a training step's big activations went
    back to the OS and every step paid for fresh zeroed pages (a third of the step time at
    6/6/384, block 256).
    """
    mx.set_cache_limit(max(mx.get_memory_limit(), 1 << 30))
