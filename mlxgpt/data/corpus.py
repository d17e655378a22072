"""Text corpora -> one flat token file on disk -> random training batches.

A corpus is a UTF-8 text file or a folder of ``.txt`` files (read in name order, each followed
by the tokenizer's end-of-text token when it has one). It is tokenized once into a flat
``uint16`` (vocabularies up to 65,536) or ``uint32`` file, memory-mapped for training, and cached
under a name made of the corpus's and the tokenizer's hashes: the next run on the same text with
the same tokenizer reuses it. The last ``val_fraction`` of the tokens is the validation split.

Batches are drawn like nanoGPT's (``B`` random windows of ``T + 1`` tokens), but batch ``i`` is a
pure function of ``(seed, i)``, so a resumed run sees exactly the batches of an unbroken one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from ..atomicio import WriteError, atomic_file, atomic_write_text, clean_leftovers
from ..cachedir import cache_root
from ..errors import MlxgptError
from ..tokenizers.base import GPT2_PATTERN, text_pieces

CHUNK_BYTES = 8 << 20  # show progress after about this much text
PIECE_BYTES = 1 << 20  # encode in pieces of about this size, several at once (on threads)
TOKEN_FORMAT = 2  # bump when the token file layout or the tokenization rules change


def default_cache_dir() -> Path:
    """``tokens/`` in mlxgpt's cache folder (:func:`mlxgpt.cachedir.cache_root`)."""
    return cache_root() / "tokens"


def corpus_files(path: str | os.PathLike) -> list[Path]:
    """The text files of a corpus: the file itself, or a folder's ``*.txt`` (recursive, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise MlxgptError(f"{p}: no .txt files in this folder")
        return files
    raise MlxgptError(f"{p}: no such file or folder")


def _read_bytes(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise MlxgptError(f"{f}: cannot read ({e.strerror or e})") from None


def _check_utf8(data: bytes, f: Path) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MlxgptError(f"{f}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, "
                          f"line {line}); convert it to UTF-8 first") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how the tokenizer splits text (its saved files)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        meta = tokenizer.save(Path(tmp))
        h.update(json.dumps(meta, sort_keys=True).encode())
        for f in sorted(Path(tmp).iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class TokenFile:
    """A tokenized corpus on disk: ``tokens`` is a read-only memory map (N,)."""

    path: Path
    tokens: np.ndarray
    meta: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    """A byte-count progress line on stderr, only for corpora big enough to wait for."""
    start = time.perf_counter()
    show = enabled and total >= 4 * CHUNK_BYTES

    def update(done: int) -> None:
        if not show:
            return
        el = time.perf_counter() - start
        rate = done / el if el > 0 else 0.0
        eta = (total - done) / rate if rate else 0.0
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rtokenizing {done / 1e6:.0f}/{total / 1e6:.0f} MB "
                         f"({100 * done / total:.0f}%, {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s)"
                         f"\x1b[K{end}")
        sys.stderr.flush()

    return update


def _pieces(data: bytes, tokenizer: Any) -> list[bytes]:
    # Cuts keep the ids under GPT-2's split (and for bytes); another split gets whole files.
    if getattr(tokenizer, "pattern", GPT2_PATTERN) == GPT2_PATTERN:
        return text_pieces(data, PIECE_BYTES)
    return [data]


def _encode_pieces(tokenizer: Any, pieces: list[bytes], dtype: type) -> list[np.ndarray]:
    if tokenizer.name == "byte":  # UTF-8 bytes are the ids: no need to decode
        return [np.frombuffer(p, dtype=np.uint8).astype(dtype) for p in pieces]
    texts = [p.decode("utf-8") for p in pieces]
    return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]


def tokenize_corpus(
    path: str | os.PathLike,
    tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> TokenFile:
    """Tokenize a corpus into the cache (or reuse the cached tokens) and memory-map them."""
    files = corpus_files(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    h = hashlib.sha256(f"mlxgpt-tokens-{TOKEN_FORMAT}\n".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    sizes = []
    for f in files:  # hash the text (not names or dates): same text, same tokens
        data = _read_bytes(f)
        sizes.append(len(data))
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    key = h.hexdigest()[:32]
    bin_path, meta_path = cache / f"{key}.bin", cache / f"{key}.json"
    if bin_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
            return TokenFile(bin_path, tokens, meta)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache entry: rebuild it

    if sum(sizes) == 0:
        raise MlxgptError(f"{path}: the corpus is empty")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxgptError(f"cannot write the token cache in {cache}: {e.strerror or e} "
                          f"(choose another with --cache-dir)") from None
    # Every corpus has its own name here: runs killed while tokenizing another leave theirs.
    clean_leftovers(cache)
    try:
        with atomic_file(bin_path) as tmp, open(tmp, "wb") as out:
            n_tokens = _write_tokens(out, files, tokenizer, dtype,
                                     _progress(sum(sizes), progress))
            if n_tokens == 0:
                raise MlxgptError(f"{path}: the corpus has no tokens")
        meta = {"format": TOKEN_FORMAT, "n_tokens": n_tokens, "dtype": np.dtype(dtype).name,
                "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "files": [str(f) for f in files], "bytes": sum(sizes)}
        # Written after the tokens: an entry is used only when both files are there.
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    except WriteError as e:  # a full or read-only disk
        raise WriteError(f"{e} (choose another cache folder with --cache-dir)") from None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    return TokenFile(bin_path, tokens, meta)


def _write_tokens(out: BinaryIO, files: Sequence[Path], tokenizer: Any, dtype: type,
                  update: Callable[[int], None]) -> int:
    """Write the tokens of ``files`` (each followed by end-of-text where there are several)
    to ``out``; returns how many."""
    done, n_tokens, eot = 0, 0, tokenizer.eot_id
    for f in files:
        data = _read_bytes(f)
        _check_utf8(data, f)
        pieces = _pieces(data, tokenizer)
        step = CHUNK_BYTES // PIECE_BYTES
        for k in range(0, len(pieces), step):
            group = pieces[k : k + step]
            for ids in _encode_pieces(tokenizer, group, dtype):
                out.write(ids.tobytes())
                n_tokens += ids.size
            done += sum(map(len, group))
            update(done)
        if eot is not None and len(files) > 1:
            out.write(np.asarray([eot], dtype=dtype).tobytes())
            n_tokens += 1
    return n_tokens


# --------------------------------------------------------------------------- tokenizer training


@dataclass
class CorpusText:
    """The files of a corpus, checked (readable, UTF-8, not all empty); ``texts()`` reads them
    again file by file, so the text is never all in memory at once."""

    files: list[Path]
    n_bytes: int

    def texts(self) -> Iterator[str]:
        """The text in pieces cut where GPT-2's split is unchanged (see ``text_pieces``)."""
        for f in self.files:
            for piece in text_pieces(_read_bytes(f), PIECE_BYTES):
                yield piece.decode("utf-8")


