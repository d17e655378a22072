"""The native training pass: ``gpt_train.c`` built with the system C compiler, called by ctypes.

Why: see the C file's header. MLX's CPU backend spends most of a small GPT's training step on
per-operation work; one C call for the whole forward + backward pass, with its products on the
BLAS MLX loaded, takes that away. It is built once per machine (a few seconds, the first time
a model trains here) into the cache folder, keyed by the source, the compiler and the CPU, and
used only where it applies (:func:`unavailable_reason`); everything else trains through MLX.

Parallelism: :meth:`NativeGPT.run` splits a batch's rows over one thread per core, each with its
own workspace and gradient buffers and the BLAS on one thread; ctypes releases the GIL for the
call, so the threads run at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..atomicio import atomic_file, clean_leftovers, locked
from ..cachedir import cache_root
from .parallel import split_rows

SOURCE = Path(__file__).with_name("gpt_train.c")
PER_LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
COMPILER_ENV = "CC"
_SGEMM = ctypes.CFUNCTYPE(None, *[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p,
                          ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                          ctypes.c_void_p, ctypes.c_int)


class Dims(ctypes.Structure):
    _fields_ = [("V", ctypes.c_int), ("P", ctypes.c_int), ("C", ctypes.c_int),
                ("L", ctypes.c_int), ("H", ctypes.c_int), ("F", ctypes.c_int),
                ("tied", ctypes.c_int), ("gelu_tanh", ctypes.c_int), ("eps", ctypes.c_float),
                ("dropout", ctypes.c_float)]


class Piece(ctypes.Structure):
    """Where a batch piece sits (its micro-batch's dropout seed, its first row there)."""

    _fields_ = [("seed", ctypes.c_uint32), ("row0", ctypes.c_int64)]


class BuildError(RuntimeError):
    """The C source could not be compiled here (no compiler, or it failed)."""


def _compiler() -> str | None:
    return os.environ.get(COMPILER_ENV) or shutil.which("cc") or shutil.which("gcc") \
        or shutil.which("clang")


def _flag_sets() -> list[list[str]]:
    base = ["-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
    # -march=native: the library is built on the machine it runs on (the key names the CPU)
    return [base + ["-march=native"], base]


def _key(cc: str) -> str:
    from .blas import cpu_flags, cpu_model

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), repr(_flag_sets()).encode(),
                 cpu_model().encode(),
                 " ".join(sorted(cpu_flags())).encode(), sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


@functools.cache
def library_path() -> Path:
    """The compiled library, built on first use (under a lock: processes started together build
    it once). Raises :class:`BuildError` when it cannot be built."""
    cc = _compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC, or install gcc/clang)")
    folder = cache_root() / "native"
    target = folder / f"gpt_train-{_key(cc)}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / "build.lock"):
        if target.exists():
            return target
        # Builds killed midway (this key's or an older one's) leave temporaries: removed.
        clean_leftovers(folder)
        *first, portable = _flag_sets()
        for flags in first:
            try:
                with atomic_file(target, suffix=".so") as tmp:
                    _compile(cc, flags, tmp)
                return target
            except BuildError:  # -march=native may fail: the portable flags next
                continue
        with atomic_file(target, suffix=".so") as tmp:
            _compile(cc, portable, tmp)
        return target


def _compile(cc: str, flags: list[str], out: Path) -> None:
    done = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE), "-lm"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise BuildError(f"{cc} could not build {SOURCE.name}: {why}")


def _sgemm_address() -> int | None:
    """cblas_sgemm of the BLAS MLX computes with: the library mlxgpt preloaded, Accelerate on
    macOS, else the BLAS library MLX itself linked (found among the process's mapped files)."""
    from . import blas

    if blas._handle is not None:
        return ctypes.cast(blas._handle.cblas_sgemm, ctypes.c_void_p).value
    if sys.platform == "darwin":
        lib = ctypes.CDLL("/System/Library/Frameworks/Accelerate.framework/Accelerate")
        return ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for path in dict.fromkeys(line.split()[-1] for line in maps if "blas" in line.lower()):
        try:
            return ctypes.cast(ctypes.CDLL(path).cblas_sgemm, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    """The library, or why it cannot be had (tried once per process: a failing compiler is
    not run again for every model that trains)."""
    try:
        return _load(), None
    except (BuildError, OSError) as e:
        return None, str(e)


def _library() -> ctypes.CDLL:
    lib, error = _loaded()
    if lib is None:
        raise BuildError(error)
    return lib


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    address = _sgemm_address()
    if address is None:
        raise BuildError("no BLAS with cblas_sgemm found in this process")
    lib.gpt_set_sgemm.argtypes = [ctypes.c_void_p]
    lib.gpt_set_sgemm(address)
    lib.gpt_workspace_floats.restype = ctypes.c_size_t
    lib.gpt_workspace_floats.argtypes = [ctypes.POINTER(Dims), ctypes.c_int, ctypes.c_int]
    lib.gpt_adamw.restype = ctypes.c_double
    lib.gpt_adamw.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 6, *[ctypes.c_float] * 9,
                              *[ctypes.c_void_p] * 3]
    lib.gpt_forward_backward.restype = ctypes.c_double
    lib.gpt_forward_backward.argtypes = [
        ctypes.POINTER(Dims), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Piece), ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_double)]
    lib.gpt_dropout_mask.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32,
                                     ctypes.c_uint32, ctypes.c_uint64, ctypes.c_float]
    return lib


