"""Weight layouts for fast generation on MLX's CPU backend.

Decoding multiplies one row of activations by every weight matrix: ``(1, K) @ (K, N)``.
MLX's CPU matmul always calls BLAS ``sgemm``, and OpenBLAS's sgemm handles a single row badly:
it packs the whole weight matrix before multiplying, so it moves the weights through memory
three times. Its AVX-512 kernels (see :mod:`mlxgpt.cpu.blas`) have a small-matrix path that skips
the packing, but only while ``M * N * K <= 1e6``.

So for inference each float32 Linear weight is stored as column blocks ``(n_blocks, K, n)``
with ``K * n <= 1e6``: one batched matmul multiplies the row by every block, each block taking
the small-matrix path. Where the BLAS has no such path (OpenBLAS's AVX2 kernels, other BLAS)
the matrix is one block, i.e. stored transposed, ``(1, K, N)``: one call instead of many, in
the layout (no transpose flag) that sgemm reads fastest for a single row.

The blocks hold the same numbers (plus zero padding up to a multiple of ``n``), the results
agree with the plain layout to float32 rounding, and prompts (many rows) run at the same speed
as before. The tied embedding is blocked the same way and still looks up token rows from its
blocks, so nothing is stored twice.

Which layout is fastest depends on the machine, not only on the kernels: the small-matrix path
runs on one thread, while a packed sgemm uses every OpenBLAS thread. Measured with SkylakeX
kernels, a single-row (1, 768) @ (768, 50257) took 18.2 ms in blocks vs 24.1 ms plain on one
thread, but 19.9 ms vs 15.1 ms on two (AMD EPYC, Zen 4), and an Intel Xeon favoured blocks on
two. So :func:`choose_layout` times a short chain of single-row matmuls of the model's MLP shape
in each layout on the running machine, once per process (tens of ms), unless ``MLXGPT_LAYOUT``
names one.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxgptError
from ..modules import set_module

LAYOUT_ENV = "MLXGPT_LAYOUT"
LAYOUTS = ("plain", "one-block", "blocks")  # as nn.Linear, transposed, column blocks

# OpenBLAS's sgemm_small_kernel_permit (SkylakeX): the unpacked path runs when M*N*K <= 1e6.
SMALL_GEMM_MNK = 1_000_000
# OpenBLAS kernel sets with that small-matrix path (AVX-512).
_SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def small_gemm_limit() -> int | None:
    """M*N*K below which the loaded BLAS multiplies without packing, or None if it cannot."""
    from . import blas

    core = blas.openblas_core()
    return SMALL_GEMM_MNK if core and core.lower() in _SMALL_GEMM_CORES else None


def block_width(k: int, n: int, limit: int | None = SMALL_GEMM_MNK) -> int:
    """Columns per block: as even a split of ``n`` as blocks of at most ``limit // k`` allow
    (all of them, one block, without a limit)."""
    if limit is None:
        return n
    widest = max(1, limit // k)
    n_blocks = -(-n // widest)
    return -(-n // n_blocks)


def to_blocks(weight: mx.array, limit: int | None = SMALL_GEMM_MNK) -> mx.array:
    """(N, K) weight -> (n_blocks, K, width) column blocks of its transpose, zero-padded."""
    n, k = weight.shape
    width = block_width(k, n, limit)
    n_blocks = -(-n // width)
    wt = weight.T  # (K, N)
    if n_blocks * width > n:
        wt = mx.concatenate([wt, mx.zeros((k, n_blocks * width - n), weight.dtype)], axis=1)
    return mx.contiguous(wt.reshape(k, n_blocks, width).transpose(1, 0, 2))


def _blocked_matmul(x: mx.array, blocks: mx.array, n_out: int) -> mx.array:
    """x (..., K) @ W.T, W given as blocks (n_blocks, K, width) -> (..., n_out)."""
    lead = x.shape[:-1]
    rows = x.reshape(1, -1, x.shape[-1])  # (1, M, K)
    y = rows @ blocks  # (n_blocks, M, width): one small matmul per block
    y = y.transpose(1, 0, 2).reshape(rows.shape[1], -1)  # (M, n_blocks * width)
    if y.shape[-1] != n_out:
        y = y[:, :n_out]
    return y.reshape(*lead, n_out)


class BlockedLinear(nn.Module):
    """An ``nn.Linear`` (inference only) whose weight is stored as column blocks."""

    def __init__(self, linear: nn.Linear, limit: int | None = SMALL_GEMM_MNK):
        super().__init__()
        self.n_out = linear.weight.shape[0]
        self.blocks = to_blocks(linear.weight, limit)  # (n_blocks, in, width)
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        y = _blocked_matmul(x, self.blocks, self.n_out)
        return y + self.bias if "bias" in self else y


class BlockedEmbedding(nn.Module):
    """An ``nn.Embedding`` (inference only) stored as the column blocks of its output head."""

    def __init__(self, embedding: nn.Embedding, limit: int | None = SMALL_GEMM_MNK):
        super().__init__()
        self.n_rows = embedding.weight.shape[0]
        self.blocks = to_blocks(embedding.weight, limit)  # (n_blocks, dims, width)

    def __call__(self, ids: mx.array) -> mx.array:
        width = self.blocks.shape[2]
        flat = ids.reshape(-1)
        rows = self.blocks[flat // width, :, flat % width]  # (N, dims): token t's column
        return rows.reshape(*ids.shape, -1)

    def as_linear(self, x: mx.array) -> mx.array:
        return _blocked_matmul(x, self.blocks, self.n_rows)


def block_weights(model: nn.Module, limit: int | None | str = "auto",
                  where: Callable[[str], bool] | None = None) -> int:
    """Replace float32 ``nn.Linear``/``nn.Embedding`` layers by blocked ones, in place.

    ``limit``: the M*N*K of the BLAS's small-matrix path ("auto": ask the loaded BLAS; None:
    one block per matrix). ``where``: which module paths to convert (default: all).
    Quantized and half-precision layers are left alone (they do not go through sgemm). Returns
    how many layers were converted.
    """
    if limit == "auto":
        limit = small_gemm_limit()
    swaps = []
    for path, module in model.named_modules():
        if not path or module.get("weight") is None or module.weight.dtype != mx.float32:
            continue
        if where is not None and not where(path):
            continue
        if type(module) is nn.Linear:
            swaps.append((path, BlockedLinear(module, limit)))
        elif type(module) is nn.Embedding:
            swaps.append((path, BlockedEmbedding(module, limit)))
    for path, new in swaps:
        set_module(model, path, new)
    mx.eval(model.parameters())
    return len(swaps)


def layout_limit(layout: str) -> int | None:
    """The ``block_weights`` limit of a blocked layout ("one-block": None, "blocks": the BLAS's
    small-matrix M*N*K)."""
    return SMALL_GEMM_MNK if layout == "blocks" else None


def candidate_layouts() -> tuple[str, ...]:
    """The layouts worth timing here: blocks only where the BLAS has the small-matrix path."""
    return LAYOUTS if small_gemm_limit() else LAYOUTS[:2]


@functools.cache
def layout_seconds(k: int, n: int, chain: bool = True, repeats: int = 12) -> dict[str, float]:
    """Best time of single-row matmuls in each candidate layout. ``chain``: a decode-like chain,
    twice (1, k) @ (k, n), an elementwise op, (1, n) @ (n, k), as a transformer's MLP runs (BLAS
    threads wake and sleep as they do while decoding); else one (1, k) @ (k, n), as the output
    head. Layouts take turns (load changes hit all alike); the first two rounds warm up."""
    with mx.stream(mx.cpu):
        up, down = nn.Linear(k, n, bias=False), nn.Linear(n, k, bias=False)
        x = mx.random.normal((1, k), key=mx.random.key(0))
        ways = {}
        for name in candidate_layouts():
            if name == "plain":
                ways[name] = (up, down)
            else:
                limit = layout_limit(name)
                ways[name] = (BlockedLinear(up, limit), BlockedLinear(down, limit) if chain
                              else None)
        mx.eval(x, [[m.parameters() for m in pair if m] for pair in ways.values()])
        best = dict.fromkeys(ways, math.inf)
        for rep in range(repeats + 2):
            for name, (a, b) in ways.items():
                t = time.perf_counter()
                y = x
                for _ in range(2 if chain else 1):
                    y = b(mx.maximum(a(y), 0.0)) if chain else a(y)
                mx.eval(y)
                if rep >= 2:
                    best[name] = min(best[name], time.perf_counter() - t)
    return best


def choose_layout(k: int, n: int, chain: bool = True) -> str:
    """The weight layout for decoding with (k, n) matrices here: ``MLXGPT_LAYOUT`` if set, else
    the fastest measured (:func:`layout_seconds`)."""
    forced = os.environ.get(LAYOUT_ENV)
    if forced:
        if forced not in LAYOUTS:
            raise MlxgptError(f"{LAYOUT_ENV}={forced!r}: choose {', '.join(LAYOUTS)}")
        return forced
    seconds = layout_seconds(k, n, chain)
    return min(seconds, key=seconds.__getitem__)


HEAD_PROBE = 8192  # output rows timed for the head's layout (a slice of it: same behaviour)


def _probes(cfg) -> dict[str, tuple[int, int, bool]]:
    """The (k, n, chain) each part of a GPT is timed with: the layers as an MLP chain, the head
    as one single-row matmul over (a slice of) the vocabulary."""
    return {"layers": (cfg.n_embd, cfg.hidden_dim, True),
            "head": (cfg.n_embd, min(cfg.vocab_size, HEAD_PROBE), False)}


def prepare_layouts(model: nn.Module) -> dict[str, str]:
    """Store a GPT's float32 weights in the layouts decoding runs fastest with here: one for the
    transformer layers (timed as an MLP chain), one for the output head (timed as one large
    single-row matmul; memory-bound, where more BLAS threads pay). Returns both choices."""
    chosen = {part: choose_layout(*probe) for part, probe in _probes(model.config).items()}
    parts = {"layers": lambda path: path.startswith("h."),
             "head": lambda path: path in ("wte", "lm_head")}
    for part, layout in chosen.items():
        if layout != "plain":
            block_weights(model, layout_limit(layout), where=parts[part])
    return chosen


def layout_report(cfg: Any) -> str:
    """Which layouts decoding uses here and why, for a model of ``cfg``'s shapes (``mlxgpt
    info`` passes GPT-2 124M's)."""
    lines = []
    for part, (k, n, chain) in _probes(cfg).items():
        chosen = choose_layout(k, n, chain)
        if os.environ.get(LAYOUT_ENV):
            lines.append(f"{part} {chosen}")
            continue
        t = layout_seconds(k, n, chain)
        times = ", ".join(f"{name} {sec * 1e3:.2f}" for name, sec in t.items())
        lines.append(f"{part} {chosen} (timed: {times} ms)")
    why = f"set by {LAYOUT_ENV}" if os.environ.get(LAYOUT_ENV) else \
        f"timed here on GPT-2's shapes; {LAYOUT_ENV} overrides"
    return f"{'; '.join(lines)} for decoding ({why})"
