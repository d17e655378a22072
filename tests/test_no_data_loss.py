"""Nothing is lost: ``--force`` replaces only what mlxgpt wrote, and only once the new output is
complete; no output may be an input; a kill between the renames of a replacement is recovered;
a failed write (disk full, no permission) is one line and leaves nothing half-written; a stopped
fine-tuning run is not published as finished; outputs follow the umask; killed writers'
temporaries are cleaned up.

Write failures are injected (the tests run as root, which writes through read-only modes).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxgpt.atomicio import MARKER, atomic_write_text, clean_leftovers
from mlxgpt.checkpoints.files import atomic_save_safetensors
from mlxgpt.data.examples import Batches

FAST = ["--batch-size", "4", "--eval-every", "0", "--log-every", "1", "--lr", "1e-3"]
PRETRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
            "--batch-size", "4", "--eval-batches", "1", "--log-every", "1", "--quiet"]
CORPUS = "It is the east, and Juliet is the sun.\n" * 40


@pytest.fixture(scope="module")
def base(tmp_path_factory, model_folder):
    """A tiny model folder, a JSONL file to fine-tune on, and a text corpus."""
    root = tmp_path_factory.mktemp("noloss")
    model = model_folder(root, name="model", n_embd=32)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{w}:", "completion": f" {w[::-1]}"}) + "\n"
                            for w in ["apple", "sky", "coal", "snow"] * 10))
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    return model, data, corpus


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory, cli_ok):
    model, data, _ = base
    out = tmp_path_factory.mktemp("adapter") / "ad"
    cli_ok("finetune", "--model", model, "--data", data, "--out", out, "--steps", 2, *FAST)
    return out


@pytest.fixture(scope="module")
def hf_source(base, tmp_path_factory, cli_ok):
    """A Hugging Face folder to convert (mlxgpt's own export: no torch needed)."""
    out = tmp_path_factory.mktemp("hf") / "hf"
    cli_ok("export", base[0], out)
    return out


def finetune_args(base, out, *more):
    model, data, _ = base
    return ["finetune", "--model", model, "--data", data, "--out", out, *FAST, *more]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- --force and inputs


@pytest.mark.parametrize("full", [False, True])
def test_out_equal_to_model_is_refused_before_anything_is_touched(base, tmp_path, cli, refused,
                                                                  full):
    own = tmp_path / "base"
    shutil.copytree(base[0], own)
    before = snapshot(own)
    r = cli(*finetune_args(base, own, "--steps", 1, "--force", *(["--full"] if full else [])),
            "--model", own)  # the last --model wins
    refused(r, f"--out {own} is --model {own}")
    assert snapshot(own) == before


def test_force_with_a_bad_model_keeps_the_previous_run(base, tmp_path, cli, cli_ok, refused):
    out = tmp_path / "run"
    cli_ok(*finetune_args(base, out, "--steps", 2))
    before = snapshot(out)
    r = cli(*finetune_args(base, out, "--steps", 2, "--force"), "--model", tmp_path / "nowhere")
    refused(r)
    assert snapshot(out) == before and not temporaries(tmp_path)
    # a good --force run replaces it once complete, and leaves no temporaries
    cli_ok(*finetune_args(base, out, "--steps", 3, "--force"))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 3
    assert (out / "adapters.safetensors").is_file() and not temporaries(tmp_path)


def full_disk_after(monkeypatch, n_saves: int) -> None:
    """``mx.save_safetensors`` fails with ENOSPC after its first ``n_saves`` calls."""
    real, calls = mx.save_safetensors, []

    def save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > n_saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)


def test_a_force_run_failing_after_its_first_checkpoint_keeps_the_old_run(
        base, tmp_path, cli, cli_ok, refused, monkeypatch):
    out = tmp_path / "run"
    cli_ok(*finetune_args(base, out, "--steps", 2))
    before = snapshot(out)
    full_disk_after(monkeypatch, 2)  # the first checkpoint: the adapter and the optimizer
    r = cli(*finetune_args(base, out, "--steps", 4, "--save-every", 2, "--force"))
    refused(r, "No space left on device")
    assert snapshot(out) == before and not temporaries(tmp_path)


