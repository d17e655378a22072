"""``mlxgpt info`` and the BLAS preload it reports."""

import os
import sys
from pathlib import Path

import pytest

from mlxgpt.cpu import blas


@pytest.fixture
def info(mlxgpt_process):
    """``mlxgpt info`` in a fresh process (the BLAS preload happens at import)."""

    def run(unset: tuple[str, ...] = (), **env: str) -> str:
        base = {k: v for k, v in os.environ.items() if k not in unset}
        p = mlxgpt_process("info", env={**base, **env}, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    return run


def test_info_names_versions_device_and_blas(info):
    out = info()
    for key in ("mlxgpt", "mlx", "device", "backend", "blas", "model ops"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), out


@pytest.mark.skipif(blas.find_openblas() is None or not sys.platform.startswith("linux"),
                    reason="needs Linux with OpenBLAS installed")
def test_preload_is_used_and_can_be_turned_off(info):
    line = next(x for x in info().splitlines() if x.startswith("blas"))
    assert line.split()[1] in ("OpenBLAS", "BLIS") and "preloaded by mlxgpt" in line
    off = info(MLXGPT_NO_BLAS_PRELOAD="1")
    line = next(line for line in off.splitlines() if line.startswith("blas"))
    assert "reference BLAS" in line and "disabled by MLXGPT_NO_BLAS_PRELOAD" in line
    assert blas.INSTALL_HINT in line


def test_the_best_kernel_set_follows_the_cpu_flags():
    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    assert blas.best_kernel_set(frozenset(avx512 | {"avx2", "fma", "avx"})) == "SkylakeX"
    assert blas.best_kernel_set(frozenset({"avx512f", "avx2", "fma", "avx"})) == "Haswell"
    assert blas.best_kernel_set(frozenset({"avx2", "fma", "avx"})) == "Haswell"
    assert blas.best_kernel_set(frozenset({"avx", "sse4_2"})) == "SandyBridge"
    assert blas.best_kernel_set(frozenset({"sse4_2", "pni"})) is None  # OpenBLAS decides
    assert blas.best_kernel_set(frozenset()) is None  # not x86 (or no /proc/cpuinfo)


needs_openblas = pytest.mark.skipif(
    blas.find_openblas() is None or blas.best_kernel_set() is None,
    reason="needs Linux x86 with OpenBLAS installed")


@needs_openblas
def test_unset_coretype_gets_the_best_kernels_the_cpu_allows(info):
    out = info(unset=(blas.CORETYPE_ENV,), **{blas.LIBRARY_ENV: "openblas"})
    kernels = next(line for line in out.splitlines() if line.startswith("kernels"))
    assert kernels.split()[1].rstrip(",") == blas.best_kernel_set(), out
    assert "this CPU allows" not in kernels
    assert f"{blas.CORETYPE_ENV}={blas.best_kernel_set()}" in out
    assert f"{blas.TIMEOUT_ENV}={blas.THREAD_TIMEOUT}" in out  # idle threads do not spin


@needs_openblas
def test_weaker_kernels_set_by_hand_are_kept_and_the_fix_is_named(info):
    out = info(**{blas.CORETYPE_ENV: "Prescott", blas.LIBRARY_ENV: "openblas"})
    kernels = next(line for line in out.splitlines() if line.startswith("kernels"))
    assert kernels.split()[1].rstrip(",").lower() == "prescott"  # the environment's choice
    assert f"this CPU allows {blas.best_kernel_set()}" in kernels
    assert f"unset {blas.CORETYPE_ENV} (now Prescott)" in kernels


def test_training_streams_follow_the_cores_and_the_override(info, mlxgpt_process):
    from mlxgpt.cpu import parallel

    line = next(x for x in info().splitlines() if x.startswith("training"))
    cores = parallel.cpu_cores()
    assert line.split()[1] == str(cores), line
    assert info(MLXGPT_CPU_STREAMS="1").count("1 CPU stream ") == 1
    bad = mlxgpt_process("info", env={**os.environ, "MLXGPT_CPU_STREAMS": "two"}, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "Error: MLXGPT_CPU_STREAMS must be a whole number, not 'two'"]


def test_blas_library_choice_follows_the_environment_and_the_cpu():
    avx2 = frozenset({"avx", "avx2", "fma"})
    avx512 = avx2 | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    ob, bl = "/x/libopenblas.so.0", "/x/libblis.so.4"
    core = blas.CORETYPE_ENV
    choose = blas.choose_library
    # OpenBLAS with the kernels mlxgpt chooses, or with the best ones forced: OpenBLAS
    assert choose(ob, bl, {}, avx2) == ("OpenBLAS", "")
    assert choose(ob, bl, {core: "Haswell"}, avx2) == ("OpenBLAS", "")
    assert choose(ob, bl, {core: "Zen"}, avx2) == ("OpenBLAS", "")
    assert choose(ob, bl, {core: "SkylakeX"}, avx512) == ("OpenBLAS", "")
    # kernels weaker than the CPU allows, or ones it cannot run: BLIS, when installed
    assert choose(ob, bl, {core: "Prescott"}, avx2)[0] == "BLIS"
    assert "weaker than this CPU allows (SkylakeX)" in choose(ob, bl, {core: "Haswell"}, avx512)[1]
    assert "lacks" in choose(ob, bl, {core: "SkylakeX"}, avx2)[1]
    assert choose(ob, None, {core: "Prescott"}, avx2) == ("OpenBLAS", "")
    # only one installed; none; named by MLXGPT_BLAS
    assert choose(None, bl, {}, avx2) == ("BLIS", "no OpenBLAS found")
    assert choose(None, None, {}, avx2)[0] is None
    assert choose(ob, bl, {blas.LIBRARY_ENV: "blis"}, avx2)[0] == "BLIS"
    assert choose(ob, bl, {blas.LIBRARY_ENV: "openblas", core: "Prescott"}, avx2)[0] == "OpenBLAS"
    assert choose(ob, None, {blas.LIBRARY_ENV: "blis"}, avx2) == (None, "BLIS not found")


def test_the_library_is_measured_only_when_nothing_pins_one():
    avx2 = frozenset({"avx", "avx2", "fma"})
    ob, bl = "/x/libopenblas.so.0", "/x/libblis.so.4"
    calls = []

    def measure():
        calls.append(1)
        return "BLIS", "measured here"

    choose = blas.choose_library
    assert choose(ob, bl, {}, avx2, measure) == ("BLIS", "measured here")
    assert len(calls) == 1
    # named, OpenBLAS's kernels named (the best: OpenBLAS; weaker: BLIS stands in), only one
    # library, or a CPU without known kernel sets: nothing timed
    assert choose(ob, bl, {blas.LIBRARY_ENV: "openblas"}, avx2, measure)[0] == "OpenBLAS"
    assert choose(ob, bl, {blas.CORETYPE_ENV: "Haswell"}, avx2, measure) == ("OpenBLAS", "")
    assert "weaker" in choose(ob, bl, {blas.CORETYPE_ENV: "Prescott"}, avx2, measure)[1]
    assert choose(ob, None, {}, avx2, measure) == ("OpenBLAS", "")
    assert choose(ob, bl, {}, frozenset(), measure) == ("OpenBLAS", "")
    assert len(calls) == 1


def test_blis_must_decode_faster_and_multiply_rows_as_fast():
    o = {"decode": 1.0, "rows4": 1.0, "prefill": 1.0, "train": 1.0}
    assert blas.prefer_blis(o, {"decode": 0.7, "rows4": 1.0, "prefill": 1.1, "train": 0.9})
    assert not blas.prefer_blis(o, {"decode": 0.95, "rows4": 1.0, "prefill": 0.8, "train": 0.8})
    assert not blas.prefer_blis(o, {"decode": 0.5, "rows4": 1.0, "prefill": 1.25, "train": 1.0})
    assert not blas.prefer_blis(o, {"decode": 0.5, "rows4": 1.0, "prefill": 1.0, "train": 1.2})
    # a few rows far slower (BLIS 0.9 packing on two threads: 4-35x): OpenBLAS
    assert not blas.prefer_blis(o, {"decode": 0.5, "rows4": 20.0, "prefill": 1.0, "train": 1.0})


def test_the_measured_choice_is_cached_inherited_and_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path / "cache"))
    paths = {}
    for name in ("OpenBLAS", "BLIS"):
        paths[name] = str(tmp_path / f"lib{name.lower()}.so")
        Path(paths[name]).write_bytes(b"x")
    probed = []

    def probe(path, env, threads):
        probed.append((path, env))
        return {"decode": 2.0 if "openblas" in path else 1.0, "rows4": 1.0, "prefill": 1.0,
                "train": 1.0}

    monkeypatch.setattr(blas, "_probe", probe)
    flags = frozenset({"avx", "avx2", "fma"})
    choice, why = blas.measured_choice(paths, {}, flags)
    assert choice == "BLIS" and "decode 2.00x, rows4 1.00x, prefill 1.00x, train 1.00x" in why, why
    assert len(probed) == 2  # each library timed with the settings it would be loaded with
    envs = dict((p, e) for p, e in probed)
    assert envs[paths["OpenBLAS"]][blas.CORETYPE_ENV] == "Haswell"
    assert blas.CORETYPE_ENV not in envs[paths["BLIS"]]
    assert blas.measured_choice(paths, {}, flags)[0] == "BLIS" and len(probed) == 2  # cached
    Path(paths["BLIS"]).write_bytes(b"xy")  # a new library: measured again
    assert blas.measured_choice(paths, {}, flags)[0] == "BLIS" and len(probed) == 4
    one_thread = {"OPENBLAS_NUM_THREADS": "1"}  # another setting: measured and kept beside
    assert blas.measured_choice(paths, one_thread, flags)[0] == "BLIS" and len(probed) == 6
    assert blas.measured_choice(paths, {}, flags)[0] == "BLIS" and len(probed) == 6
    assert blas.measured_choice(paths, one_thread, flags)[0] == "BLIS" and len(probed) == 6
    inherited = {blas.MEASURED_ENV: "OpenBLAS"}  # a child process takes its parent's choice
    assert blas.measured_choice(paths, inherited, flags)[0] == "OpenBLAS" and len(probed) == 6

    def broken(path, env, threads):
        raise OSError("exit 1")

    monkeypatch.setattr(blas, "_probe", broken)
    choice, why = blas.measured_choice(paths, {"OPENBLAS_NUM_THREADS": "3"}, flags)
    assert choice == "OpenBLAS" and why == "timing the libraries failed (exit 1)"


