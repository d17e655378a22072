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
# (name, M, K, N, threads: 0 = all the process may use). Shapes of GPT-2 124M's products: one
# token's c_fc (decoding), a 512-token prompt's c_attn (prefill), and one CPU stream's share of a
# small model's training step (mlxgpt trains with one BLAS thread per stream).
PRODUCTS = (
    ("decode", 1, 768, 3072, 0),
    ("prefill", 512, 768, 2304, 0),
    ("train", 384, 128, 512, 1),
)


def best_seconds(fn, budget: float = 0.04) -> float:
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


def product(sgemm, M: int, K: int, N: int, transposed: bool, rng):
    """A call multiplying an (M, K) matrix by (K, N) weights: stored (K, N), or (N, K) and read
    transposed (as nn.Linear holds them)."""
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if transposed else (K, N), dtype=np.float32)
    c = np.zeros((M, N), dtype=np.float32)
    trans, ldb = (TRANS, K) if transposed else (NO_TRANS, N)

    def run() -> None:
        sgemm(ROW_MAJOR, NO_TRANS, trans, M, N, K, 1.0, a.ctypes.data, K, b.ctypes.data, ldb,
              0.0, c.ctypes.data, N)

    return run


def probe(path: str, threads: int) -> dict[str, float]:
    """Seconds per product (the better weight layout for each) with ``path`` on ``threads``."""
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
    for name, M, K, N, n_threads in PRODUCTS:
        set_threads(n_threads or threads)
        out[name] = min(best_seconds(product(sgemm, M, K, N, t, rng)) for t in (False, True))
    return out


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))))
