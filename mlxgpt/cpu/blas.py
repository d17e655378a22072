"""Load an optimized BLAS before MLX is imported (Linux CPU backend only).

MLX's Linux CPU wheel links a slow reference BLAS. When an optimized OpenBLAS is installed
(Debian/Ubuntu: ``libopenblas0-pthread``), loading it with ``RTLD_GLOBAL`` before ``mlx`` is
first imported makes MLX's sgemm calls resolve to it (~36x faster matmuls on x86_64).
Set ``MLXGPT_NO_BLAS_PRELOAD=1`` to turn this off. This module must not import mlx.

OpenBLAS releases older than the CPU (0.3.21 on Debian 12 vs AMD Zen 4/5 or a recent Xeon) do
not recognise it and fall back to old kernels: AVX2 ("Haswell") or even SSE3 ("Prescott"), 1.6x
to 4x slower than the AVX-512 ones. So when ``OPENBLAS_CORETYPE`` is unset, mlxgpt sets it to the
best kernel set the CPU's flags allow (:func:`best_kernel_set`), for Intel and AMD alike; a value
the environment sets is kept (it is set where old OpenBLAS builds misbehave). It also shortens
the time OpenBLAS's idle threads spin (``OPENBLAS_THREAD_TIMEOUT``, see :data:`THREAD_TIMEOUT`).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DISABLE_ENV = "MLXGPT_NO_BLAS_PRELOAD"
INSTALL_HINT = "apt-get install libopenblas0-pthread  (Debian/Ubuntu)"

_SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_NAMES = ("libopenblas.so.0", "libopenblas.so", "openblas-pthread/libopenblas.so.0")

# What happened at import: the path loaded, or why nothing was.
preloaded_path: str | None = None
preload_note: str = "not attempted"

CORETYPE_ENV = "OPENBLAS_CORETYPE"
TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
# OpenBLAS threads spin (sched_yield: system time) for 2**TIMEOUT cycles after each call before
# they sleep; the default (2**28 cycles, ~0.1 s) burns a core between MLX's many small matmuls.
# 2**4 cycles: measured on the nano preset (2 threads, Intel Xeon, SkylakeX kernels) 8,545
# tokens/s and 37 CPU-s (2.8 s system) for 300 steps, against 8,613 tokens/s and 56 CPU-s
# (17.6 s system) by default, and 7,597 tokens/s with one thread.
THREAD_TIMEOUT = "4"

# x86 kernel sets, best first, and the CPU flags each needs. Debian's OpenBLAS 0.3.21 does not
# know CPUs newer than itself and falls back to old kernels (Prescott, SSE3, on an Emerald Rapids
# Xeon), so the set is chosen from the flags instead when OPENBLAS_CORETYPE is unset.
KERNEL_SETS = (
    ("SkylakeX", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})),
    ("Haswell", frozenset({"avx2", "fma"})),
    ("SandyBridge", frozenset({"avx"})),
)
# What OpenBLAS names its kernel sets (openblas_get_corename), by the flag level they use.
_LEVEL = {**{c: 3 for c in ("skylakex", "cooperlake", "sapphirerapids")},
          **{c: 2 for c in ("haswell", "zen")}, "sandybridge": 1}
# 1024^3 sgemm, one thread, GFLOP/s, Intel Xeon (Sapphire Rapids class), OpenBLAS 0.3.21 with the
# kernel set forced: what a weaker set costs.
MEASURED_GFLOPS = {"SkylakeX": 145, "Haswell": 92, "SandyBridge": None, "Prescott": 37}


def cpu_flags() -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        cpu0 = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return frozenset()
    for line in cpu0.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def best_kernel_set(flags: frozenset[str] | None = None) -> str | None:
    """The best OpenBLAS kernel set the CPU's flags allow (x86 only; None: leave it to
    OpenBLAS)."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name, needs in KERNEL_SETS if needs <= flags), None)


