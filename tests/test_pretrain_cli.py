"""``mlxgpt pretrain`` end to end: a run, its outputs, config files, bad input, Ctrl-C, and the
model that ships with the project."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import mlxgpt
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.training.pretrain import PRESETS, resolve_settings

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--log-every", "1", "--quiet"]
CORPUS = ("ROMEO:\nBut soft, what light through yonder window breaks?\n"
          "It is the east, and Juliet is the sun.\n\n") * 30


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


@pytest.fixture
def pretrain(cli):
    """``mlxgpt pretrain`` of a tiny model, tokens cached under ``tmp_path``."""

    def run(tmp_path: Path, *args: str):
        return cli("pretrain", *TINY, "--cache-dir", tmp_path / "cache", *args)

    return run


def test_pretrain_writes_a_model_folder_mlxgpt_loads(tmp_path, corpus, pretrain):
    out = tmp_path / "run"
    r = pretrain(tmp_path, "--data", str(corpus), "--out", str(out), "--steps", "30",
                 "--eval-every", "15", "--lr", "3e-3", "--warmup", "3")
    assert r.exit_code == 0, r.output
    assert "done: 30 steps" in r.output
    for name in ("model/config.json", "model/model.safetensors", "last/optimizer.safetensors",
                 "last/trainer_state.json", "run.json", "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    model, tokenizer = mlxgpt.load(str(out / "model"))
    assert tokenizer.name == "byte" and model.config.n_embd == 32
    logits = model(mx.array([tokenizer.encode("ROMEO:")]))
    assert logits.shape == (1, 6, 257)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    assert sum("val_loss" in r for r in records) == 2
    # the tokenized corpus is cached and reused: same file, not rewritten
    cached = list((tmp_path / "cache").glob("*.bin"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    r = pretrain(tmp_path, "--data", str(corpus), "--out", str(tmp_path / "run2"),
                 "--steps", "2", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.bin")] == [
        mtime]


def test_a_folder_of_text_files(tmp_path, pretrain):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(CORPUS[:1500])
    (folder / "sub" / "b.txt").write_text(CORPUS[1500:])
    (folder / "notes.md").write_bytes(b"\xff ignored: not a .txt file")
    r = pretrain(tmp_path, "--data", str(folder), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    # two files, each followed by <|endoftext|>
    assert f"data: {len(CORPUS) + 2:,} tokens" in r.output


def test_settings_layering_preset_config_file_flags(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "small", "n-layer": 3, "lr": 5e-4, "steps": 7}))
    s = resolve_settings({"lr": 2e-4}, str(cfg))
    assert (s.n_layer, s.n_head, s.n_embd, s.block_size) == (3, 6, 384, 256)  # file > preset
    assert s.lr == 2e-4 and s.steps == 7  # flag > file
    assert s.dropout == PRESETS["small"]["dropout"]
    pytest.importorskip("yaml")
    y = tmp_path / "cfg.yaml"
    y.write_text("preset: nano\nbatch_size: 3\nmax-tokens: 1000\n")
    s = resolve_settings({}, str(y))
    assert (s.n_layer, s.block_size, s.batch_size) == (4, 64, 3)
    assert s.steps == 6  # ceil(1000 / (3 * 64))


def test_bad_config_files(tmp_path, cli, refused):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_layers": 3}')
    r = cli("pretrain", "--data", "x", "--out", str(tmp_path / "o"), "--config",
            str(bad))
    refused(r, "unknown setting(s) n_layers")
    bad.write_text("{oops")
    r = cli("pretrain", "--out", str(tmp_path / "o"), "--config", str(bad))
    refused(r, "not valid JSON")


def test_bad_corpora(tmp_path, refused, pretrain):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "run"
    refused(pretrain(tmp_path, "--data", str(empty), "--out", str(out)),
            "the corpus is empty")
    short = tmp_path / "short.txt"
    short.write_text("too short for one block")
    refused(pretrain(tmp_path, "--data", str(short), "--out", str(out)),
            "too small")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(CORPUS.encode() + "café".encode("latin-1"))
    refused(pretrain(tmp_path, "--data", str(latin1), "--out", str(out)),
            f"{latin1}: not UTF-8 text (byte 0xe9")
    refused(pretrain(tmp_path, "--data", str(tmp_path / "nope.txt"), "--out",
                     str(out)), "no such file or folder")
    (tmp_path / "nodir").mkdir()
    refused(pretrain(tmp_path, "--data", str(tmp_path / "nodir"), "--out", str(out)),
            "no .txt files")
    # nothing was half-written: no run folder content, no stray cache entries
    assert not any(out.glob("*/*"))
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_unwritable_out(tmp_path, corpus, refused, pretrain):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    refused(pretrain(tmp_path, "--data", str(corpus), "--out", str(blocker / "run")),
            "cannot write to")
    assert blocker.read_text() == "a file, not a folder"


def test_existing_run_and_bad_resume_lose_nothing(tmp_path, corpus, refused, pretrain):
    out = tmp_path / "run"
    r = pretrain(tmp_path, "--data", str(corpus), "--out", str(out), "--steps", "4",
                 "--eval-every", "2")
    assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a second run into the same folder is refused
    refused(pretrain(tmp_path, "--data", str(corpus), "--out", str(out)),
            "already exists")
    # resuming a finished run without more steps
    refused(pretrain(tmp_path, "--out", str(out), "--resume"), "already at step 4")
    # resuming a folder that is not a run / has no checkpoint
    refused(pretrain(tmp_path, "--out", str(tmp_path / "missing"), "--resume"),
            "cannot resume")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a corrupt checkpoint
    (out / "last" / "optimizer.safetensors").write_bytes(b"\x00garbage")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused(pretrain(tmp_path, "--out", str(out), "--resume", "--steps", "8"),
            "optimizer")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (out / "last" / "trainer_state.json").write_text("{")
    refused(pretrain(tmp_path, "--out", str(out), "--resume", "--steps", "8"),
            "corrupt")
    # the architecture of a run cannot change on resume
    refused(pretrain(tmp_path, "--out", str(out), "--resume", "--n-embd", "64"),
            "different n-embd")


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, corpus, pretrain):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mlxgpt", "pretrain", *TINY, "--cache-dir",
           str(tmp_path / "cache"), "--data", str(corpus), "--out", str(out), "--steps",
           "100000", "--eval-every", "0", "--save-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = out / "log.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
            time.sleep(0.2)
        assert log.exists(), proc.stderr.read() if proc.poll() is not None else "no log"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    step = state["step"]
    assert step >= 3 and "--resume" in stdout
    r = pretrain(tmp_path, "--out", str(out), "--resume", "--steps", str(step + 3))
    assert r.exit_code == 0, r.output
    assert f"resuming from {out / 'last'} at step {step}" in r.output
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == step + 3


# --------------------------------------------------------------------------- the shipped model


def shipped_model_dirs() -> list[Path]:
    import mlxgpt.models

    root = Path(mlxgpt.models.__file__).parent
    return sorted(p for p in root.iterdir() if (p / "config.json").is_file())


SHIPPED_PROMPTS = {"shakespeare": "ROMEO:\n", "english": "The history of"}


def test_the_shipped_model_loads_and_generates():
    dirs = shipped_model_dirs()
    assert dirs, "no model folder under models/"
    assert {d.name for d in dirs} >= {"shakespeare"}
    for folder in dirs:
        model, tokenizer = mlxgpt.load(str(folder))
        text = mlxgpt.generate(model, tokenizer, SHIPPED_PROMPTS.get(folder.name, "The "),
                               max_tokens=40, sampling=SamplingSettings(temperature=0.0))
        assert len(text) > 10
        # a trained model writes mostly letters and spaces, not noise
        letters = sum(c.isalpha() or c.isspace() or c in ",.;:'!?-" for c in text)
        assert letters / len(text) > 0.9, text
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 40e6  # the wheel stays tens of MB


def test_shipped_models_are_found_by_name_and_shakespeare_is_the_default():
    from mlxgpt.checkpoints.folder import shipped_model
    from mlxgpt.checkpoints.hub import resolve_source

    assert shipped_model().name == "shakespeare"
    for folder in shipped_model_dirs():
        assert resolve_source(folder.name) == folder


def test_shipped_model_files_are_package_data():
    """Every file of a shipped model folder matches pyproject's package-data patterns, so a
    non-editable install carries it."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["mlxgpt.models"]
    for folder in shipped_model_dirs():
        for f in folder.iterdir():
            rel = f"{folder.name}/{f.name}"
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_preset_sizes():
    assert {k: (v["n_layer"], v["n_head"], v["n_embd"], v["block_size"])
            for k, v in PRESETS.items()} == {"nano": (4, 4, 128, 64), "small": (6, 6, 384, 256),
                                              "gpt2": (12, 12, 768, 1024)}


def test_help_lists_every_option(cli):
    r = cli("pretrain", "--help")
    assert r.exit_code == 0
    for opt in ("--data", "--out", "--tokenizer", "--preset", "--n-layer", "--n-head",
                "--n-embd", "--block-size", "--batch-size", "--grad-accum", "--lr", "--min-lr",
                "--warmup", "--steps", "--max-tokens", "--weight-decay", "--grad-clip",
                "--dropout", "--eval-every", "--eval-batches", "--save-every",
                "--val-fraction", "--seed", "--resume", "--config"):
        assert opt in r.output, opt

