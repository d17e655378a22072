"""Everything that depends on the device MLX runs on, decided here and nowhere else, and handed
around as one value: the :class:`Backend` record of a device (:func:`backend`).

Loaders, models, generation and training receive the record (an optional ``backend=`` argument,
:func:`backend` by default) instead of asking MLX which device it computes on. Building one
measures nothing: a field that needs a measurement takes it when first read, and the measurement
is kept for the process (whether quantized matmuls pay: for the machine, in the cache folder).

- ``device``, ``on_cpu``;
- ``dtype``: float32 on the CPU (no fast half-precision matmul there), float16 on a GPU;
- ``kernels`` (:class:`Kernels`): the few functions whose fastest form differs by backend. A GPU
  (Metal, CUDA) runs MLX's fused ``mx.fast.scaled_dot_product_attention`` and its own
  ``tanh``/``exp``. MLX's CPU backend evaluates ``exp``/``tanh`` element by element through
  libm, so the arithmetic-only kernels of :mod:`mlxgpt.cpu.fastmath` are usually faster there;
  which set the CPU runs faster is timed once per process (a few milliseconds,
  :func:`cpu_kernels`), or named by ``MLXGPT_KERNELS=fused|arithmetic``. A model takes its set
  when it is built, like nanoGPT's ``self.flash``;
- ``keep_quantized``: whether quantized weights stay quantized for inference
  (:func:`quantized_seconds`);
- ``layout``: how :func:`prepare_for_inference` lays weights out for decoding (the CPU only);
- ``cpu_streams(processes)``: how many CPU streams a training batch's rows are split over;
- ``train_pass``: what ``--train-pass auto`` trains with here, and why;
- ``blas``: the BLAS library and kernel set MLX's CPU matmuls call.

``mlxgpt info`` prints :meth:`Backend.describe`; ``mlxgpt info --calibrate`` measures again what
is kept for the machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..atomicio import cached_json
from ..cachedir import cache_root
from ..cpu import blas, fastmath, parallel
from ..cpu.layout import LAYOUT_ENV, layout_report, prepare_layouts
from ..errors import MlxgptError
from .config import GPTConfig
from .inference import InferenceModel, clone_modules

KERNELS_ENV = "MLXGPT_KERNELS"
NATIVE_ENV = "MLXGPT_NATIVE_TRAINING"  # what --train-pass auto means: 0 MLX's graph, 1 native
QUANTIZED_CACHE = "backend.json"  # in the cache folder, beside the BLAS choice (blas.json)
QUANTIZED_PROBE = 1  # bumped when quantized_seconds times differently
CACHE_ENTRIES = 8  # settings (MLX versions, BLAS libraries, thread counts) kept in the file


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


def _softmax(k: Kernels, x: mx.array) -> mx.array:
    e = k.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@functools.cache
def quantized_seconds() -> tuple[float, float]:
    """CPU seconds of 8 one-row products with a (1536, 576) matrix (a small Llama's MLP), 4-bit
    group 32 and float32, best of 5 after a warm-up. Measured once per machine (about 0.3 s) and
    kept in the cache folder (``backend.json``) under what decides it: MLX's version, the CPU,
    the BLAS, its kernels and threads; ``mlxgpt info --calibrate`` measures again."""
    return _saved_quantized_seconds(fresh=False)


def calibrate_quantized() -> str:
    """Time quantized against float32 matmuls again and keep the result for later processes
    (``mlxgpt info --calibrate``); say what was found."""
    quantized_seconds.cache_clear()
    q, f = _saved_quantized_seconds(fresh=True)
    return f"quantized matmuls: {_quantized_note(q, f)}"


def _quantized_note(q: float, f: float) -> str:
    kept = "kept quantized" if q < f else "dequantized to float32"
    return (f"{kept} for inference (8 one-row products, CPU time: 4-bit {q * 1e3:.2f} ms, "
            f"float32 {f * 1e3:.2f} ms; {cache_root() / QUANTIZED_CACHE})")


def _saved_quantized_seconds(fresh: bool) -> tuple[float, float]:
    """:func:`_time_quantized`'s answer for this setup from the cache folder, measured and
    stored where there is none (with ``fresh``: always)."""
    setup = {"probe": QUANTIZED_PROBE, "mlx": mx.__version__, "cpu": blas.cpu_model(),
             "blas": list(_blas_parts()), "threads": blas.blas_threads()}
    def make() -> dict:
        q, f = _time_quantized()
        return {"quantized": q, "float32": f, "setup": setup}

    def read(entry: dict) -> tuple[float, float]:
        return float(entry["quantized"]), float(entry["float32"])

    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:20]
    return cached_json(cache_root() / QUANTIZED_CACHE, digest, read, make, keep=CACHE_ENTRIES,
                       fresh=fresh)


def _time_quantized() -> tuple[float, float]:
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


def _blas_parts() -> tuple[str, str | None]:
    """The BLAS library MLX's CPU matmuls call, and its kernel set (None where unknown)."""
    library = blas.preloaded_library or blas.blas_in_use().split(" (")[0]
    return library, blas.blis_arch() or blas.openblas_core()


@dataclass(frozen=True)
class Backend:
    """The device-dependent choices for one MLX device (see the module doc). Building one
    measures nothing; each property resolves its field when read, from measurements kept for
    the process (or the machine), so that every reader sees the same answer."""

    device: mx.Device  # or a device type (mx.cpu, mx.gpu): its first device
    # Set by a caller that decides instead of the measurement (tests, benchmarks): quantized
    # weights stay quantized (True) or are dequantized (False). None: measured.
    force_quantized: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, mx.DeviceType):
            object.__setattr__(self, "device", mx.Device(self.device))

    @property
    def on_cpu(self) -> bool:
        return self.device == mx.cpu

    @property
    def dtype(self) -> mx.Dtype:
        """The models' default float dtype: float32 on the CPU (no fast half-precision matmul
        there), float16 on a GPU."""
        return mx.float32 if self.on_cpu else mx.float16

    @property
    def kernels(self) -> Kernels:
        """The model kernels: the faster set on this CPU (:func:`cpu_kernels`), fused on a GPU."""
        return cpu_kernels() if self.on_cpu else FUSED

    @property
    def keep_quantized(self) -> bool:
        """Whether quantized weights stay quantized for inference: on a GPU quantized matmuls
        are the fast path; on a CPU only where a one-row 4-bit product is faster than float32
        (:func:`quantized_seconds`)."""
        if self.force_quantized is not None:
            return self.force_quantized
        if not self.on_cpu:
            return True
        q, f = quantized_seconds()
        return q < f

    @property
    def layout(self) -> str | None:
        """How :func:`prepare_for_inference` lays out float32 weights for decoding: the layout
        ``MLXGPT_LAYOUT`` names, or "measured" (each model's shapes timed here, once per
        process, :mod:`mlxgpt.cpu.layout`); None on a GPU (MLX's own layout)."""
        if not self.on_cpu:
            return None
        return os.environ.get(LAYOUT_ENV) or "measured"

    def cpu_streams(self, processes: int = 1) -> int:
        """How many CPU streams a training batch's rows are split over when ``processes``
        processes train together (:func:`mlxgpt.cpu.parallel.stream_count`)."""
        return parallel.stream_count(self.on_cpu, processes)

    @property
    def native_error(self) -> str | None:
        """Why the native C training pass cannot run on this device (None: it can). The first
        read on a CPU builds its library (once per machine, then loaded from the cache)."""
        if not self.on_cpu:
            return "MLX computes on a GPU; the native pass is for the CPU"
        from ..cpu import native

        return native.build_error()

    @property
    def train_pass(self) -> str:
        """The pass ``--train-pass auto`` trains a float32 GPT-2 with here, and why (a model's
        own pass: :func:`mlxgpt.training.native_pass.choose_train_pass`)."""
        if not self.on_cpu:
            return "MLX's graph (GPU)"
        if os.environ.get(NATIVE_ENV, "") == "0":
            return f"MLX's graph ({NATIVE_ENV}=0)"
        error = self.native_error
        if error:
            return f"MLX's graph (the native pass cannot be built here: {error})"
        from ..cpu import native

        return (f"native C pass for float32 GPTs ({native.library_path()}; LoRA and classifiers "
                f"train through MLX's graph; --train-pass mlx for it always)")

    @functools.cached_property
    def blas(self) -> str | None:
        """The BLAS MLX's CPU matmuls call and its kernels ("OpenBLAS SkylakeX", "BLIS zen3");
        None on a GPU. Fixed once mlx is loaded (the preload), so kept."""
        if not self.on_cpu:
            return None
        return " ".join(part for part in _blas_parts() if part)

    def compute_setup(self, kernels: Kernels | None) -> dict[str, str | None]:
        """What decides how a training step rounds here: the device, the model's kernel set and,
        on the CPU, the BLAS library and its kernels. Kept in checkpoints so that a run resumed
        on another setup can say why its losses differ in the last digits from an uninterrupted
        one."""
        setup: dict[str, str | None] = {"device": str(self.device),
                                        "model_ops": kernels.name if kernels else None}
        if self.on_cpu:
            setup["blas"], setup["blas_kernels"] = _blas_parts()
        return setup

    def describe(self) -> list[tuple[str, str]]:
        """What ``mlxgpt info`` shows of the record, as (label, text) lines. Reading it takes
        the measurements not taken yet."""
        dtype = str(self.dtype).removeprefix("mlx.core.")
        lines = [("dtype", f"{dtype} (default for models)"), ("blas", blas.blas_in_use())]
        note = blas.kernels_note()
        if note:
            lines.append(("kernels", note))
        lines += [("model ops", self._kernels_note()), ("quantized", self._quantized_note())]
        if self.on_cpu:
            streams = self.cpu_streams()
            split = "rows of each batch split over them, " if streams > 1 else ""
            lines += [("layout", layout_report(GPTConfig())),
                      ("training", f"{streams} CPU stream{'s' * (streams > 1)} ({split}"
                                   f"{parallel.STREAMS_ENV} overrides)")]
        lines.append(("train pass", self.train_pass))
        return lines

    def _kernels_note(self) -> str:
        if not self.on_cpu:
            return f"{FUSED.name} (GPU)"
        chosen = self.kernels
        if os.environ.get(KERNELS_ENV):
            return f"{chosen.name} (set by {KERNELS_ENV})"
        t = _kernel_seconds()
        return (f"{chosen.name} (measured on this CPU, softmax + GELU, CPU time: arithmetic "
                f"{t[ARITHMETIC] * 1e3:.2f} ms, fused {t[FUSED] * 1e3:.2f} ms)")

    def _quantized_note(self) -> str:
        if self.force_quantized is not None:
            return f"{'kept quantized' if self.force_quantized else 'dequantized'} (forced)"
        if not self.on_cpu:
            return "kept quantized (GPU: quantized matmuls are the fast path)"
        return _quantized_note(*quantized_seconds())


