"""Tokenizers: GPT-2 BPE through tiktoken (local files only), a byte-level tokenizer, token ids.

Every tokenizer turns text into ids and ids back into bytes; text is those bytes decoded as UTF-8
with U+FFFD for invalid sequences (what tiktoken and Hugging Face do). ``StreamDecoder`` decodes
one id at a time for streaming and emits only complete characters.

A model folder carries its tokenizer: ``Tokenizer.save(folder)`` writes the files and returns a
JSON-able description that goes into ``config.json``; ``load_tokenizer(folder, meta)`` reverses
it. BPE and byte tokenizers are written as Hugging Face ``vocab.json`` + ``merges.txt`` (plus a
small ``tokenizer_config.json``) so ``transformers.AutoTokenizer`` and mlx-lm load the same
folder; GPT-2 also gets its tiktoken ranks file (``tokenizer.tiktoken``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import importlib.resources
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from ..errors import MlxgptError

# GPT-2's pre-tokenizer split (also Hugging Face's ByteLevel pre-tokenizer with use_regex=True).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
TIKTOKEN_FILE = "tokenizer.tiktoken"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
HF_TOKENIZER_FILE, HF_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


class StreamDecoder:
    """Incremental decoding: ``add(id)`` returns the text completed by that token, ``flush()``
    the rest. The pieces joined equal ``tokenizer.decode(ids)``, invalid bytes included.

    Bytes go through Python's incremental UTF-8 decoder, which holds back at most an incomplete
    character (<= 3 bytes), so each step costs O(token length), not O(history).
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._token_bytes(int(token_id)))

    def flush(self) -> str:
        """Emit what is held back (as U+FFFD if incomplete) and start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """Base class. Subclasses define ``encode``, ``token_bytes`` and ``save``."""

    name: str
    vocab_size: int
    eot_id: int | None = None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. With ``allow_special=False`` "<|endoftext|>" is ordinary text."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to."""
        raise NotImplementedError

    def save(self, folder: Path) -> dict[str, Any]:
        """Write this tokenizer's files into ``folder``; return the description for config."""
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(i) for i in _as_ids(ids))

    def decode(self, ids) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _as_ids(ids) -> list[int]:
    """Accept a list, tuple, numpy or mx array (1-D) or a single int."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _bad_id(token_id: int, vocab_size: int) -> MlxgptError:
    return MlxgptError(f"token id {token_id} is not in the tokenizer's vocabulary ({vocab_size})")


# --------------------------------------------------------------------------- BPE (tiktoken)


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
            rank_ids = ((int(token_ids[r]), b) for b, r in ranks.items())
        try:
            self._enc = tiktoken.Encoding(
                name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=tik_special
            )
        except Exception as e:  # a bad regex or colliding ranks
            raise MlxgptError(f"cannot build the {name} tokenizer: {e}") from None
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
        if self._rank_to_id is None:
            return ranks
        return self._rank_to_id[np.asarray(ranks, dtype=np.int64)].tolist()

    def token_bytes(self, token_id: int) -> bytes:
        b = self._id_bytes[token_id] if 0 <= token_id < self.vocab_size else None
        if b is None:
            raise _bad_id(token_id, self.vocab_size)
        return b

    def decode_bytes(self, ids) -> bytes:
        ids = _as_ids(ids)
        try:
            if min(ids, default=0) >= 0:
                return b"".join([self._id_bytes[i] for i in ids])  # TypeError on a hole (None)
        except (IndexError, TypeError):
            pass
        return b"".join(self.token_bytes(i) for i in ids)  # slow path names the bad id

    @functools.cached_property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list, in order (rebuilt from the ranks when built from a tiktoken file)."""
        return self._merges if self._merges is not None else _merges_from_ranks(self._ranks)

    def save(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        vocab = {i: b for i, b in enumerate(self._id_bytes) if b is not None}
        for i in self.special_tokens.values():
            del vocab[i]
        _write_hf_files(folder, vocab, self.merges, self.special_tokens, self.eot_id, self.pattern)
        if self.name == "gpt2":
            (folder / TIKTOKEN_FILE).write_bytes(_gpt2_ranks_file())
            return {"type": "gpt2"}
        return {
            "type": "bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "eot_id": self.eot_id,
        }


def _gpt2_ranks_file() -> bytes:
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
    ranks = read_tiktoken_ranks(_gpt2_ranks_file(), "mlxgpt/assets/gpt2.tiktoken")
    return BPETokenizer("gpt2", ranks, GPT2_PATTERN, {EOT: len(ranks)})


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list from tiktoken ranks: run BPE on each token's bytes with only the
    lower ranks available; it must stop at exactly two parts, which are the merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], rank)
                if r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise MlxgptError(f"BPE ranks: token {token!r} cannot be built from lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def _merges_match(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> bool:
    try:
        return _merges_from_ranks(ranks) == merges
    except MlxgptError:  # some token cannot be built from lower ranks
        return False


# --------------------------------------------------------------------------- bytes, ids


class ByteTokenizer(Tokenizer):
    """One id per byte (0-255) plus <|endoftext|> = 256: for small models trained from scratch."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(_utf8(text))
        ids: list[int] = []
        for k, part in enumerate(text.split(EOT)):
            if k:
                ids.append(self.eot_id)
            ids.extend(_utf8(part))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes((token_id,))
        if token_id == self.eot_id:
            return EOT.encode()
        raise _bad_id(token_id, self.vocab_size)

    def decode_bytes(self, ids) -> bytes:
        ids = _as_ids(ids)
        if all(0 <= i < 256 for i in ids):
            return bytes(ids)
        return super().decode_bytes(ids)

    def save(self, folder: Path) -> dict[str, Any]:
        # Also a valid (merge-free) byte-level BPE for Hugging Face: byte b has id b.
        vocab = {i: bytes((i,)) for i in range(256)}
        _write_hf_files(Path(folder), vocab, [], {EOT: self.eot_id}, self.eot_id, GPT2_PATTERN)
        return {"type": "byte"}


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: pair them up, lone ones -> U+FFFD (as tiktoken)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


class IdTokenizer(Tokenizer):
    """For a model that came without a tokenizer: it works on token ids only.

    ``encode`` refuses. ``decode`` renders each id as ``<id>`` (e.g. ``<464><3290>``) so
    generated ids can still be shown and streamed.
    """

    name = "ids"

    def __init__(self, vocab_size: int = 0):
        self.vocab_size = vocab_size  # 0: unknown, ids are not range-checked

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        raise MlxgptError(
            "this model has no tokenizer: it works on token ids only "
            "(convert it from a source with vocab.json + merges.txt or tokenizer.json)"
        )

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 0 or (self.vocab_size and token_id >= self.vocab_size):
            raise _bad_id(token_id, self.vocab_size)
        return f"<{token_id}>".encode()

    def save(self, folder: Path) -> dict[str, Any]:
        return {"type": "ids", "vocab_size": self.vocab_size}


# --------------------------------------------------------------------------- Hugging Face files


@functools.lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_char().items()}


def _to_hf(token: bytes) -> str:
    table = _byte_to_char()
    return "".join(table[b] for b in token)


def _from_hf(token: str) -> bytes | None:
    """Bytes of a byte-level token string; None if it is not byte-level."""
    table = _char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def _write_hf_files(
    folder: Path,
    vocab: Mapping[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_tokens: Mapping[str, int],
    eot_id: int | None,
    pattern: str,
) -> None:
    """vocab.json + merges.txt + tokenizer_config.json (GPT2Tokenizer), and tokenizer.json when
    the split pattern is not GPT-2's (vocab.json/merges.txt cannot express it)."""
    hf_vocab = {_to_hf(b): i for i, b in sorted(vocab.items())}
    hf_vocab.update(special_tokens)
    hf_merges = [f"{_to_hf(a)} {_to_hf(b)}" for a, b in merges]
    eot = next((s for s, i in special_tokens.items() if i == eot_id), None)
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s, i in special_tokens.items()
    }
    config = {
        # GPT2Tokenizer imposes GPT-2's split; another pattern needs tokenizer.json as written.
        "tokenizer_class": "GPT2Tokenizer"
        if pattern == GPT2_PATTERN
        else "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "added_tokens_decoder": added,
    }
    (folder / VOCAB_FILE).write_text(json.dumps(hf_vocab, ensure_ascii=False), encoding="utf-8")
    (folder / MERGES_FILE).write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in hf_merges), encoding="utf-8"
    )
    (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if pattern != GPT2_PATTERN:
        tok = {
            "version": "1.0",
            "added_tokens": [{"id": int(k), **v} for k, v in added.items()],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": pattern},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": False,
                        "trim_offsets": True,
                        "use_regex": False,
                    },
                ],
            },
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": hf_vocab,
                "merges": hf_merges,
            },
        }
        (folder / HF_TOKENIZER_FILE).write_text(json.dumps(tok, ensure_ascii=False), "utf-8")


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"{path}: not valid JSON ({e})") from None


