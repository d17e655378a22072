"""The training pass as an option (``--train-pass auto|native|mlx``), and what importing mlxgpt
does (the BLAS preload, nothing else: no probe process, no MLX setting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxgpt.cpu import blas, native
from mlxgpt.training import native_pass
from mlxgpt.training.native_pass import NATIVE_ENV, NativeGradients

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
        "--quiet"]
CORPUS = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40


@pytest.fixture
def native_calls(monkeypatch) -> list[int]:
    """Every call of the native pass (training steps and evaluation alike), counted."""
    calls: list[int] = []
    original = NativeGradients.sums

    def spy(self, batches, grads=True):
        calls.append(len(batches))
        return original(self, batches, grads)

    monkeypatch.setattr(NativeGradients, "sums", spy)
    return calls


@pytest.fixture
def pretrain(cli, tmp_path, monkeypatch):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")

    def run(name: str, *args: str):
        out = tmp_path / name
        r = cli("pretrain", "--data", corpus, "--out", out, "--cache-dir", tmp_path / "cache",
                *TINY, *args)
        return r, out

    return run


def pass_lines(output: str) -> list[str]:
    return [x for x in output.splitlines() if x.startswith("training pass:")]


def recorded_pass(checkpoint: Path) -> str:
    return json.loads((checkpoint / "trainer_state.json").read_text())["compute"]["train_pass"]


def test_each_choice_prints_its_line_and_takes_that_pass(pretrain, native_calls, monkeypatch):
    """auto and native train through the native pass (steps and validation), mlx never
    touches it; each run says so in one line and its checkpoint records it."""
    expected = {"auto": ("native", "training pass: native (CPU, float32 GPT-2, C library "
                                   "built)"),
                "native": ("native", "training pass: native (CPU, float32 GPT-2, C library "
                                     "built; --train-pass native)"),
                "mlx": ("mlx", "training pass: MLX's graph (--train-pass mlx)")}
    for choice, (name, line) in expected.items():
        native_calls.clear()
        r, out = pretrain(choice, "--train-pass", choice)
        assert r.exit_code == 0, r.output
        assert pass_lines(r.output) == [line], r.output
        assert recorded_pass(out / "last") == name
        assert json.loads((out / "run.json").read_text())["train_pass"] == choice
        # two training steps and one validation pass through C, or none at all
        assert len(native_calls) == (3 if name == "native" else 0), (choice, native_calls)


def test_the_variable_sets_what_auto_means_and_the_option_wins(pretrain, native_calls,
                                                             monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "0")
    r, out = pretrain("env-auto")
    assert pass_lines(r.output) == [f"training pass: MLX's graph ({NATIVE_ENV}=0)"], r.output
    assert recorded_pass(out / "last") == "mlx" and not native_calls
    r, out = pretrain("env-native", "--train-pass", "native")
    assert r.exit_code == 0, r.output
    assert recorded_pass(out / "last") == "native" and native_calls


def test_a_resumed_run_keeps_its_pass_unless_told(pretrain, native_calls):
    r, out = pretrain("run", "--train-pass", "mlx")
    assert r.exit_code == 0, r.output
    r, _ = pretrain("run", "--resume", "--steps", "3")
    assert r.exit_code == 0, r.output
    assert pass_lines(r.output) == ["training pass: MLX's graph (--train-pass mlx)"]
    assert recorded_pass(out / "last") == "mlx" and not native_calls
    r, _ = pretrain("run", "--resume", "--steps", "4", "--train-pass", "native")
    assert r.exit_code == 0, r.output
    assert "train_pass mlx -> native" in r.output  # rounds differently: said
    assert recorded_pass(out / "last") == "native" and native_calls


def test_native_where_it_cannot_build_is_one_line(pretrain, refused, monkeypatch, tmp_path):
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path / "no-cc"))
    monkeypatch.setenv("CC", "false")
    native.library_path.cache_clear()
    native._loaded.cache_clear()
    try:
        r, out = pretrain("auto")
        assert r.exit_code == 0, r.output
        (line,) = pass_lines(r.output)
        assert line.startswith("training pass: MLX's graph (") and "could not build" in line
        assert recorded_pass(out / "last") == "mlx"
        r, out = pretrain("native", "--train-pass", "native")
        error = refused(r, "--train-pass native, but the native training pass cannot run")
        assert "could not build" in error
        assert not out.exists()  # refused before anything was written
    finally:
        native.library_path.cache_clear()
        native._loaded.cache_clear()


def test_a_bad_pass_in_a_config_file_is_one_line(pretrain, refused, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train-pass": "fast"}))
    r, _ = pretrain("bad", "--config", str(config))
    refused(r, "train-pass must be auto, native, mlx, not 'fast'")


@pytest.fixture
def finetune(cli, tmp_path, model_folder, monkeypatch):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    model = model_folder(tmp_path, name="model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{k}:", "completion": f" {v}"}) + "\n"
                            for k, v in [("sky", "blue"), ("grass", "green")] * 12))

    def run(name: str, *args: str):
        out = tmp_path / name
        r = cli("finetune", "--model", model, "--data", data, "--out", out, "--steps", "2",
                "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1", *args)
        return r, out

    return run


def test_finetune_names_why_lora_takes_mlx_and_refuses_native(finetune, native_calls, refused):
    r, out = finetune("lora")
    assert r.exit_code == 0, r.output
    assert pass_lines(r.output) == [
        "training pass: MLX's graph (LoRA adapters: the native pass trains every weight of a "
        "plain float32 GPT-2 only)"], r.output
    assert recorded_pass(out / "last") == "mlx" and not native_calls
    r, out = finetune("lora-native", "--train-pass", "native")
    refused(r, "--train-pass native, but the native training pass cannot run: LoRA adapters")
    assert not out.exists()


def test_full_finetune_takes_the_pass_asked_for(finetune, native_calls):
    r, out = finetune("full-auto", "--full")
    assert r.exit_code == 0, r.output
    assert pass_lines(r.output) == ["training pass: native (CPU, float32 GPT-2, C library "
                                    "built)"], r.output
    assert recorded_pass(out / "last") == "native" and native_calls
    native_calls.clear()
    r, out = finetune("full-mlx", "--full", "--train-pass", "mlx")
    assert r.exit_code == 0, r.output
    assert pass_lines(r.output) == ["training pass: MLX's graph (--train-pass mlx)"], r.output
    assert recorded_pass(out / "last") == "mlx" and not native_calls


def test_why_the_native_pass_does_not_apply(tiny_model, monkeypatch):
    """The reasons a run prints, one per kind of model it cannot train."""
    from mlxgpt.checkpoints.quantize import quantize
    from mlxgpt.training.loss import lm_loss

    monkeypatch.delenv(NATIVE_ENV, raising=False)
    choose = native_pass.choose_train_pass
    assert choose(tiny_model(), lm_loss).name == "native"
    half = tiny_model()
    half.set_dtype(mx.float16)
    assert choose(half, lm_loss).why.startswith("float16 weights: ")
    quantized = tiny_model()
    quantize(quantized, bits=4, group_size=32)
    assert choose(quantized, lm_loss).why.startswith("quantized weights: ")
    assert choose(tiny_model(), lm_loss, "mlx").why == "--train-pass mlx"
    # evaluation never refuses: it takes MLX's graph where the pass cannot run
    assert choose(half, lm_loss, "native", training=False).name == "mlx"


# --------------------------------------------------------------------------- import mlxgpt

SPAWNS = ("subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.posix_spawn",
          "os.spawn", "os.exec")
IMPORT = f"""
import json, os, sys, time
spawned = []
sys.addaudithook(lambda event, args: spawned.append(event) if event in {SPAWNS!r} else None)
start = time.perf_counter()
import mlxgpt
seconds = time.perf_counter() - start
from mlxgpt.cpu import blas
print(json.dumps({{"spawned": spawned, "seconds": seconds, "library": blas.preloaded_library,
                  "note": blas.preload_note, "bfs": os.environ.get("MLX_BFS_MAX_WIDTH")}}))
