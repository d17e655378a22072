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

When the environment keeps OpenBLAS on kernels weaker than the CPU allows (or on kernels the CPU
cannot run at all: AVX-512 ones on an AVX2 CPU stop the process with SIGILL at the first
matmul), and BLIS is installed (``libblis4-pthread``), mlxgpt loads BLIS instead: BLIS picks its
kernels from the CPU itself (``zen3``, ``skx``, ``haswell``...) and reads no OpenBLAS setting,
so the environment's reason for pinning OpenBLAS does not apply to it. ``MLXGPT_BLAS=openblas``
or ``blis`` names the library instead (:func:`choose_library`). Training runs BLIS on one thread
with both operands of every product packed (:func:`threads`, :data:`BLIS_PACK_ENVS`).

Where both are installed and nothing names one, the faster on this machine is chosen by timing
them, in processes of their own (:func:`calibrate`, ``mlxgpt info --calibrate``); the preload
only reads that choice from the cache, and takes OpenBLAS until it is there: importing mlxgpt
starts no process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..atomicio import cached_json
from ..cachedir import cache_root
from .parallel import cpu_cores

DISABLE_ENV = "MLXGPT_NO_BLAS_PRELOAD"
LIBRARY_ENV = "MLXGPT_BLAS"  # openblas, blis or auto (the default)
INSTALL_HINT = "apt-get install libopenblas0-pthread  (Debian/Ubuntu)"
BLIS_HINT = "apt-get install libblis4-pthread"

_SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so", "openblas-pthread/libopenblas.so.0")
_BLIS_NAMES = ("blis-pthread/libblis.so.4", "libblis.so.4", "libblis.so")

# What happened at import: the library loaded and its path, or why nothing was.
preloaded_path: str | None = None
preloaded_library: str | None = None  # "OpenBLAS" or "BLIS"
preload_note: str = "not attempted"
config_error: str | None = None  # a bad MLXGPT_BLAS (the CLI refuses to run with it, one line)
# The environment before the preload set anything in it: what the choice was made from (a
# calibration times the libraries under it, so that its cache entry is the one read here).
_env_before: dict[str, str] | None = None
_handle: ctypes.CDLL | None = None

CORETYPE_ENV = "OPENBLAS_CORETYPE"
# BLIS multiplies small matrices (its "sup" path: every product of a small model's training
# step) straight from the operands' memory, without packing them, which is slow whenever an
# operand is transposed (every weight gradient, every x @ W.T). Packing both, as its large-matrix
# path always does, measured on an AMD EPYC Zen 3 (BLIS 0.9.0 zen3 kernels, one thread, the baby
# config's products, tools/bench_matmul.py): 62.6 -> 83.2 GFLOP/s (OpenBLAS's AVX2 kernels: 84);
# the baby training step 0.76x -> 0.85x torch's (tools/bench_train.py). Only on one thread, so
# only in training: with two threads packed products of 2-64 rows took 4-35x longer (a forward
# of 2-8 tokens of the `english` model: 52-282 ms instead of 9-16; speculative decoding 0.07x),
# and generation on one thread is as fast or faster unpacked. mlxgpt turns packing on and off
# at run time (bli_pack_set_pack_a/b) unless these variables are set.
BLIS_PACK_ENVS = ("BLIS_PACK_A", "BLIS_PACK_B")
TIMEOUT_ENV = "OPENBLAS_THREAD_TIMEOUT"
BLIS_THREAD_ENVS = ("BLIS_NUM_THREADS", "OMP_NUM_THREADS")
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
# What OpenBLAS names its kernel sets (openblas_get_corename, OPENBLAS_CORETYPE), by the flag
# level they use: 3 = KERNEL_SETS[0]'s flags, 2 = [1]'s, 1 = [2]'s, 0 = SSE only.
_LEVEL = {**{c: 3 for c in ("skylakex", "cooperlake", "sapphirerapids")},
          **{c: 2 for c in ("haswell", "zen")}, "sandybridge": 1}
