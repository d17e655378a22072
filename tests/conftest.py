"""Shared test fixtures: running the CLI, checking its refusals, and small random models.

``mlxgpt`` is imported first so the fast BLAS is preloaded before mlx.

- ``cli(*args, input=None)``: ``mlxgpt ARGS`` in this process (click's runner); a click Result
  (``exit_code``, ``output``, ``stdout``, ``stderr``, ``exception``).
  ``cli_ok``: the same, asserting exit status 0.
- ``mlxgpt_process(*args, stdin=None, env=None)``: ``python -m mlxgpt ARGS`` as a subprocess; a
  CompletedProcess (for what only a real process shows: stdin, signals, the BLAS preload).
- ``refused(result, match)``: the standard for bad input: exit status 1, one ``Error:`` line
  that contains ``match``, no traceback; returns the line.
- ``tiny_model(**config)``: a random GPT in eval mode (vocab 257, 64 positions, 2 x 32 wide
  unless given); ``model_folder(tmp, tokenizer="byte"|"gpt2", **config)``: one saved as a model
  folder with that tokenizer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

import mlxgpt
from mlxgpt.checkpoints.folder import save_model
from mlxgpt.cli import main
from mlxgpt.tokenizers import byte_tokenizer, gpt2_tokenizer

TINY = {"vocab_size": 257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="session")
def cli():
    def run(*args, input: str | None = None):
        return CliRunner().invoke(main, [str(a) for a in args], input=input)

    return run


@pytest.fixture(scope="session")
def cli_ok(cli):
    """``cli`` that also asserts the command succeeded."""

    def run(*args, input: str | None = None):
        result = cli(*args, input=input)
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    return run


@pytest.fixture(scope="session")
def mlxgpt_process():
    def run(*args, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlxgpt", *map(str, args)], input=stdin,
                              capture_output=True, text=True, timeout=timeout, env=env)

    return run


@pytest.fixture(scope="session")
def refused():
    def check(result, match: str = "") -> str:
        code = getattr(result, "exit_code", getattr(result, "returncode", None))
        text = result.stdout + result.stderr if hasattr(result, "returncode") else result.output
        assert code == 1, text
        if hasattr(result, "exit_code"):  # in process: handled (SystemExit), not a crash
            assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in text, text
        lines = [line for line in text.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and match in lines[0], text
        return lines[0]

    return check


# --------------------------------------------------------------------------- small models


def make_tiny_model(seed: int = 0, **config) -> mlxgpt.GPT:
    mx.random.seed(seed)
    model = mlxgpt.GPT(mlxgpt.GPTConfig(**{**TINY, **config}))
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="session")
def model_folder():
    def save(tmp: Path, tokenizer: str = "byte", seed: int = 0, name: str | None = None,
             **config) -> Path:
        tok = byte_tokenizer() if tokenizer == "byte" else gpt2_tokenizer()
        model = make_tiny_model(seed, **{"vocab_size": tok.vocab_size, **config})
        return save_model(model, Path(tmp) / (name or f"{tokenizer}-{seed}"), tok)

    return save


# --------------------------------------------------------------------------- skips in CI

# With MLXGPT_STRICT_SKIPS=1 (.ci/run sets it) a skipped test fails the run unless its reason
# contains one of these: in CI everything the tests need is installed, so any other skip is a
# missing install step hiding a test.
ALLOWED_SKIPS = {
    "tomllib": "TOML config files need Python 3.11's tomllib",
}
_skipped: list[tuple[str, str]] = []


def _record_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else \
            str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_runtest_logreport(report) -> None:
    _record_skip(report)


def pytest_collectreport(report) -> None:
    _record_skip(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    import os

    if os.environ.get("MLXGPT_STRICT_SKIPS") != "1":
        return
    bad = [(n, r) for n, r in _skipped if not any(a in r for a in ALLOWED_SKIPS)]
    if bad:
        lines = "\n".join(f"  {n}: {r}" for n, r in bad)
        print(f"\n{len(bad)} skipped test(s) not on the allow-list (tests/conftest.py):\n{lines}")
        session.exitstatus = 1
