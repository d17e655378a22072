"""Load an optimized BLAS before MLX is imported (Linux CPU backend only).

MLX's Linux CPU wheel links a slow reference BLAS. When an optimized OpenBLAS is installed
(Debian/Ubuntu: ``libopenblas0-pthread``), loading it with ``RTLD_GLOBAL`` before ``mlx`` is
first imported makes MLX's sgemm calls resolve to it (~36x faster matmuls on x86_64).
Set ``MLXGPT_NO_BLAS_PRELOAD=1`` to turn this off. This module must not import mlx.

OpenBLAS releases older than the CPU (0.3.21 on Debian 12 vs AMD Zen 4/5) do not recognise it
and fall back to AVX2 ("Haswell") kernels, half the speed of its AVX-512 ones. On AMD CPUs
with AVX-512, mlxgpt asks for the AVX-512 (SkylakeX) kernels through ``OPENBLAS_CORETYPE``
unless that variable is already set.
"""

from __future__ import annotations

import ctypes
import os
import sys
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
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}  # what SkylakeX kernels use


def _amd_with_avx512() -> bool:
    """An AMD CPU with the AVX-512 subsets OpenBLAS's SkylakeX kernels need (Zen 4 and later)."""
    try:
        cpu0 = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return False
    flags = set()
    for line in cpu0.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    return "AuthenticAMD" in cpu0 and _AVX512 <= flags


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
    coretype = ""
    if CORETYPE_ENV not in os.environ and _amd_with_avx512():
        os.environ[CORETYPE_ENV] = coretype = "SKYLAKEX"  # read once, when OpenBLAS loads
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        preload_note = f"failed to load {path}: {e}"
        return
    preloaded_path = path
    preload_note = "preloaded by mlxgpt" + (f", {CORETYPE_ENV}={coretype}" if coretype else "")


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


def kernels_note() -> str | None:
    """The OpenBLAS kernels in use, with a hint when AVX2 kernels run on an AVX-512 AMD CPU
    because ``OPENBLAS_CORETYPE`` was set by hand (the environment's choice is kept)."""
    core = openblas_core()
    if core is None:
        return None
    if core.lower() in ("haswell", "zen") and _amd_with_avx512():
        forced = f"{CORETYPE_ENV}={os.environ.get(CORETYPE_ENV)}"
        return (f"{core} (AVX2); this CPU has AVX-512: without {forced} mlxgpt would use "
                "the SkylakeX kernels (about 2x faster matmuls)")
    return core


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
