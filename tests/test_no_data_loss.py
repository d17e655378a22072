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


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """``{"text", "label"}`` lines to train a classifier on."""
    path = tmp_path_factory.mktemp("labelled") / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": w * 3, "label": "long" if len(w) > 3 else "short"})
                            + "\n" for w in ["apple", "sky", "coal", "fig", "snow", "pear"] * 8))
    return path


def task_args(task: str, base, labelled: Path, out: Path, *more) -> list:
    """``finetune`` of a language model (LoRA, ``full``) or of a classifier (the later
    ``--data`` wins)."""
    extra = {"lora": [], "full": ["--full"],
             "classify": ["--task", "classify", "--data", labelled]}[task]
    return finetune_args(base, out, *extra, *more)


# What a finished run publishes at OUT's top level.
RESULT = {"lora": "adapters.safetensors", "classify": "classifier.safetensors"}


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


@pytest.mark.parametrize("task", ["lora", "full", "classify"])
def test_out_equal_to_model_is_refused_before_anything_is_touched(base, labelled, tmp_path, cli,
                                                                  refused, task):
    own = tmp_path / "base"
    shutil.copytree(base[0], own)
    before = snapshot(own)
    r = cli(*task_args(task, base, labelled, own, "--steps", 1, "--force"),
            "--model", own)  # the last --model wins
    refused(r, f"--out {own} is --model {own}")
    assert snapshot(own) == before


@pytest.mark.parametrize("task", ["lora", "classify"])
def test_force_with_a_bad_model_keeps_the_previous_run(base, labelled, tmp_path, cli, cli_ok,
                                                       refused, task):
    out = tmp_path / "run"
    cli_ok(*task_args(task, base, labelled, out, "--steps", 2))
    before = snapshot(out)
    r = cli(*task_args(task, base, labelled, out, "--steps", 2, "--force"),
            "--model", tmp_path / "nowhere")
    refused(r)
    assert snapshot(out) == before and not temporaries(tmp_path)
    # a good --force run replaces it once complete, and leaves no temporaries
    cli_ok(*task_args(task, base, labelled, out, "--steps", 3, "--force"))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 3
    assert (out / RESULT[task]).is_file() and not temporaries(tmp_path)


def full_disk_after(monkeypatch, n_saves: int) -> None:
    """``mx.save_safetensors`` fails with ENOSPC after its first ``n_saves`` calls."""
    real, calls = mx.save_safetensors, []

    def save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > n_saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)


# Saves that succeed first: the adapter and the optimizer (LoRA); the adapter, the head and the
# optimizer, then the classifier being published fails (classify, one checkpoint).
@pytest.mark.parametrize("task, saves, steps", [("lora", 2, 4), ("classify", 3, 2)])
def test_a_force_run_failing_after_its_first_checkpoint_keeps_the_old_run(
        base, labelled, tmp_path, cli, cli_ok, refused, monkeypatch, task, saves, steps):
    out = tmp_path / "run"
    cli_ok(*task_args(task, base, labelled, out, "--steps", 2))
    before = snapshot(out)
    full_disk_after(monkeypatch, saves)
    r = cli(*task_args(task, base, labelled, out, "--steps", steps, "--save-every", 2,
                       "--force"))
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


@pytest.mark.parametrize("task", ["lora", "classify"])
def test_ctrl_c_in_finetune_exits_130_and_publishes_nothing(base, labelled, tmp_path, cli, cli_ok,
                                                            monkeypatch, task):
    real_batch = Batches.batch  # a classifier's LabelledBatches too

    def interrupting(self, index):
        if index == 1 and len(self.examples) > 10:  # the train set, not validation
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, index)

    monkeypatch.setattr(Batches, "batch", interrupting)
    out = tmp_path / "run"
    r = cli(*task_args(task, base, labelled, out, "--steps", 4))
    assert r.exit_code == 130, r.output
    assert "stopped at step 2" in r.output and "--resume" in r.output
    assert "written to" not in r.output
    assert (out / "last" / "trainer_state.json").is_file()
    assert not (out / RESULT[task]).exists()  # a checkpoint, not a result
    monkeypatch.setattr(Batches, "batch", real_batch)
    cli_ok(*task_args(task, base, labelled, out, "--steps", 4, "--resume"))
    assert (out / RESULT[task]).is_file()


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