_EXTRA_FLAGS = {"cooperlake": {"avx512_bf16"}, "sapphirerapids": {"avx512_bf16"}}
# 1024^3 sgemm, one thread, GFLOP/s, Intel Xeon (Sapphire Rapids class), OpenBLAS 0.3.21 with the
# kernel set forced: what a weaker set costs.
MEASURED_GFLOPS = {"SkylakeX": 145, "Haswell": 92, "SandyBridge": None, "Prescott": 37}


@functools.cache
def _cpu0() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (empty where there is none), read once."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_model() -> str:
    """The first CPU's model name from /proc/cpuinfo, else what Python's platform module says."""
    import platform

    return _cpu0().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpu0().get("flags", "").split())


def best_kernel_set(flags: frozenset[str] | None = None) -> str | None:
    """The best OpenBLAS kernel set the CPU's flags allow (x86 only; None: leave it to
    OpenBLAS)."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name, needs in KERNEL_SETS if needs <= flags), None)


def kernel_level(core: str) -> int:
    """How new the instructions an OpenBLAS kernel set uses are (3 AVX-512 ... 0 SSE)."""
    return _LEVEL.get(core.lower(), 0)


def runs_on(core: str, flags: frozenset[str]) -> bool:
    """Whether this CPU has the instructions kernel set ``core`` uses (True when unknown)."""
    level = kernel_level(core)
    if not flags or level == 0:
        return True
    needs = KERNEL_SETS[3 - level][1] | _EXTRA_FLAGS.get(core.lower(), set())
    return needs <= flags


def _find(names: tuple[str, ...]) -> str | None:
    extra = os.environ.get("LD_LIBRARY_PATH", "").split(":")
    for d in [p for p in extra if p] + list(_SEARCH_DIRS):
        for name in names:
            p = Path(d) / name
            if p.exists():
                return str(p)
    return None


def find_openblas() -> str | None:
    """The first OpenBLAS shared library found in the usual library directories."""
    return _find(_OPENBLAS_NAMES)


def find_blis() -> str | None:
    """The first BLIS shared library (pthreads build first) in the usual directories."""
    return _find(_BLIS_NAMES)


def choose_library(openblas: str | None, blis: str | None, env: Mapping[str, str],
                   flags: frozenset[str],
                   measure: Callable[[], tuple[str, str]] | None = None) -> tuple[str | None, str]:
    """Which BLAS to load ("OpenBLAS", "BLIS" or None) and why ("" when nothing needs saying).

    BLIS when the environment holds OpenBLAS on kernels weaker than the CPU allows, or ones the
    CPU cannot run (``OPENBLAS_CORETYPE``), and BLIS is installed: BLIS chooses its kernels from
    the CPU and is not bound by that setting. Otherwise, with both installed on an x86 CPU and
    ``OPENBLAS_CORETYPE`` unset, the one ``measure`` finds faster on this machine
    (:func:`measured_choice`); OpenBLAS when it is set (a set naming the best kernels the CPU
    has is a request for OpenBLAS with them), or without ``measure``.
    ``MLXGPT_BLAS`` names one (``auto``: this rule).
    """
    wanted = env.get(LIBRARY_ENV, "auto").lower()
    if wanted in ("openblas", "blis"):
        name, path = ("OpenBLAS", openblas) if wanted == "openblas" else ("BLIS", blis)
        return (name, f"named by {LIBRARY_ENV}") if path else (None, f"{name} not found")
    if not openblas:
        return ("BLIS", "no OpenBLAS found") if blis else (None, "no OpenBLAS or BLIS found")
    forced, best = env.get(CORETYPE_ENV), best_kernel_set(flags)
    if forced and blis and best:
        if not runs_on(forced, flags):
            return "BLIS", f"{CORETYPE_ENV}={forced} needs instructions this CPU lacks"
        if kernel_level(forced) < kernel_level(best):
            return "BLIS", f"{CORETYPE_ENV}={forced} is weaker than this CPU allows ({best})"
    if blis and best and not forced and measure is not None:
        return measure()
    return "OpenBLAS", ""


# --------------------------------------------------------------------------- measured choice
# Neither library is faster everywhere: on an AMD EPYC Zen 3, BLIS (zen3 kernels) decodes GPT-2
# 124M 1.33-1.40x faster than OpenBLAS 0.3.21's Haswell kernels (sgemm with one row: OpenBLAS
# packs the whole weight matrix first), while both multiply many rows at the same speed; an
# Intel AVX-512 CPU may rank them otherwise. So where both are installed and nothing pins one
# (MLXGPT_BLAS and OPENBLAS_CORETYPE unset), mlxgpt times each once per machine (blas_probe.py,
# a process per library, about 2.5 s for both) when asked (`mlxgpt info --calibrate`: the
# preload, at import, starts no process) and keeps the answer in its cache folder; child
# processes inherit the choice through MEASURED_ENV, so a run and the processes it starts
# multiply alike (same rounding), even when the cache changes between them.
MEASURED_ENV = "MLXGPT_BLAS_MEASURED"
PROBE_VERSION = 5  # bumped when blas_probe.py measures differently
CACHE_FILE = "blas.json"
CACHE_ENTRIES = 8
CALIBRATE_HINT = "not yet timed against BLIS here, see mlxgpt info --calibrate"
# BLIS is chosen when it multiplies one row (decoding) at least DECODE_WIN times faster and the
# many-row products (prompts, training) at most ROWS_SLACK times slower. On a Zen 3 the probe
# gave BLIS decode 1.29-1.38x, prefill 0.91-0.96x (and once 1.16x: it is noisy), training
# 1.01-1.03x; whole GPT-2 124M runs there: decoding 1.33-1.57x faster with BLIS, prompts 1-3%
# slower, training the same. A prompt product's loss shows at a third of its size or less in a
# whole prefill, a decoding gain at its full size or more (the output head is one-row too).
DECODE_WIN, ROWS_SLACK = 1.10, 1.15
ROW_PRODUCTS = ("rows4", "prefill", "train")  # blas_probe.PRODUCTS with more than one row


def prefer_blis(openblas: Mapping[str, float], blis: Mapping[str, float]) -> bool:
    """Whether BLIS wins on seconds per product (``blas_probe.PRODUCTS``) by the rule above."""
    return (blis["decode"] * DECODE_WIN <= openblas["decode"]
            and all(blis[k] <= openblas[k] * ROWS_SLACK for k in ROW_PRODUCTS))


def library_settings(library: str, env: Mapping[str, str],
                     flags: frozenset[str]) -> tuple[dict[str, str], list[str]]:
    """The variables mlxgpt sets before loading ``library`` (the environment's own are kept; they
    are read once, when the library loads), and notes saying so."""
    new: dict[str, str] = {}
    notes: list[str] = []
    if library == "OpenBLAS":
        forced, best = env.get(CORETYPE_ENV), best_kernel_set(flags)
        if best and (forced is None or not runs_on(forced, flags)):
            # unset, or a set this CPU cannot run (it would stop the process with SIGILL)
            new[CORETYPE_ENV] = best
            notes.append(f"{CORETYPE_ENV}={best}"
                         + (f" instead of {forced}, which this CPU cannot run" if forced else ""))
        if TIMEOUT_ENV not in env:
            new[TIMEOUT_ENV] = THREAD_TIMEOUT
            notes.append(f"{TIMEOUT_ENV}={THREAD_TIMEOUT}")
    return new, notes


def _probe(path: str, env: dict[str, str], threads: int) -> dict[str, float]:
    script = Path(__file__).with_name("blas_probe.py")
    run = subprocess.run([sys.executable, str(script), path, str(threads)], env=env,
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise OSError((run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1])
    return json.loads(run.stdout)


def measured_choice(paths: Mapping[str, str], env: Mapping[str, str], flags: frozenset[str],
                    *, cached_only: bool = False, fresh: bool = False) -> tuple[str, str]:
    """OpenBLAS or BLIS, whichever :func:`prefer_blis` finds faster on this machine, and why:
    inherited from the parent process, read from the cache, or measured now and cached (with
    ``cached_only``: OpenBLAS until it is cached; with ``fresh``: measured again)."""
    inherited = env.get(MEASURED_ENV)
    if inherited in paths:
        return inherited, "as the parent process chose"
    threads = _whole(env.get("OPENBLAS_NUM_THREADS")) or cpu_cores()
    files = {name: os.stat(p) for name, p in paths.items()}
    key = {"version": PROBE_VERSION, "cpu": cpu_model(), "threads": threads,
           "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
           "libraries": {n: [os.path.realpath(paths[n]), f.st_size, f.st_mtime_ns]
                         for n, f in files.items()},
           "env": {v: env.get(v) for v in (CORETYPE_ENV, *BLIS_PACK_ENVS)}}

    def measure() -> dict:  # a process per library (blas_probe.py)
        times = {name: _probe(p, {**env, **library_settings(name, env, flags)[0]}, threads)
                 for name, p in paths.items()}
        return {"times": times,
                "choice": "BLIS" if prefer_blis(times["OpenBLAS"], times["BLIS"]) else "OpenBLAS"}

    def read(entry: dict) -> dict:
        if entry["choice"] not in paths or not {"OpenBLAS", "BLIS"} <= entry["times"].keys():
            raise ValueError("not this machine's libraries")
        return entry

    cache = cache_root() / CACHE_FILE
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if cached_only:
        entry = _saved_entry(cache, digest, read)
        if entry is None:
            return "OpenBLAS", CALIBRATE_HINT
    else:
        try:  # one entry per setting (thread count, libraries...), the latest few
            entry = cached_json(cache, digest, read, measure, keep=CACHE_ENTRIES, fresh=fresh)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            return "OpenBLAS", f"timing the libraries failed ({e})"
    times = entry["times"]
    ratio = {k: times["OpenBLAS"][k] / times["BLIS"][k] for k in ("decode", *ROW_PRODUCTS)}
    shown = ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
    return entry["choice"], f"measured here (BLIS vs OpenBLAS speed: {shown}; {cache})"


def _saved_entry(path: Path, key: str, read: Callable[[dict], dict]) -> dict | None:
    """The cached entry under ``key``, read as :func:`cached_json` would, without its lock (the
    file is replaced atomically) and without measuring: None when there is none."""
    try:
        return read(json.loads(path.read_text(encoding="utf-8"))[key])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def calibrate() -> str:
    """Time OpenBLAS against BLIS now, where both are installed and nothing names one, and cache
    the choice for later processes (``mlxgpt info --calibrate``); say what was found."""
    if not sys.platform.startswith("linux"):
        return "nothing to time on this platform"
    env = {k: v for k, v in (_env_before or os.environ).items()
           if k != MEASURED_ENV}  # time, not inherit
    flags = cpu_flags()
    paths = {"OpenBLAS": find_openblas(), "BLIS": find_blis()}
    timed: list[str] = []

    def measure() -> tuple[str, str]:
        timed.append("yes")
        return measured_choice(paths, env, flags, fresh=True)  # type: ignore[arg-type]

    library, why = choose_library(paths["OpenBLAS"], paths["BLIS"], env, flags, measure)
    if not timed:
        return f"nothing to time: {library or 'no BLAS'} ({why or 'chosen without timing'})"
    later = "" if library == preloaded_library else " (from the next process on)"
    return f"{library}{later}: {why}"


def preload() -> None:
    """Load the chosen BLAS globally if we are on Linux, mlx is not imported yet, and not
    disabled."""
    global preloaded_path, preloaded_library, preload_note, config_error, _handle, _env_before
    if not sys.platform.startswith("linux"):
        preload_note = "not needed on this platform"
        return
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        preload_note = f"disabled by {DISABLE_ENV}"
        return
    if "mlx.core" in sys.modules:
        preload_note = "mlx was imported before mlxgpt; preload skipped"
        return
    env = dict(os.environ)
    _env_before = dict(env)
    if env.get(LIBRARY_ENV, "auto").lower() not in ("auto", "openblas", "blis"):
        config_error = f"{LIBRARY_ENV}={env[LIBRARY_ENV]!r}: choose openblas, blis or auto"
        env[LIBRARY_ENV] = "auto"
    flags = cpu_flags()
    paths = {"OpenBLAS": find_openblas(), "BLIS": find_blis()}
    measured: list[str] = []

    def measure() -> tuple[str, str]:  # the cached choice only: no probe process at import
        measured.append("yes")
        return measured_choice(paths, env, flags, cached_only=True)  # type: ignore[arg-type]

    library, why = choose_library(paths["OpenBLAS"], paths["BLIS"], env, flags, measure)
    if library is None:
        wanted = env.get(LIBRARY_ENV, "auto").lower()
        if wanted != "auto":
            hint = BLIS_HINT if wanted == "blis" else INSTALL_HINT
            config_error = f"{LIBRARY_ENV}={env[LIBRARY_ENV]}: {why} (install: {hint})"
        preload_note = why
        return
    if measured:  # the processes this one starts choose as it did
        os.environ[MEASURED_ENV] = library
    settings, notes = library_settings(library, os.environ, flags)
    os.environ.update(settings)
    chosen = ([why] if why else []) + notes
    path = paths[library]
    try:
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        preload_note = f"failed to load {path}: {e}"
        return
    preloaded_path, preloaded_library = path, library
    if library == "BLIS" and not any(v in os.environ for v in BLIS_THREAD_ENVS):
        # BLIS runs on one thread unless told; OpenBLAS takes every core, or the count asked of it
        n = _whole(os.environ.get("OPENBLAS_NUM_THREADS")) or cpu_cores()
        _set_threads(n)
        chosen.append(f"{n} thread{'s' * (n > 1)}")
    preload_note = "preloaded by mlxgpt" + "".join(f", {c}" for c in chosen)


def _whole(text: str | None) -> int | None:
    try:
        return max(1, int(text)) if text else None
    except ValueError:
        return None


def blas_threads() -> int | None:
    """How many threads the preloaded BLAS uses."""
    if _handle is None:
        return None
    try:
        if preloaded_library == "BLIS":
            _handle.bli_thread_get_num_threads.restype = ctypes.c_int64
            return int(_handle.bli_thread_get_num_threads())
        return int(_handle.openblas_get_num_threads())
    except AttributeError:
        return None


def _set_threads(n: int) -> None:
    if preloaded_library == "BLIS":
        _handle.bli_thread_set_num_threads(ctypes.c_int64(n))
    else:
        _handle.openblas_set_num_threads(n)


def openblas_core() -> str | None:
    """The kernel set the preloaded OpenBLAS chose ("Haswell" = AVX2, "SkylakeX" = AVX-512)."""
    if _handle is None or preloaded_library != "OpenBLAS":
        return None
    try:
        _handle.openblas_get_corename.restype = ctypes.c_char_p
        return _handle.openblas_get_corename().decode()
    except AttributeError:
        return None


def blis_arch() -> str | None:
    """The kernel family the preloaded BLIS chose for this CPU ("zen3", "skx", "haswell"...)."""
    if _handle is None or preloaded_library != "BLIS":
        return None
    try:
        _handle.bli_arch_string.restype = ctypes.c_char_p
        return _handle.bli_arch_string(_handle.bli_arch_query_id()).decode()
    except AttributeError:
        return None


def _blis_packs() -> bool:
    """Whether mlxgpt decides BLIS's packing (the environment does when it sets it; BLIS
    releases before 0.8 have no switch)."""
    return (preloaded_library == "BLIS" and hasattr(_handle, "bli_pack_set_pack_a")
            and not any(v in os.environ for v in BLIS_PACK_ENVS))


_packing = False  # whether mlxgpt has BLIS packing both operands now (inside threads(1))


def _set_packing(on: bool) -> None:
    global _packing
    _handle.bli_pack_set_pack_a(ctypes.c_bool(on))
    _handle.bli_pack_set_pack_b(ctypes.c_bool(on))
    _packing = on


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with the preloaded BLAS on ``n`` threads (``None``: leave it as it is);
    BLIS on one thread packs both operands (see :data:`BLIS_PACK_ENVS`), on more it does not
    (packed products of a few rows on two threads took 4-35x longer). Blocks nest: each
    restores the thread count and packing it found."""
    before = None if n is None else blas_threads()
    if before is None:
        yield
        return
    pack, was = n == 1 and _blis_packs(), _packing
    _set_threads(n)
    if pack != was:
        _set_packing(pack)
    try:
        yield
    finally:
        if pack != was:
            _set_packing(was)
        _set_threads(before)