def test_a_users_folder_is_refused_and_a_failed_run_leaves_nothing(
        base, tmp_path, cli, refused, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(cli(*finetune_args(base, out, "--steps", 2)), "holds notes.txt and no fine-tuning")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    full_disk_after(monkeypatch, 0)
    refused(cli(*finetune_args(base, empty, "--steps", 2)), "No space left on device")
    assert list(empty.iterdir()) == []


def test_force_refuses_what_mlxgpt_did_not_write(base, tmp_path, cli, cli_ok, refused):
    out = tmp_path / "run"
    cli_ok(*finetune_args(base, out, "--steps", 1))
    (out / "notes.txt").write_text("mine")
    refused(cli(*finetune_args(base, out, "--steps", 1, "--force")), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    # a model folder is no fine-tuning run: --force does not make it one
    model = tmp_path / "model"
    shutil.copytree(base[0], model)
    refused(cli(*finetune_args(base, model, "--steps", 1, "--force")), "no fine-tuning run")
    assert snapshot(model) == snapshot(base[0])


def test_convert_and_export_force_replace_only_their_own_folders(base, hf_source, tmp_path, cli,
                                                                 cli_ok, refused):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for args in (["convert", hf_source, out], ["export", base[0], out]):
        refused(cli(*args, "--force"), "notes.txt")
        assert (out / "notes.txt").read_text() == "mine"
    # what convert and export wrote, they replace; with a file of the user's added, they refuse
    for args in (["convert", hf_source, tmp_path / "m"], ["export", base[0], tmp_path / "h"]):
        cli_ok(*args)
        cli_ok(*args, "--force")
        (args[-1] / "notes.txt").write_text("mine")
        refused(cli(*args, "--force"), "notes.txt, which mlxgpt did not write")
        assert (args[-1] / "notes.txt").read_text() == "mine"
    assert not temporaries(tmp_path)


def test_export_dot_dot_inside_a_model_folder(base, tmp_path, cli, refused, monkeypatch):
    own = tmp_path / "m"
    shutil.copytree(base[0], own)
    before = snapshot(own)
    monkeypatch.chdir(own)
    refused(cli("export", ".", ".", "--force"), "OUT . is MODEL .")
    refused(cli("export", ".", "hf", "--force"), "OUT hf is inside MODEL .")
    refused(cli("export", ".", "..", "--force"), "OUT .. holds MODEL .")
    refused(cli("export", ".", "m.gguf", "--format", "gguf"), "is inside MODEL")
    refused(cli("convert", ".", "..", "--force"), "OUT_DIR .. holds SOURCE .")
    assert snapshot(own) == before


def test_pretrain_out_naming_a_file(base, tmp_path, cli, refused):
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    refused(cli("pretrain", *PRETRAIN, "--data", base[2], "--out", blocker), "is a file")
    assert blocker.read_text() == "a file"


# --------------------------------------------------------------------------- kills and leftovers


KILL_BETWEEN_RENAMES = """
import os, pathlib, shutil, signal, sys
from mlxgpt.checkpoints.files import atomic_dir
real = pathlib.Path.rename
def rename(self, target):
    done = real(self, target)
    if ".old-" in pathlib.Path(target).name:  # the old folder is aside, the new one not in yet
        os.kill(os.getpid(), signal.SIGKILL)
    return done
pathlib.Path.rename = rename
last = pathlib.Path(sys.argv[1])
with atomic_dir(last, force=True) as tmp:
    for f in last.iterdir():
        if f.is_file():
            shutil.copy(f, tmp / f.name)
"""


def test_a_kill_between_the_renames_of_a_checkpoint_is_recovered(base, tmp_path, cli_ok):
    out = tmp_path / "run"
    cli_ok(*finetune_args(base, out, "--steps", 2))
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out / "last")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "last").exists() and len(temporaries(out)) == 2  # .last.old-, .last.tmp-
    r = cli_ok(*finetune_args(base, out, "--steps", 4, "--resume"))
    assert "resuming from" in r.output and "at step 2" in r.output
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 4
    assert not temporaries(out)


