"""Byte-level BPE run by tiktoken, and GPT-2's own tokenizer from the ranks file the package
ships."""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import importlib.resources
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from ..checks import shown
from ..errors import MlxgptError
from .base import EOT, GPT2_PATTERN, Tokenizer, as_ids, bad_id
from .hf_files import write_hf_files

TIKTOKEN_FILE = "tokenizer.tiktoken"


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken.

    tiktoken merges by *rank*: it repeatedly joins the adjacent pair whose concatenation has the
    lowest rank. Ranks therefore follow merge order. Where a vocabulary numbers its tokens
    differently (Hugging Face tokenizers often put special tokens or the byte alphabet first),
    ``token_ids`` maps rank -> id; for GPT-2 ranks and ids coincide and no mapping is kept.
    """

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int],
        *,
        token_ids: np.ndarray | None = None,
        extra_tokens: dict[int, bytes] | None = None,
        merges: list[tuple[bytes, bytes]] | None = None,
        eot_id: int | None = None,
    ):
        """``token_ids``: rank -> id for the mergeable ranks (None: the ranks are the ids).
        ``extra_tokens``: id -> bytes of vocabulary entries BPE never produces (decode only).
        ``merges``: the merge list as read (kept so ``save`` writes it back exactly)."""
        self.name, self.pattern = name, pattern
        self.special_tokens = dict(special_tokens)
        self._ranks, self._merges = ranks, merges
        if token_ids is None:
            tik_special = self.special_tokens
            self._rank_to_id = None
            rank_ids: Iterable[tuple[int, bytes]] = ((r, b) for b, r in ranks.items())
        else:
            # tiktoken needs special ranks apart from mergeable ones: put them after.
            tik_special = {s: len(ranks) + k for k, s in enumerate(self.special_tokens)}
            specials = np.array(list(self.special_tokens.values()), dtype=np.int64)
            self._rank_to_id = np.concatenate([np.asarray(token_ids, np.int64), specials])
            rank_ids = ((int(token_ids[r]), b) for b, r in ranks.items() if token_ids[r] >= 0)
        try:
            self._enc = tiktoken.Encoding(
                name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=tik_special
            )
        except Exception as e:  # a bad regex or colliding ranks
            raise MlxgptError(f"cannot build the {name} tokenizer: {e}") from None
        self._drops = self._rank_to_id is not None and bool((self._rank_to_id < 0).any())
        table: dict[int, bytes] = dict(rank_ids)
        table.update(extra_tokens or {})
        table.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.vocab_size = max(table) + 1
        self._id_bytes: list[bytes | None] = [None] * self.vocab_size
        for i, b in table.items():
            self._id_bytes[i] = b
        self.eot_id = self.special_tokens.get(EOT) if eot_id is None else eot_id

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            ranks = self._enc.encode(text, allowed_special="all")
        else:
            ranks = self._enc.encode_ordinary(text)
        return self._ids(ranks)

    def _ids(self, ranks: list[int]) -> list[int]:
        if self._rank_to_id is None:
            return ranks
        ids = self._rank_to_id[np.asarray(ranks, dtype=np.int64)]
        return (ids[ids >= 0] if self._drops else ids).tolist()  # -1: a byte with no token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken releases the GIL: the texts are encoded on every core at once.
        batch = self._enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return [self._ids(r) for r in batch]

    def token_bytes(self, token_id: int) -> bytes:
        b = self._id_bytes[token_id] if 0 <= token_id < self.vocab_size else None
        if b is None:
            raise bad_id(token_id, self.vocab_size)
        return b

    def decode_bytes(self, ids) -> bytes:
        ids = as_ids(ids)
        try:
            if min(ids, default=0) >= 0:
                return b"".join([self._id_bytes[i] for i in ids])  # TypeError on a hole (None)
        except (IndexError, TypeError):
            pass
        return b"".join(self.token_bytes(i) for i in ids)  # slow path names the bad id

    @property
    def ranks(self) -> dict[bytes, int]:
        """Token bytes -> merge rank, as tiktoken uses them."""
        return self._ranks

    @functools.cached_property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list, in order (rebuilt from the ranks when built from a tiktoken file)."""
        return self._merges if self._merges is not None else _merges_from_ranks(self._ranks)

    def save(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        vocab = {i: b for i, b in enumerate(self._id_bytes) if b is not None}
        for i in self.special_tokens.values():
            del vocab[i]
        write_hf_files(folder, vocab, self.merges, self.special_tokens, self.eot_id, self.pattern,
                       bos_id=self.bos_id, chat_template=self.chat_template,
                       add_bos=self.prepends_bos)
        if self.name == "gpt2":
            (folder / TIKTOKEN_FILE).write_bytes(gpt2_ranks_file())
            return {"type": "gpt2"}
        return {
            "type": "bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "eot_id": self.eot_id,
            "bos_id": self.bos_id,
            # only when set: descriptions (and corpus caches keyed on them) stay as they were
            **({"add_bos": True} if self.prepends_bos else {}),
        }


def gpt2_ranks_file() -> bytes:
    return importlib.resources.files("mlxgpt").joinpath("assets", "gpt2.tiktoken").read_bytes()


def read_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one ``base64(token) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise MlxgptError(f"{source}: line {n} is not 'base64-token rank'") from None
    if not ranks:
        raise MlxgptError(f"{source}: no ranks")
    return ranks


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer from the ranks file shipped in the package (no network)."""
    ranks = read_tiktoken_ranks(gpt2_ranks_file(), "mlxgpt/assets/gpt2.tiktoken")
    return BPETokenizer("gpt2", ranks, GPT2_PATTERN, {EOT: len(ranks)})


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list from tiktoken ranks: run BPE on each token's bytes with only the
    lower ranks available; it must stop at exactly two parts, which are the merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts, _ = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise MlxgptError(f"BPE ranks: token {shown(token)} cannot be built from lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> tuple[list[bytes], int]:
    """BPE on ``token``'s bytes with the ranks below ``below`` only, in tiktoken's order (the
    lowest rank first, the leftmost of equal ones), until two parts are left or nothing merges.

    Returns the parts and the number of pair look-ups made: each merge looks up two new pairs,
    so that is at most 3n, and each heap step costs log n. (Scanning every pair per merge, as
    the plain algorithm does, is quadratic: a 30,000-byte run took minutes.) The parts are a
    linked list over byte offsets; the heap holds candidate pairs ``(rank, left start, right
    start, right end)``, and those a merge made stale are skipped when they come up.
    """
    n, get = len(token), ranks.get
    end = list(range(1, n + 1))  # end[i]: where the part starting at byte i ends
    prev = list(range(-1, n - 1))  # prev[i]: where the part before it starts (-1: none)
    alive = [True] * n  # a part starts at byte i
    heap = [(r, i, i + 1, i + 2) for i in range(n - 1)
            if (r := get(token[i:i + 2], below)) < below]
    heapq.heapify(heap)
    lookups, count = n - 1, n
    while count > 2 and heap:
        _, i, j, k = heapq.heappop(heap)
        if not alive[i] or end[i] != j or end[j] != k:
            continue  # a part of this pair has merged since
        end[i], alive[j], count = k, False, count - 1
        if k < n:
            prev[k] = i
        for a in (prev[i], i):  # the merged part's new pairs, with its left and right neighbour
            b = end[a] if a >= 0 else n
            if b < n:
                lookups += 1
                if (r := get(token[a:end[b]], below)) < below:
                    heapq.heappush(heap, (r, a, b, end[b]))
    return [token[i:end[i]] for i in range(n) if alive[i]], lookups


def merges_match(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> bool:
    try:
        return _merges_from_ranks(ranks) == merges
    except MlxgptError:  # some token cannot be built from lower ranks
        return False