"""


def test_import_mlxgpt_only_preloads_the_blas(tmp_path):
    """A fresh cache folder: the BLAS is still preloaded where one is installed, but no probe
    process is started to time the libraries, nothing is written, MLX is not configured."""
    env = {k: v for k, v in (blas._env_before or os.environ).items()
           if k not in (blas.MEASURED_ENV, "MLX_BFS_MAX_WIDTH")}
    env["MLXGPT_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run([sys.executable, "-c", IMPORT], env=env, capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["spawned"] == [], got
    assert not (tmp_path / "cache").exists()  # no measurement cached, no lock file
    assert got["bfs"] is None  # the training code sets it, when imported
    assert got["seconds"] < 4, got  # timing the libraries alone takes 2.5 s or more
    if sys.platform.startswith("linux") and blas.find_openblas():
        assert got["library"] in ("OpenBLAS", "BLIS"), got
    if blas.find_openblas() and blas.find_blis() and blas.best_kernel_set():
        assert got["library"] == "OpenBLAS" and blas.CALIBRATE_HINT in got["note"], got


def test_the_training_code_configures_mlx_when_imported():
    code = ("import os, mlxgpt; assert 'MLX_BFS_MAX_WIDTH' not in os.environ; "
            "import mlxgpt.training.loop; print(os.environ['MLX_BFS_MAX_WIDTH'])")
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "200"


def fake_libraries(tmp_path: Path, monkeypatch) -> tuple[dict[str, str], list[str]]:
    """OpenBLAS and BLIS files that a fake probe times (BLIS decodes twice as fast)."""
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path / "cache"))
    paths = {}
    for name in ("OpenBLAS", "BLIS"):
        paths[name] = str(tmp_path / f"lib{name.lower()}.so")
        Path(paths[name]).write_bytes(b"x")
    probed: list[str] = []

    def probe(path, env, threads):
        probed.append(path)
        return {"decode": 2.0 if "openblas" in path else 1.0, "rows4": 1.0, "prefill": 1.0,
                "train": 1.0}

    monkeypatch.setattr(blas, "_probe", probe)
    return paths, probed


def test_the_preload_reads_the_cached_choice_and_never_times(tmp_path, monkeypatch):
    paths, probed = fake_libraries(tmp_path, monkeypatch)
    flags = frozenset({"avx", "avx2", "fma"})
    assert blas.measured_choice(paths, {}, flags, cached_only=True) == (
        "OpenBLAS", blas.CALIBRATE_HINT)
    assert not probed and not (tmp_path / "cache").exists()
    assert blas.measured_choice(paths, {}, flags)[0] == "BLIS" and len(probed) == 2
    choice, why = blas.measured_choice(paths, {}, flags, cached_only=True)
    assert choice == "BLIS" and why.startswith("measured here") and len(probed) == 2


def test_calibrate_times_the_libraries_again_and_caches_the_choice(tmp_path, monkeypatch):
    paths, probed = fake_libraries(tmp_path, monkeypatch)
    monkeypatch.setattr(blas, "find_openblas", lambda: paths["OpenBLAS"])
    monkeypatch.setattr(blas, "find_blis", lambda: paths["BLIS"])
    monkeypatch.setattr(blas, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    monkeypatch.setattr(blas, "_env_before", {blas.MEASURED_ENV: "OpenBLAS"})  # not inherited
    monkeypatch.setattr(blas, "preloaded_library", "OpenBLAS")
    line = blas.calibrate()
    assert line.startswith("BLIS (from the next process on): measured here"), line
    assert len(probed) == 2
    assert blas.calibrate().startswith("BLIS") and len(probed) == 4  # timed again, not read
    cached = blas.measured_choice(paths, {}, frozenset({"avx", "avx2", "fma"}),
                                  cached_only=True)
    assert cached[0] == "BLIS" and len(probed) == 4
    monkeypatch.setattr(blas, "_env_before", {blas.LIBRARY_ENV: "openblas"})
    assert blas.calibrate() == "nothing to time: OpenBLAS (named by MLXGPT_BLAS)"
    assert len(probed) == 4


def test_info_calibrate_says_what_it_found(cli_ok, monkeypatch):
    monkeypatch.setattr(blas, "calibrate", lambda: "BLIS: measured here (stub)")
    lines = cli_ok("info", "--calibrate").output.splitlines()
    assert lines[0] == "calibrated  BLIS: measured here (stub)"