def kernels_note() -> str | None:
    """The BLAS kernels in use, and, when they are weaker than the CPU allows (an
    OPENBLAS_CORETYPE set by hand, which is kept), what that costs and how to get the best."""
    n = blas_threads()
    threads = f", {n} thread{'s' * (n > 1)}" if n else ""
    arch = blis_arch()
    if arch is not None:
        packing = "; training packs both operands (one thread)" if _blis_packs() else ""
        return f"BLIS {arch} (chosen by BLIS from the CPU){threads}{packing}"
    core = openblas_core()
    if core is None:
        return None
    best = best_kernel_set()
    note = core + threads
    if best is None or kernel_level(core) >= kernel_level(best):
        return note
    have, want = MEASURED_GFLOPS.get(core), MEASURED_GFLOPS.get(best)
    cost = (f" (1024^3 sgemm on one Xeon core: {have} vs {want} GFLOP/s, {want / have:.1f}x)"
            if have and want else "")
    how = (f"unset {CORETYPE_ENV} (now {os.environ[CORETYPE_ENV]}) or set it to {best}"
           if os.environ.get(CORETYPE_ENV) else f"set {CORETYPE_ENV}={best}")
    other = (f"install BLIS ({BLIS_HINT}), which mlxgpt then uses" if find_blis() is None
             else f"unset {LIBRARY_ENV} (mlxgpt then uses BLIS)")
    return f"{note}; this CPU allows {best}, which multiplies faster{cost}: {how}, or {other}"