def build_error() -> str | None:
    """Why the native pass cannot be loaded here, or None when it can."""
    return _loaded()[1]


def parameter_names(n_layer: int, tied: bool) -> list[str]:
    """The model's parameter names in the order the C code takes them."""
    names = ["wte.weight", "wpe.weight"]
    names += [f"h.{i}.{p}" for i in range(n_layer) for p in PER_LAYER]
    names += ["ln_f.weight", "ln_f.bias"] + ([] if tied else ["lm_head.weight"])
    return names


def parameter_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape (MLX layouts: Linear weights (out, in)), in the C code's order."""
    C, F, V = cfg.n_embd, cfg.hidden_dim, cfg.vocab_size
    layer = dict(zip(PER_LAYER, [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,),
                                 (F, C), (F,), (C, F), (C,)], strict=True))
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.n_positions, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,), "lm_head.weight": (V, C)}
    return {n: layer[n.split(".", 2)[2]] if n.startswith("h.") else shapes[n]
            for n in parameter_names(cfg.n_layer, cfg.tie_word_embeddings)}


def _pointers(arrays: Sequence[np.ndarray]) -> ctypes.Array:
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])


class NativeGPT:
    """Forward + backward passes of one GPT configuration on ``workers`` threads.

    ``run`` takes the parameters (name -> float32 array) and batches of
    (inputs, targets[, weights]); it returns the weighted cross-entropy sum, the weight sum and,
    unless ``grads`` is False, the gradient of the sum as one flat float32 array (views per
    parameter: :meth:`unflatten`)."""

    def __init__(self, cfg: Any, workers: int):
        self.lib = _library()
        self.tied = bool(cfg.tie_word_embeddings)
        self.dims = Dims(V=cfg.vocab_size, P=cfg.n_positions, C=cfg.n_embd, L=cfg.n_layer,
                         H=cfg.n_head, F=cfg.hidden_dim, tied=int(self.tied),
                         gelu_tanh=int(cfg.activation_function != "gelu"),
                         eps=cfg.layer_norm_epsilon)
        self.shapes = parameter_shapes(cfg)
        self.names = list(self.shapes)
        self.sizes = [math.prod(s) for s in self.shapes.values()]  # elements per parameter
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self._work: dict[int, np.ndarray] = {}  # per worker, grown to the largest piece seen
        # per worker: a flat gradient buffer and the C array of pointers to its tensors (made
        # on the first pass with gradients: evaluation needs none)
        self._grads: list[tuple[np.ndarray, ctypes.Array]] = []

    def host_bytes(self) -> int:
        """Bytes of workspace and gradient buffers held now (all workers)."""
        return (sum(a.nbytes for a in self._work.values())
                + sum(g.nbytes for g, _ in self._grads))

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` (the parameters one after another) per parameter name."""
        out, at = {}, 0
        for (name, shape), size in zip(self.shapes.items(), self.sizes, strict=True):
            out[name] = flat[at:at + size].reshape(shape)
            at += size
        return out

    def _grad_buffers(self) -> list[tuple[np.ndarray, ctypes.Array]]:
        if not self._grads:
            for _ in range(self.workers):
                flat = np.empty(sum(self.sizes), np.float32)
                self._grads.append((flat, _pointers(list(self.unflatten(flat).values()))))
        return self._grads

    def _workspace(self, worker: int, rows: int, t: int) -> np.ndarray:
        """The worker's buffer, large enough for a piece of ``rows`` x ``t`` (one per worker,
        reused by smaller pieces: batches padded to varying lengths do not pile up buffers)."""
        floats = self.lib.gpt_workspace_floats(ctypes.byref(self.dims), rows, t)
        if worker not in self._work or self._work[worker].size < floats:
            self._work.pop(worker, None)  # the old buffer goes before the larger one comes
            self._work[worker] = np.empty(floats, np.float32)
        return self._work[worker]

    def run(self, params: Mapping[str, np.ndarray], batches: Sequence[Sequence[np.ndarray]],
            grads: bool = True, *, dropout: float = 0.0,
            seed: int = 0) -> tuple[float, float, np.ndarray | None]:
        """Micro-batch ``k`` draws its dropout masks (rate ``dropout``) from ``seed + k``; a
        mask depends on the row's place in its micro-batch, not on how rows are split."""
        self.dims.dropout = dropout
        # a copy only where a weight is not float32 row-major already (a transposed view)
        arrays = [np.ascontiguousarray(params[n], np.float32) for n in self.names]
        if [a.shape for a in arrays] != list(self.shapes.values()):
            raise ValueError("the weights do not have this configuration's shapes")
        p_ptrs = _pointers(arrays)
        buffers = self._grad_buffers() if grads else []
        for flat, _ in buffers:
            flat.fill(0.0)
        # every micro-batch's rows cut into one piece per worker; a worker runs its pieces in turn
        jobs: list[list[tuple[Piece, tuple[np.ndarray | None, ...]]]] = [
            [] for _ in range(self.workers)]
        for k, batch in enumerate(batches):
            for ids in batch[:2]:
                if ids.size and (ids.min() < 0 or ids.max() >= self.dims.V):
                    raise ValueError(f"token ids must be in [0, {self.dims.V})")
            row0 = 0
            for w, part in enumerate(split_rows(batch, self.workers)):
                inputs, targets = (np.ascontiguousarray(a, np.int32) for a in part[:2])
                weights = part[2] if len(part) > 2 else None
                if weights is not None:
                    weights = np.ascontiguousarray(weights, np.float32)
                piece = Piece(seed=(seed + k) & 0xFFFFFFFF, row0=row0)
                jobs[w].append((piece, (inputs, targets, weights)))
                row0 += inputs.shape[0]

        def work(w: int) -> tuple[float, float]:
            g_ptrs = buffers[w][1] if grads else None
            loss = count = 0.0
            for where, (inputs, targets, weights) in jobs[w]:
                rows, t = inputs.shape
                ws = self._workspace(w, rows, t)
                c = ctypes.c_double()
                loss += self.lib.gpt_forward_backward(
                    ctypes.byref(self.dims), p_ptrs, g_ptrs, inputs.ctypes.data,
                    targets.ctypes.data, None if weights is None else weights.ctypes.data,
                    rows, t, ctypes.byref(where), ws.ctypes.data, ctypes.byref(c))
                count += c.value
            return loss, count

        if self.pool is None:
            results = [work(0)]
        else:
            results = list(self.pool.map(work, range(self.workers)))
        loss = sum(r[0] for r in results)
        count = sum(r[1] for r in results)
        if not grads:
            return loss, count, None
        flat = buffers[0][0]
        for g, _ in buffers[1:]:
            np.add(flat, g, out=flat)
        return loss, count, flat


def dropout_mask(shape: tuple[int, ...], seed: int, site: int, rate: float) -> np.ndarray:
    """The keep mask (1.0 kept, 0.0 dropped) the pass draws at ``site`` (0: embeddings,
    1 + 2l: layer l's attention output, 2 + 2l: its MLP output) of a micro-batch of ``shape``
    (B, T, C) with ``seed``."""
    out = np.empty(shape, np.float32)
    _library().gpt_dropout_mask(out.ctypes.data, out.size, seed & 0xFFFFFFFF, site, 0, rate)
    return out


class NativeAdamW:
    """One AdamW step (PyTorch's bias-corrected form, MLX's order of operations) with gradient
    clipping over a model's tensors, in one C call (``gpt_adamw`` in the C file).

    ``step`` reads the weights and moments (any float32 arrays) and the flat gradient sum,
    writes the new weights, m and v to the rows of ``out`` (flat, the tensors one after another,
    kept until the next call) and returns the gradient norm before clipping."""

    def __init__(self, sizes: Sequence[int], decay: Sequence[bool]):
        self.lib = _library()
        self.sizes = np.asarray(sizes, np.int64)
        self.decay = np.asarray(decay, np.int32)
        self.out = np.empty((3, int(self.sizes.sum())), np.float32)  # weights, m, v

    def step(self, params: Sequence[np.ndarray], m: Sequence[np.ndarray],
             v: Sequence[np.ndarray], grad_sum: np.ndarray, count: float, *, clip: float,
             lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
             t: int) -> float:
        b1, b2 = (np.float32(b) for b in betas)
        c1 = np.float32(lr) / (np.float32(1) - b1 ** np.float32(t))
        c2 = np.float32(1) / np.sqrt(np.float32(1) - b2 ** np.float32(t))
        n = len(self.sizes)
        if not len(params) == len(m) == len(v) == n or grad_sum.size != self.out.shape[1]:
            raise ValueError("AdamW step: the tensors do not match the sizes given")
        keep = [np.ascontiguousarray(a, np.float32) for group in (params, m, v) for a in group]
        if [a.size for a in keep] != list(self.sizes) * 3:
            raise ValueError("AdamW step: the tensors do not match the sizes given")
        p_ptr, m_ptr, v_ptr = (_pointers(keep[i * n:(i + 1) * n]) for i in range(3))
        return self.lib.gpt_adamw(
            n, self.sizes.ctypes.data, self.decay.ctypes.data, p_ptr, m_ptr, v_ptr,
            grad_sum.ctypes.data, 1.0 / max(count, 1.0), clip, lr, weight_decay, b1, b2, eps,
            c1, c2, *(self.out[i].ctypes.data for i in range(3)))