def _check_vocab(vocab: Any, source: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise MlxgptError(f"{source}: the vocabulary must be a non-empty JSON object")
    for s, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise MlxgptError(f"{source}: token {s!r} has id {i!r}, expected an integer >= 0")
    return vocab


def _split_merge(line: Any, n: int, source: Path) -> tuple[str, str]:
    parts = line.split(" ") if isinstance(line, str) else line
    if (
        not isinstance(parts, list)
        or len(parts) != 2
        or not all(isinstance(p, str) and p for p in parts)
    ):
        raise MlxgptError(f"{source}: merge {n} ({line!r}) is not two tokens")
    return parts[0], parts[1]


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list, dict[str, int], str]:
    """GPT-2 style vocab.json + merges.txt; special tokens from tokenizer_config.json and
    added_tokens.json where present, else <|endoftext|> if the vocab has it."""
    vocab = _check_vocab(_read_json_file(folder / VOCAB_FILE), folder / VOCAB_FILE)
    try:
        lines = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlxgptError(f"{folder / MERGES_FILE}: cannot read ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [
        _split_merge(line, n, folder / MERGES_FILE)
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]
    special = {EOT: vocab[EOT]} if EOT in vocab else {}
    if (folder / HF_CONFIG_FILE).is_file():
        added = _read_json_file(folder / HF_CONFIG_FILE).get("added_tokens_decoder") or {}
        try:
            special.update({d["content"]: int(i) for i, d in added.items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            raise MlxgptError(f"{folder / HF_CONFIG_FILE}: bad added_tokens_decoder") from None
    if (folder / "added_tokens.json").is_file():
        special.update(_check_vocab(_read_json_file(folder / "added_tokens.json"), folder))
    return vocab, merges, special, GPT2_PATTERN


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list, dict[str, int], str]:
    """A Hugging Face tokenizers file with a byte-level BPE model."""
    data = _read_json_file(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise MlxgptError(f"{path}: not a BPE tokenizer (only byte-level BPE is supported)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise MlxgptError(f"{path}: BPE option {key} is not supported (byte-level BPE only)")
    if data.get("normalizer"):
        raise MlxgptError(f"{path}: tokenizer normalizers are not supported")
    vocab = _check_vocab(model.get("vocab"), path)
    if not isinstance(model["merges"], list):
        raise MlxgptError(f"{path}: model.merges must be a list")
    merges = [_split_merge(m, n, path) for n, m in enumerate(model["merges"], 1)]
    try:
        special = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError):
        raise MlxgptError(f"{path}: bad added_tokens") from None
    return vocab, merges, special, _pretokenizer_pattern(data.get("pre_tokenizer"), path)


def _pretokenizer_pattern(pre: Any, path: Path) -> str:
    """The split regex of a ByteLevel pre-tokenizer, alone or after a Split (Isolated)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and "pretokenizers" in pre else [pre]
    steps = steps if isinstance(steps, list) else [steps]
    unsupported = MlxgptError(f"{path}: unsupported pre_tokenizer (byte-level BPE only)")
    *split, byte_level = steps
    if not isinstance(byte_level, dict) or byte_level.get("type") != "ByteLevel":
        raise unsupported
    if byte_level.get("add_prefix_space"):
        raise MlxgptError(f"{path}: add_prefix_space=true is not supported")
    if not split and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if len(split) == 1 and isinstance(split[0], dict) and not byte_level.get("use_regex", True):
        s = split[0]
        regex = (s.get("pattern") or {}).get("Regex")
        if (
            s.get("type") == "Split"
            and regex
            and s.get("behavior") == "Isolated"
            and not s.get("invert")
        ):
            return regex
    raise unsupported


def _build_bpe(
    vocab: dict[str, int], merges: list, special: dict[str, int], pattern: str, source: Path
) -> Tokenizer:
    """Hugging Face vocab + merges -> tiktoken ranks in merge order (see BPETokenizer)."""
    special_ids = set(special.values())
    by_bytes: dict[bytes, int] = {}
    extra: dict[int, bytes] = {}
    for s, i in vocab.items():
        if i in special_ids:
            continue
        b = _from_hf(s)
        if b is None:  # not byte-level: decode only, as its own text
            extra[i] = s.encode("utf-8")
        else:
            by_bytes[b] = i
    single = sorted((i, b) for b, i in by_bytes.items() if len(b) == 1)
    if len(single) != 256:
        raise MlxgptError(f"{source}: the vocabulary lacks {256 - len(single)} of the 256 bytes")
    ranks = {b: r for r, (_, b) in enumerate(single)}
    merge_bytes = []
    for n, (a, b) in enumerate(merges, 1):
        ab, bb = _from_hf(a), _from_hf(b)
        if ab not in by_bytes or bb not in by_bytes or ab + bb not in by_bytes:
            raise MlxgptError(f"{source}: merge {n} ({a} {b}) uses tokens not in the vocabulary")
        merge_bytes.append((ab, bb))
        ranks.setdefault(ab + bb, len(ranks))  # a token made by several merges: the first wins
    for b, i in by_bytes.items():
        if b not in ranks:  # never produced by a merge: decode only
            extra[i] = b
    token_ids = np.empty(len(ranks), np.int64)
    for b, r in ranks.items():
        token_ids[r] = by_bytes[b]
    identity = bool((token_ids == np.arange(len(ranks))).all())
    if identity and not extra and pattern == GPT2_PATTERN:
        # Recognise the well-known vocabularies and share their (cached) tokenizers.
        byte_ids = all(ranks[bytes((i,))] == i for i in range(256))
        if special == {EOT: 256} and not merges and byte_ids:
            return byte_tokenizer()
        gpt2 = gpt2_tokenizer()
        if special == gpt2.special_tokens and ranks == gpt2._ranks:
            return gpt2
    if not _merges_match(ranks, merge_bytes):
        # tiktoken merges by the rank of the joined token; that equals merging by the rank of the
        # pair (Hugging Face) when each token's lower ranks rebuild it by its own merge, which
        # holds for GPT-2 and for what BPE trainers produce. Otherwise rare words may differ.
        warnings.warn(
            f"{source}: BPE merges are not self-consistent; tiktoken may split "
            "some words differently from Hugging Face",
            stacklevel=2,
        )
    return BPETokenizer(
        "bpe",
        ranks,
        pattern,
        special,
        token_ids=None if identity else token_ids,
        extra_tokens=extra,
        merges=merge_bytes,
    )


def _read_hf_parts(folder: Path) -> tuple[tuple, Path] | None:
    if (folder / HF_TOKENIZER_FILE).is_file():
        return _read_tokenizer_json(folder / HF_TOKENIZER_FILE), folder / HF_TOKENIZER_FILE
    has_vocab, has_merges = (folder / VOCAB_FILE).is_file(), (folder / MERGES_FILE).is_file()
    if has_vocab and has_merges:
        return _read_vocab_merges(folder), folder / VOCAB_FILE
    if has_vocab or has_merges:
        missing = MERGES_FILE if has_vocab else VOCAB_FILE
        raise MlxgptError(
            f"{folder}: has {VOCAB_FILE if has_vocab else MERGES_FILE} but no {missing}"
        )
    return None


def tokenizer_from_hf_folder(folder: Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face folder (tokenizer.json, else vocab.json + merges.txt);
    None if it has neither. GPT-2's own vocabulary comes back as ``gpt2_tokenizer()``."""
    found = _read_hf_parts(Path(folder))
    if found is None:
        return None
    (vocab, merges, special, pattern), source = found
    return _build_bpe(vocab, merges, special, pattern, source)


def load_tokenizer(folder: Path, meta: dict[str, Any] | None) -> Tokenizer:
    """The tokenizer of a model folder, from the description ``save`` returned (``meta``).

    Without a description: Hugging Face tokenizer files if present, else token ids only.
    """
    folder = Path(folder)
    kind = (meta or {}).get("type")
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "byte":
        return byte_tokenizer()
    if kind == "ids":
        return IdTokenizer(int(meta.get("vocab_size") or 0))
    if kind == "bpe":
        found = _read_hf_parts(folder)
        if found is None:
            raise MlxgptError(f"{folder}: tokenizer files ({VOCAB_FILE}, {MERGES_FILE}) missing")
        (vocab, merges, special, pattern), source = found
        pattern = meta.get("pattern", pattern)
        special = meta.get("special_tokens", special)
        tok = _build_bpe(vocab, merges, special, pattern, source)
        if meta.get("eot_id") is not None and tok.name == "bpe":  # never alter cached ones
            tok.eot_id = int(meta["eot_id"])
        return tok
    if meta is not None and kind is not None:
        raise MlxgptError(f"{folder}: unknown tokenizer type {kind!r} in config.json")
    tok = tokenizer_from_hf_folder(folder)
    if tok is not None:
        return tok
    vocab_size = 0
    if (folder / "config.json").is_file():
        cfg = _read_json_file(folder / "config.json")
        vocab_size = int(cfg.get("vocab_size") or 0) if isinstance(cfg, dict) else 0
    return IdTokenizer(vocab_size)