def blas_in_use() -> str:
    """A one-line description of the BLAS that MLX's CPU matmul resolves to in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    paths = [line.split()[-1] for line in maps.splitlines() if "/" in line]
    if preloaded_path is not None:
        real = os.path.realpath(preloaded_path)
        shown = next((p for p in paths if p == real), real)
        return f"{preloaded_library} {shown} ({preload_note})"
    for marker, name in (("libopenblas", "OpenBLAS"), ("libblis", "BLIS"), ("libmkl", "MKL")):
        found = next((p for p in paths if marker in p), None)
        if found:
            return f"{name} {found} (loaded by the environment (LD_PRELOAD?); {preload_note})"
    return f"MLX's bundled reference BLAS (slow; {preload_note}); install: {INSTALL_HINT}"


def training_threads(split: bool) -> contextlib.AbstractContextManager[None]:
    """A context for training: the BLAS on one thread while a batch is ``split`` over the cores
    (MLX streams or native worker threads), and BLIS
    on one thread always. BLIS 0.9's threads meet in a barrier they spin on without yielding, so
    beside MLX's dispatching thread (busy all through a training step) a descheduled one costs
    the others a whole time slice, many times a step: one stream of the baby config ran at
    180-7,300 tokens/s with two BLIS threads, 8,500-9,200 with one (AMD EPYC Zen 3, BLIS zen3;
    generation keeps two: prefill 440 vs 308 tokens/s, the dispatching thread waits there)."""
    return threads(1 if split or preloaded_library == "BLIS" else None)