def find_openblas() -> str | None:
    """The first OpenBLAS shared library found in the usual library directories."""
    extra = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    for d in [p for p in extra if p] + list(_SEARCH_DIRS):
        for name in _NAMES:
            p = Path(d) / name
            if p.exists():
                return str(p)
    return None


def preload() -> None:
    """Load OpenBLAS globally if we are on Linux, mlx is not imported yet, and not disabled."""
    global preloaded_path, preload_note
    if not sys.platform.startswith("linux"):
        preload_note = "not needed on this platform"
        return
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        preload_note = f"disabled by {DISABLE_ENV}"
        return
    if "mlx.core" in sys.modules:
        preload_note = "mlx was imported before mlxgpt; preload skipped"
        return
    path = find_openblas()
    if path is None:
        preload_note = "no OpenBLAS found"
        return
    chosen = []  # both variables are read once, when OpenBLAS loads
    best = best_kernel_set()
    if CORETYPE_ENV not in os.environ and best:
        os.environ[CORETYPE_ENV] = best
        chosen.append(f"{CORETYPE_ENV}={os.environ[CORETYPE_ENV]}")
    if TIMEOUT_ENV not in os.environ:
        os.environ[TIMEOUT_ENV] = THREAD_TIMEOUT
        chosen.append(f"{TIMEOUT_ENV}={THREAD_TIMEOUT}")
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        preload_note = f"failed to load {path}: {e}"
        return
    preloaded_path = path
    preload_note = "preloaded by mlxgpt" + "".join(f", {c}" for c in chosen)


def openblas_core() -> str | None:
    """The kernel set the preloaded OpenBLAS chose ("Haswell" = AVX2, "SkylakeX" = AVX-512)."""
    if preloaded_path is None:
        return None
    try:
        lib = ctypes.CDLL(preloaded_path)
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None


def openblas_threads() -> int | None:
    """How many threads the preloaded OpenBLAS uses."""
    if preloaded_path is None:
        return None
    try:
        return int(ctypes.CDLL(preloaded_path).openblas_get_num_threads())
    except (OSError, AttributeError):
        return None


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with OpenBLAS using ``n`` threads (``None``: leave it as it is)."""
    if n is None or preloaded_path is None:
        yield
        return
    try:
        lib = ctypes.CDLL(preloaded_path)
        before = int(lib.openblas_get_num_threads())
    except (OSError, AttributeError):
        yield
        return
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)


def kernels_note() -> str | None:
    """The OpenBLAS kernels in use, and, when they are weaker than the CPU allows (an
    OPENBLAS_CORETYPE set by hand, which is kept), what that costs and how to get the best."""
    core = openblas_core()
    if core is None:
        return None
    best = best_kernel_set()
    threads = openblas_threads()
    note = core + (f", {threads} threads" if threads else "")
    if best is None or _LEVEL.get(core.lower(), 0) >= _LEVEL[best.lower()]:
        return note
    have, want = MEASURED_GFLOPS.get(core), MEASURED_GFLOPS.get(best)
    cost = (f" (1024^3 sgemm on one Xeon core: {have} vs {want} GFLOP/s, {want / have:.1f}x)"
            if have and want else "")
    how = (f"unset {CORETYPE_ENV} (now {os.environ[CORETYPE_ENV]}) or set it to {best}"
           if os.environ.get(CORETYPE_ENV) else f"set {CORETYPE_ENV}={best}")
    return f"{note}; this CPU allows {best}, which multiplies faster{cost}: {how}"


def blas_in_use() -> str:
    """A one-line description of the BLAS that MLX's CPU matmul resolves to in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        if "libopenblas" in line:
            how = preload_note if preloaded_path else "loaded by the environment (LD_PRELOAD?)"
            return f"OpenBLAS {line.split()[-1]} ({how})"
    for line in maps.splitlines():
        if "libmkl" in line:
            return f"MKL {line.split()[-1]}"
    return f"MLX's bundled reference BLAS (slow; {preload_note}); install: {INSTALL_HINT}"
