"""Data-parallel pretraining: two processes under ``mlx.launch`` (ring backend on 127.0.0.1)
against one process with the same global batch.

Tolerances: per-step losses 1e-5 and final weights 1e-5 (absolute). Two processes sum their
halves' gradients in a different order than one process does, so results agree to float32
rounding, not bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# mlx.launch comes with mlx, next to this interpreter (a virtual environment need not be on PATH).
_BESIDE = Path(sys.executable).parent / "mlx.launch"
LAUNCH = str(_BESIDE) if _BESIDE.is_file() else shutil.which("mlx.launch")
pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not installed")]

CORPUS = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\n"
          "Or close the wall up with our English dead.\n\n") * 40
# Constant learning rate: a run stopped at step 3 and resumed to 6 follows the same schedule.
ARGS = ["pretrain", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "8", "--eval-batches", "2", "--eval-every", "3", "--log-every", "1",
        "--lr", "3e-3", "--min-lr", "3e-3", "--warmup", "0", "--quiet"]


def run(tmp_path: Path, out: str, *extra: str, procs: int = 1, port: int = 32323) -> str:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    return launch([*ARGS, "--data", str(corpus), "--out", str(tmp_path / out),
                   "--cache-dir", str(tmp_path / "cache"), *extra], procs, port).stdout


def launch(args: list[str], procs: int, port: int) -> subprocess.CompletedProcess:
    """``python -m mlxgpt ARGS``, under ``mlx.launch -n procs`` (ring on 127.0.0.1) if procs > 1."""
    cmd = [sys.executable, "-m", "mlxgpt", *args]
    if procs > 1:
        cmd = [LAUNCH, "-n", str(procs), "--backend", "ring", "--starting-port", str(port),
               "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def losses(tmp_path: Path, out: str) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (tmp_path / out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in records]


def weights(tmp_path: Path, out: str) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(tmp_path / out / "last" /
                                                   "model.safetensors")).items()}


def test_two_processes_train_like_one(tmp_path):
    out1 = run(tmp_path, "one", "--steps", "6")
    out2 = run(tmp_path, "two", "--steps", "6", procs=2)
    assert out1.count("done:") == 1 and out2.count("done:") == 1  # rank 0 reports alone
    one, two = losses(tmp_path, "one"), losses(tmp_path, "two")
    assert [s for s, _ in one] == [s for s, _ in two]  # one log, written once
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=0, atol=1e-5)
    w1, w2 = weights(tmp_path, "one"), weights(tmp_path, "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)
    state = json.loads((tmp_path / "two" / "last" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["tokens"] == 6 * 8 * 16


def test_resume_under_two_processes(tmp_path):
    run(tmp_path, "straight", "--steps", "6", procs=2, port=32423)
    run(tmp_path, "resumed", "--steps", "3", procs=2, port=32523)
    run(tmp_path, "resumed", "--steps", "6", "--resume", procs=2, port=32623)
    np.testing.assert_allclose([v for _, v in losses(tmp_path, "resumed")],
                               [v for _, v in losses(tmp_path, "straight")], rtol=0, atol=1e-6)


def test_batch_that_does_not_divide_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", "32723", "--",
           sys.executable, "-m", "mlxgpt", *ARGS, "--batch-size", "7", "--steps", "2",
           "--data", str(corpus), "--out", str(tmp_path / "odd"), "--cache-dir",
           str(tmp_path / "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    text = done.stdout + done.stderr
    assert "does not divide across 2 processes" in text, text
    assert "Traceback" not in text
    assert not (tmp_path / "odd" / "last").exists()


def test_lora_finetune_two_processes_like_one(tmp_path):
    """mlxgpt finetune under mlx.launch: same losses and adapter as one process; rank 0 writes."""
    run(tmp_path, "base", "--steps", "2")
    data = tmp_path / "sft"
    data.mkdir()
    lines = [json.dumps({"prompt": f"word {w}:", "completion": f" {w[::-1]}"})
             for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")]
    (data / "train.jsonl").write_text("\n".join(lines * 4) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[:4]) + "\n")

    def finetune(out: str, procs: int, port: int) -> str:
        done = launch(["finetune", "--model", str(tmp_path / "base" / "model"),
                       "--data", str(data), "--out", str(tmp_path / out), "--mask-prompt",
                       "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--min-lr", "1e-2",
                       "--warmup", "0", "--eval-every", "2", "--eval-batches", "1",
                       "--log-every", "1", "--seed", "3"], procs, port)
        return done.stdout + done.stderr

    out1 = finetune("ft1", 1, 0)
    out2 = finetune("ft2", 2, 32723)
    assert out1.count("trainable parameters") == 1 and out2.count("trainable parameters") == 1
    np.testing.assert_allclose([v for _, v in losses(tmp_path, "ft2")],
                               [v for _, v in losses(tmp_path, "ft1")], rtol=0, atol=1e-5)
    a1 = mx.load(str(tmp_path / "ft1" / "adapters.safetensors"))
    a2 = mx.load(str(tmp_path / "ft2" / "adapters.safetensors"))
    assert a1.keys() == a2.keys()
    for k in a1:
        np.testing.assert_allclose(np.array(a2[k]), np.array(a1[k]), rtol=0, atol=1e-5, err_msg=k)