def test_a_fresh_run_is_not_refused_for_killed_writers_leftovers(base, tmp_path, cli_ok):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / f".last.tmp-{pid}-abcd").mkdir()  # a checkpoint being written when killed
    (out / f".last.tmp-{pid}-abcd" / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / f".run.json.tmp-{pid}-efgh").write_text("{")
    cli_ok("pretrain", *PRETRAIN, "--data", base[2], "--out", out, "--steps", 2,
           "--cache-dir", tmp_path / "cache")
    assert (out / "last").is_dir() and not temporaries(out)


def test_killed_writers_temporaries_are_removed_and_live_ones_kept(hf_source, tmp_path, cli_ok):
    pid = dead_pid()
    half = tmp_path / f".m.tmp-{pid}-abcd"  # killed while writing: no marker
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".m.tmp-{pid}-ijkl.safetensors").write_bytes(b"\0")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        running = tmp_path / f".m.tmp-{live.pid}-mnop"
        running.mkdir()
        cli_ok("convert", hf_source, tmp_path / "m")
        assert temporaries(tmp_path) == [running]  # another writer's, still at work
    finally:
        live.kill()
        live.wait()
    # the one that died while it was the only copy: the old folder comes back
    out = tmp_path / "m"
    old = tmp_path / f".m.old-{dead_pid()}-qrst"
    out.rename(old)
    clean_leftovers(tmp_path, "m")
    assert (out / "config.json").is_file() and not old.exists()