def test_processes_started_together_measure_once(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path / "cache"))
    paths = {name: str(tmp_path / name) for name in ("OpenBLAS", "BLIS")}
    for p in paths.values():
        Path(p).write_bytes(b"x")
    probed = []

    def probe(path, env, threads):
        probed.append(path)
        time.sleep(0.2)
        return {"decode": 1.0, "rows4": 1.0, "prefill": 1.0, "train": 1.0}

    monkeypatch.setattr(blas, "_probe", probe)
    flags = frozenset({"avx", "avx2", "fma"})
    choices = []
    runs = [threading.Thread(target=lambda: choices.append(
        blas.measured_choice(paths, {}, flags)[0])) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert choices == ["OpenBLAS", "OpenBLAS"] and len(probed) == 2, probed


@pytest.mark.skipif(blas.find_openblas() is None or blas.find_blis() is None
                    or blas.best_kernel_set() is None,
                    reason="needs Linux x86 with OpenBLAS and BLIS installed")
def test_the_probe_times_each_installed_library():
    flags = blas.cpu_flags()
    for name, path in (("OpenBLAS", blas.find_openblas()), ("BLIS", blas.find_blis())):
        env = {**os.environ, **blas.library_settings(name, {}, flags)[0]}
        times = blas._probe(path, env, 1)
        assert set(times) == {"decode", "rows4", "prefill", "train"}, times
        assert all(0 < t < 1 for t in times.values()), (name, times)


@pytest.mark.skipif(blas.find_openblas() is None, reason="needs OpenBLAS installed")
def test_the_probe_multiplies_correctly_in_every_layout():
    import ctypes

    import numpy as np

    from mlxgpt.cpu import blas_probe, layout

    assert blas_probe.SMALL_GEMM_MNK == layout.SMALL_GEMM_MNK
    assert set(blas_probe.LAYOUTS) == set(layout.LAYOUTS)
    sgemm = ctypes.CDLL(blas.find_openblas(), mode=ctypes.RTLD_LOCAL).cblas_sgemm
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    for name in blas_probe.LAYOUTS:
        a, blocks, c = blas_probe.operands(3, 768, 3072, name, np.random.default_rng(0))
        assert len(blocks) == {"plain": 1, "one-block": 1, "blocks": 3}[name], name
        blas_probe.product(sgemm, a, blocks, c)()
        w = np.hstack([b.T if t else b for b, t, _ in blocks])  # (K, N)
        np.testing.assert_allclose(c, a @ w, rtol=1e-4, atol=1e-3, err_msg=name)


def test_kernel_sets_the_cpu_cannot_run_are_recognised():
    avx2 = frozenset({"avx", "avx2", "fma"})
    assert blas.runs_on("Haswell", avx2) and blas.runs_on("Prescott", avx2)
    assert not blas.runs_on("SkylakeX", avx2) and not blas.runs_on("Cooperlake", avx2)
    assert blas.runs_on("SkylakeX", frozenset())  # unknown CPU: OpenBLAS decides


def test_a_bad_blas_name_is_one_line(info, mlxgpt_process, refused):
    refused(mlxgpt_process("info", env={**os.environ, blas.LIBRARY_ENV: "atlas"}),
            f"{blas.LIBRARY_ENV}='atlas': choose openblas, blis or auto")


@pytest.mark.skipif(blas.find_openblas() is None or blas.find_blis() is None
                    or blas.best_kernel_set() is None,
                    reason="needs Linux x86 with OpenBLAS and BLIS installed")
def test_weak_kernels_forced_on_openblas_load_blis(info):
    out = info(**{blas.CORETYPE_ENV: "Prescott"})
    line = next(x for x in out.splitlines() if x.startswith("blas"))
    assert line.split()[1] == "BLIS" and "Prescott is weaker than this CPU allows" in line, out
    kernels = next(x for x in out.splitlines() if x.startswith("kernels"))
    assert "chosen by BLIS from the CPU" in kernels and "generic" not in kernels, kernels
    forced = info(**{blas.CORETYPE_ENV: "Prescott", blas.LIBRARY_ENV: "openblas"})
    assert "unset MLXGPT_BLAS (mlxgpt then uses BLIS)" in forced


class FakeBlis:
    """Records what mlxgpt asks of a BLIS library (threads, packing); its entry points are
    plain functions, as ctypes' are, so that mlxgpt can set their ``restype``."""

    def __init__(self):
        self.threads, self.pack_a, self.pack_b = 2, False, False

        def get_threads():
            return self.threads

        def set_threads(n):
            self.threads = n.value

        def pack_a(on):
            self.pack_a = on.value

        def pack_b(on):
            self.pack_b = on.value

        self.bli_thread_get_num_threads, self.bli_thread_set_num_threads = get_threads, set_threads
        self.bli_pack_set_pack_a, self.bli_pack_set_pack_b = pack_a, pack_b


def test_blis_packs_on_one_thread_only_and_nested_blocks_restore_it(monkeypatch):
    fake = FakeBlis()
    monkeypatch.setattr(blas, "_handle", fake)
    monkeypatch.setattr(blas, "preloaded_library", "BLIS")
    monkeypatch.setattr(blas, "_packing", False)
    for env in blas.BLIS_PACK_ENVS:
        monkeypatch.delenv(env, raising=False)
    state = lambda: (fake.threads, fake.pack_a, fake.pack_b)  # noqa: E731
    with blas.threads(1):  # training
        assert state() == (1, True, True)
        with blas.threads(1):  # a step inside a benchmark's training block
            assert state() == (1, True, True)
        assert state() == (1, True, True)  # still packing: the inner block found it so
        with blas.threads(2):  # generating a sample: never packed on two threads
            assert state() == (2, False, False)
        assert state() == (1, True, True)
    assert state() == (2, False, False)
    monkeypatch.setenv(blas.BLIS_PACK_ENVS[0], "0")  # the environment decides packing
    with blas.threads(1):
        assert state() == (1, False, False)