def read_corpus(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> CorpusText:
    """One or more corpora (files, or folders of ``.txt`` files), checked now so a bad file
    fails at once, not after minutes of work."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise MlxgptError("no text given (name one or more files or folders)")
    files = [f for p in paths for f in corpus_files(p)]
    n_bytes = 0
    for f in files:
        data = _read_bytes(f)
        _check_utf8(data, f)
        n_bytes += len(data)
    if n_bytes == 0:
        raise MlxgptError(f"{paths[0] if len(paths) == 1 else 'the data'}: the corpus is empty")
    return CorpusText(files, n_bytes)


@dataclass
class TokenizerTraining:
    """A tokenizer trained on a corpus, and what that took."""

    tokenizer: Any  # a BPETokenizer
    requested: int  # the vocabulary size asked for; ``tokenizer.vocab_size`` can be smaller
    n_bytes: int
    n_files: int
    seconds: float

    @property
    def mb_per_min(self) -> float:
        return self.n_bytes / 1e6 / (self.seconds / 60) if self.seconds > 0 else 0.0

    @property
    def short_by(self) -> int:
        """How many ids fewer than asked: the text had no more pairs to merge."""
        return self.requested - self.tokenizer.vocab_size


def train_tokenizer(corpus: CorpusText, vocab_size: int, *,
                    progress: bool = False) -> TokenizerTraining:
    """A byte-level BPE of ``vocab_size`` ids trained on a corpus (see ``tokenizers.train``)."""
    from ..tokenizers.train import train_bpe

    start = time.perf_counter()
    tok = train_bpe(corpus.texts(), vocab_size, progress=progress)
    return TokenizerTraining(tok, vocab_size, corpus.n_bytes, len(corpus.files),
                             time.perf_counter() - start)


def count_tokens(tokenizer: Any, corpus: CorpusText) -> int:
    """The number of tokens ``tokenizer`` makes of the corpus (encoded on every core)."""
    n, batch = 0, []
    for text in corpus.texts():
        batch.append(text)
        if len(batch) == CHUNK_BYTES // PIECE_BYTES:
            n += sum(map(len, tokenizer.encode_batch(batch)))
            batch = []
    return n + sum(map(len, tokenizer.encode_batch(batch)))


# --------------------------------------------------------------------------- batches


class TokenBatches:
    """Random windows of a token array: ``batch(i)`` -> (inputs (B, T), targets (B, T)) int32.

    ``batch(i)`` depends only on ``(seed, i)``: the data position of a run is its batch index.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int):
        if len(tokens) < block_size + 1:
            raise MlxgptError(f"{len(tokens):,} tokens is less than one block "
                              f"(block size {block_size} + 1)")
        self.tokens, self.batch_size, self.block_size, self.seed = (
            tokens, batch_size, block_size, seed)

    def batch(self, index: int) -> tuple[mx.array, mx.array]:
        T = self.block_size
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.tokens) - T, size=self.batch_size)  # last start n-T-1
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int32)
        return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int,
                 source: str = "corpus") -> tuple[np.ndarray, np.ndarray | None]:
    """Train = the first (1 - val_fraction) of the tokens, val = the rest (None when 0).

    Both parts must hold at least one block plus its next-token target.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise MlxgptError(f"val-fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    n_val = int(round(n * val_fraction))
    train, val = tokens[: n - n_val], (tokens[n - n_val :] if n_val else None)
    need = block_size + 1
    if len(train) < need or (val is not None and len(val) < need):
        smallest = min(len(train), len(val) if val is not None else len(train))
        raise MlxgptError(
            f"{source} is too small: {n:,} tokens leave {smallest:,} in a split, less than one "
            f"block of {block_size} + 1 (use more text, a smaller --block-size or "
            f"--val-fraction)")
    return train, val