# --------------------------------------------------------------------------- GGUF, caches, plots


def gguf_export(model, out: Path, *more) -> list:
    return ["export", "--format", "gguf", model, out, *more]


def test_gguf_force_replaces_only_a_gguf_model(base, tmp_path, cli, cli_ok, refused, umask_027):
    import gguf

    out = tmp_path / "m.gguf"
    falcon = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")  # a GGUF mlxgpt cannot read
    for step in (falcon.write_header_to_file, falcon.write_kv_data_to_file,
                 falcon.write_tensors_to_file, falcon.close):
        step()
    # a user's file, a damaged GGUF, another architecture's: each refused in one line naming it
    for content in (b"mine", b"GGUF" + bytes(40), (tmp_path / "falcon.gguf").read_bytes()):
        out.write_bytes(content)
        refused(cli(*gguf_export(base[0], out, "--force")), f"{out} is not a GGUF model file")
        assert out.read_bytes() == content
    out.unlink()
    stale = tmp_path / f".m.gguf.tmp-{dead_pid()}-abcd"  # a killed export's
    stale.write_bytes(b"\0" * 1000)
    cli_ok(*gguf_export(base[0], out))
    assert not stale.exists()
    cli_ok(*gguf_export(base[0], out, "--force"))  # mlxgpt's own file is replaced
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and not temporaries(tmp_path)
    (tmp_path / "link.gguf").symlink_to(out)
    refused(cli(*gguf_export(base[0], tmp_path / "link.gguf", "--force")), "symbolic link")


def test_gguf_output_is_never_its_input(base, tmp_path, cli_ok):
    from mlxgpt.checkpoints.gguf import export_gguf
    from mlxgpt.errors import MlxgptError

    g = tmp_path / "m.gguf"
    cli_ok(*gguf_export(base[0], g))
    before = g.read_bytes()
    with pytest.raises(MlxgptError, match=f"OUT {g} is MODEL {g}"):
        export_gguf(g, g, force=True)
    assert g.read_bytes() == before


def test_token_cache_leftovers_are_removed_and_a_failed_write_leaves_none(
        base, tmp_path, cli, cli_ok, refused, monkeypatch):
    import mlxgpt.data.corpus as corpus

    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".{'0' * 32}.bin.tmp-{dead_pid()}-abcd"  # another corpus's, killed
    stale.write_bytes(b"\0" * 1000)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write(b"partial")
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    args = ["pretrain", *PRETRAIN, "--data", base[2], "--out", tmp_path / "run", "--steps", "1",
            "--cache-dir", cache]
    monkeypatch.setattr(corpus, "open", full_disk, raising=False)  # the token file's writes
    refused(cli(*args), "No space left on device")
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    cli_ok(*args)
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]


def test_native_build_leftovers_are_removed(tmp_path, monkeypatch):
    from mlxgpt.cpu import native

    folder = tmp_path / "native"
    folder.mkdir()
    stale = folder / f".gpt_train-0123456789abcdef.so.tmp-{dead_pid()}-abcd.so"  # a killed build
    stale.write_bytes(b"\0" * 1000)
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # every build fails: nothing of it may stay either
    native.library_path.cache_clear()
    try:
        with pytest.raises(native.BuildError, match="could not build"):
            native.library_path()
    finally:
        native.library_path.cache_clear()
    assert [p.name for p in folder.iterdir()] == ["build.lock"]


def test_a_failed_loss_plot_leaves_no_temporary(base, tmp_path, cli_ok, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "run"
    r = cli_ok(*finetune_args(base, out, "--steps", 2))  # the run is saved: a note, not a failure
    assert "no loss plot" in r.output and "No space left on device" in r.output
    assert not (out / "loss.png").exists() and not temporaries(tmp_path)