_records: dict[str, Backend] = {}  # by the device's text: an mx.Device hashes by identity


def backend(device: mx.Device | None = None) -> Backend:
    """The record of ``device`` (default: MLX's default device), one per device and process."""
    return _record(device or mx.default_device())


def _record(device: mx.Device) -> Backend:
    key = str(device)
    if key not in _records:  # two threads may both build one: the same answers either way
        _records[key] = Backend(device)
    return _records[key]


def prepare_for_inference(model: nn.Module, backend: Backend | None = None) -> InferenceModel:
    """``model`` made ready for fast generation on ``backend`` (default: :func:`backend`), as a
    new :class:`~mlxgpt.core.inference.InferenceModel`; ``model`` itself is left as it was (it
    can still be trained and saved).

    On the CPU a GPT-2's float32 weight matrices are stored in the layouts single-row matmuls
    of its shapes run fastest with here (``backend.layout``, :mod:`mlxgpt.cpu.layout`; e.g.
    column blocks that reach BLAS's small-matrix kernel): same numbers, another layout, in a
    copy of the module tree that shares every array it does not lay out anew. A GPU, and the
    other families (the layouts were measured for GPT-2's shapes), keep MLX's layout. A
    prepared model is returned as it is.
    """
    if isinstance(model, InferenceModel):
        return model
    backend = backend or _record(mx.default_device())
    module = clone_modules(model)
    module.eval()
    layouts: dict[str, str] = {}
    if backend.layout is not None and getattr(model.config, "model_type", "gpt2") == "gpt2":
        layouts = prepare_layouts(module)
    return InferenceModel(module, layouts)


def keep_freed_buffers() -> None:
    """Let MLX keep freed buffers for reuse while training (a no-op on Metal, where the cache
    limit already equals the memory limit).

    MLX's CPU allocator caches only 32 MB by default, so a training step's big activations went
    back to the OS and every step paid for fresh zeroed pages (a third of the step time at
    6/6/384, block 256).
    """
    mx.set_cache_limit(max(mx.get_memory_limit(), 1 << 30))