def test_clean_leftovers_prefers_the_complete_new_folder(tmp_path):
    pid = dead_pid()

    def leftover(tag: str, content: str, complete: bool) -> None:
        d = tmp_path / f".x{tag}{pid}-{content}"
        d.mkdir()
        (d / "f").write_text(content)
        if complete:
            (d / MARKER).write_text('{"written_by": "mlxgpt"}')

    leftover(".old-", "old", True)
    leftover(".tmp-", "new", True)
    clean_leftovers(tmp_path)
    assert (tmp_path / "x" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    shutil.rmtree(tmp_path / "x")
    leftover(".old-", "old", True)
    leftover(".tmp-", "half", False)  # killed while it was being written
    clean_leftovers(tmp_path)
    assert (tmp_path / "x" / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# --------------------------------------------------------------------------- settings, Ctrl-C


def test_a_bad_pretrain_setting_leaves_no_folder(base, tmp_path, cli, refused):
    out = tmp_path / "run"
    refused(cli("pretrain", *PRETRAIN, "--data", base[2], "--out", out, "--eval-every", "-1",
                "--cache-dir", tmp_path / "cache"), "eval-every")
    assert not out.exists()


def test_a_pretrain_run_failing_before_its_first_checkpoint_leaves_no_folder(
        base, tmp_path, cli, refused, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("a failure after run.json is written")

    import mlxgpt.training.pretrain as pretrain

    monkeypatch.setattr(pretrain, "train", fail)
    out = tmp_path / "run"
    r = cli("pretrain", *PRETRAIN, "--data", base[2], "--out", out, "--steps", "2",
            "--cache-dir", tmp_path / "cache")
    assert isinstance(r.exception, ValueError), r.output
    assert not out.exists()


def test_ctrl_c_in_finetune_exits_130_and_publishes_nothing(base, tmp_path, cli, cli_ok,
                                                            monkeypatch):
    real_batch = Batches.batch

    def interrupting(self, index):
        if index == 1 and len(self.examples) > 10:  # the train set, not validation
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, index)

    monkeypatch.setattr(Batches, "batch", interrupting)
    out = tmp_path / "run"
    r = cli(*finetune_args(base, out, "--steps", 4))
    assert r.exit_code == 130, r.output
    assert "stopped at step 2" in r.output and "--resume" in r.output
    assert "written to" not in r.output
    assert (out / "last" / "trainer_state.json").is_file()
    assert not (out / "adapters.safetensors").exists()  # a checkpoint, not a result
    monkeypatch.setattr(Batches, "batch", real_batch)
    cli_ok(*finetune_args(base, out, "--steps", 4, "--resume"))
    assert (out / "adapters.safetensors").is_file()


# --------------------------------------------------------------------------- failed writes


FAILURES = {
    "ENOSPC": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    "EACCES": (OSError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    # what MLX itself raises when the disk is full
    "mlx": (RuntimeError("[write] Unable to write 4096 bytes to file."), "Unable to write"),
}


def writer_args(name: str, base, adapter, hf_source, out: Path) -> list:
    model, _, corpus = base
    return {
        "convert": ["convert", hf_source, out],
        "export": ["export", model, out],
        "fuse": ["fuse", "--model", model, "--adapter", adapter, "--out", out],
        "finetune": finetune_args(base, out, "--steps", 2),
        "pretrain": ["pretrain", *PRETRAIN, "--data", corpus, "--out", out, "--steps", "2",
                     "--cache-dir", out.parent / "cache"],
    }[name]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("writer", ["convert", "export", "fuse", "finetune", "pretrain"])
def test_a_failed_write_is_one_line_and_leaves_nothing(base, adapter, hf_source, tmp_path, cli,
                                                       refused, monkeypatch, writer, failure):
    error, message = FAILURES[failure]

    def fail(*args, **kwargs):
        raise error

    args = writer_args(writer, base, adapter, hf_source, tmp_path / "out")
    monkeypatch.setattr(mx, "save_safetensors", fail)
    refused(cli(*args), message)
    assert not (tmp_path / "out").exists() and not temporaries(tmp_path)


@pytest.mark.parametrize("writer", ["convert", "export"])
def test_a_failed_text_write_is_one_line_and_leaves_nothing(base, adapter, hf_source, tmp_path,
                                                            cli, refused, monkeypatch, writer):
    def fail(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    args = writer_args(writer, base, adapter, hf_source, tmp_path / "out")
    monkeypatch.setattr(Path, "write_text", fail)
    refused(cli(*args), "No space left on device")
    assert not (tmp_path / "out").exists() and not temporaries(tmp_path)


def test_a_failed_log_write_is_one_line(base, tmp_path, cli, refused, monkeypatch):
    from mlxgpt.training.runlog import JsonlLog

    def fail(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(JsonlLog, "write", fail)
    out = tmp_path / "run"
    refused(cli(*finetune_args(base, out, "--steps", 2)), "log.jsonl: No space left on device")
    assert not out.exists()


def test_a_failed_checkpoint_keeps_the_one_before(base, tmp_path, cli, cli_ok, refused,
                                                  monkeypatch):
    real = mx.save_safetensors
    out = tmp_path / "run"
    full_disk_after(monkeypatch, 2)  # the first checkpoint: the model and the optimizer state
    r = cli("pretrain", *PRETRAIN, "--data", base[2], "--out", out, "--steps", "4",
            "--save-every", "2", "--eval-every", "4", "--cache-dir", tmp_path / "cache")
    refused(r, "No space left on device")
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 2
    assert not temporaries(tmp_path)
    monkeypatch.setattr(mx, "save_safetensors", real)
    cli_ok("pretrain", "--out", out, "--resume", "--quiet", "--cache-dir", tmp_path / "cache")


# --------------------------------------------------------------------------- modes


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_outputs_follow_the_umask(base, hf_source, tmp_path, cli_ok, umask_027):
    cli_ok("convert", hf_source, tmp_path / "m")
    cli_ok("export", base[0], tmp_path / "h")
    cli_ok(*finetune_args(base, tmp_path / "run", "--steps", 2))
    for out in ("m", "h", "run"):
        assert modes(tmp_path / out) == {0o750, 0o640}, out
    atomic_write_text(tmp_path / "t.txt", "x")
    atomic_save_safetensors(tmp_path / "w.safetensors", {"a": mx.zeros((2,))})
    assert {stat.S_IMODE((tmp_path / f).stat().st_mode) for f in ("t.txt", "w.safetensors")} \
        == {0o640}
