"""Time one BLAS library's sgemm on the products mlxgpt runs most; prints JSON.

Run by :mod:`mlxgpt.cpu.blas` as a script in a process of its own (``python blas_probe.py
LIBRARY_PATH THREADS``), with the environment the library would be loaded with, so that each
library is measured alone, before MLX is loaded anywhere. Needs only numpy.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# (name, M, K, N, threads: 0 = all the process may use, weight sets, BLIS packs). Shapes of
# GPT-2 124M's products: one token's c_fc (decoding); four tokens' (a speculative-decoding check,
# a short prompt, a small batch); a 512-token prompt's c_attn (prefill); one CPU stream's share
# of a small model's training step (mlxgpt trains with one BLAS thread per stream, BLIS packing
# both operands). Decoding reads every weight once per token, from memory, not from cache: the
# one-row product goes through 8 different weight sets in turn (75 MB, more than most CPUs' L3),
# in each layout mlxgpt may decode with; the others use nn.Linear's (N, K) layout.
PRODUCTS = (
    ("decode", 1, 768, 3072, 0, 8, False),
    ("rows4", 4, 768, 3072, 0, 8, False),
    ("prefill", 512, 768, 2304, 0, 1, False),
    ("train", 384, 128, 512, 1, 1, True),
)


def best_seconds(fn, budget: float = 0.03) -> float:
    """The fastest of 5 timed batches of calls, each batch about ``budget`` seconds."""
    fn()
    t = time.perf_counter()
    fn()
    n = max(1, int(budget / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


# mlxgpt.cpu.layout.SMALL_GEMM_MNK (that module imports mlx, this script must not): products
# this small take OpenBLAS's AVX-512 unpacked path, which the "blocks" decoding layout uses.
SMALL_GEMM_MNK = 1_000_000
LAYOUTS = ("one-block", "plain", "blocks")  # as mlxgpt.cpu.layout: (K, N), (N, K) read transposed


def operands(M: int, K: int, N: int, layout: str, rng) -> tuple:
    """An (M, K) matrix, (K, N) weights held in ``layout`` and the (M, N) result: the weights as
    (K, N); as (N, K) read transposed, the way nn.Linear holds them; or as column blocks (K, n)
    with K * n at most SMALL_GEMM_MNK. Returns (a, [(block, transposed, first column)], c)."""
    a = rng.standard_normal((M, K), dtype=np.float32)
    c = np.zeros((M, N), dtype=np.float32)
    if layout == "plain":
        return a, [(rng.standard_normal((N, K), dtype=np.float32), True, 0)], c
    widest = N if layout == "one-block" else max(1, SMALL_GEMM_MNK // K)
    width = -(-N // -(-N // widest))  # as even a split as blocks of at most `widest` allow
    blocks = [(rng.standard_normal((K, min(width, N - j)), dtype=np.float32), False, j)
              for j in range(0, N, width)]
    return a, blocks, c


def product(sgemm, a: np.ndarray, blocks: list, c: np.ndarray, sets: int = 1):
    """A call computing ``c = a @ weights`` with one sgemm per block (see :func:`operands`);
    with ``sets`` > 1, each call multiplies by the next of that many copies of the weights."""
    (M, K), N = a.shape, c.shape[1]
    copies = [blocks] + [[(np.full_like(b, 0.5), t, col) for b, t, col in blocks]
                         for _ in range(sets - 1)]
    # per set: (transpose flag, columns of the product, row stride of the block, block, its c)
    calls = [[(TRANS if t else NO_TRANS, b.shape[0] if t else b.shape[1], b.shape[1], b,
               c[:, col:]) for b, t, col in bs] for bs in copies]
    turn = [0]

    def run() -> None:
        turn[0] = (turn[0] + 1) % sets
        for trans, n, ldb, b, out in calls[turn[0]]:
            sgemm(ROW_MAJOR, NO_TRANS, trans, M, n, K, 1.0, a.ctypes.data, K, b.ctypes.data, ldb,
                  0.0, out.ctypes.data, N)

    return run


def probe(path: str, threads: int) -> dict[str, float]:
    """Seconds per product (the best weight layout for each) with ``path`` on ``threads``."""
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    if hasattr(lib, "bli_thread_set_num_threads"):
        set_threads = lambda n: lib.bli_thread_set_num_threads(ctypes.c_int64(n))  # noqa: E731
    else:
        set_threads = lib.openblas_set_num_threads
    sgemm = lib.cblas_sgemm
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    rng = np.random.default_rng(0)
    out = {}
    for name, M, K, N, n_threads, sets, pack in PRODUCTS:
        set_threads(n_threads or threads)
        if hasattr(lib, "bli_pack_set_pack_a"):  # BLIS: as mlxgpt.cpu.blas.threads sets it
            lib.bli_pack_set_pack_a(ctypes.c_bool(pack))
            lib.bli_pack_set_pack_b(ctypes.c_bool(pack))
        layouts = LAYOUTS if M == 1 else ("plain",)
        out[name] = min(best_seconds(product(sgemm, *operands(M, K, N, layout, rng), sets))
                        for layout in layouts)
    return out


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))))
