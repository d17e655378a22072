"""A model folder's tokenizer: from the description in its ``config.json``, or from Hugging Face
files (GPT-2's own vocabulary and the byte vocabulary are recognised and shared)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_int, shown
from ..errors import MlxgptError
from .base import EOT, GPT2_PATTERN, IdTokenizer, Tokenizer
from .bpe import BPETokenizer, gpt2_tokenizer, merges_match
from .byte import byte_tokenizer
from .hf_files import (
    MAX_ID,
    MERGES_FILE,
    VOCAB_FILE,
    check_special,
    from_hf,
    read_add_bos,
    read_chat_config,
    read_hf_parts,
    read_json_file,
)


def build_bpe(
    vocab: dict[str, int], merges: list, special: dict[str, int], pattern: str, source: Path
) -> Tokenizer:
    """Hugging Face vocab + merges -> tiktoken ranks in merge order (see BPETokenizer)."""
    special_ids = set(special.values())
    by_bytes: dict[bytes, int] = {}
    extra: dict[int, bytes] = {}
    for s, i in vocab.items():
        if i in special_ids:
            continue
        b = from_hf(s)
        if b is None:  # not byte-level: decode only, as its own text
            extra[i] = s.encode("utf-8")
        else:
            by_bytes[b] = i
    single = sorted((i, b) for b, i in by_bytes.items() if len(b) == 1)
    if len(single) < 128:
        raise MlxgptError(f"{source}: the vocabulary lacks {256 - len(single)} of the 256 bytes "
                          "(not a byte-level BPE)")
    ranks = {b: r for r, (_, b) in enumerate(single)}
    # Bytes the vocabulary lacks (SmolLM2's has no 0x04 nor 0xF5..0xFF) get ranks that map to
    # no id: Hugging Face and llama.cpp drop such bytes, and so does encode.
    for b in range(256):
        ranks.setdefault(bytes((b,)), len(ranks))
    merge_bytes = []
    for n, (a, b) in enumerate(merges, 1):
        ab, bb = from_hf(a), from_hf(b)
        if ab not in by_bytes or bb not in by_bytes or ab + bb not in by_bytes:
            raise MlxgptError(f"{source}: merge {n} ({shown(a)} {shown(b)}) uses tokens not in "
                              "the vocabulary")
        merge_bytes.append((ab, bb))
        ranks.setdefault(ab + bb, len(ranks))  # a token made by several merges: the first wins
    for b, i in by_bytes.items():
        if b not in ranks:  # never produced by a merge: decode only
            extra[i] = b
    token_ids = np.empty(len(ranks), np.int64)
    for b, r in ranks.items():
        token_ids[r] = by_bytes.get(b, -1)
    identity = bool((token_ids == np.arange(len(ranks))).all())
    if identity and not extra and pattern == GPT2_PATTERN:
        # Recognise the well-known vocabularies and share their (cached) tokenizers.
        byte_ids = all(ranks[bytes((i,))] == i for i in range(256))
        if special == {EOT: 256} and not merges and byte_ids:
            return byte_tokenizer()
        gpt2 = gpt2_tokenizer()
        if special == gpt2.special_tokens and ranks == gpt2.ranks:
            return gpt2
    if not merges_match(ranks, merge_bytes):
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


def tokenizer_from_hf_folder(folder: Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face folder (tokenizer.json, else vocab.json + merges.txt);
    None if it has neither. GPT-2's own vocabulary comes back as ``gpt2_tokenizer()``."""
    found = read_hf_parts(Path(folder))
    if found is None:
        return None
    (vocab, merges, special, pattern), source = found
    tok = build_bpe(vocab, merges, special, pattern, source)
    if tok.name == "bpe":  # never alter the shared gpt2/byte tokenizers
        chat = read_chat_config(Path(folder))
        special = tok.special_tokens
        if chat.get("eos_token") in special:  # a chat model's end of turn
            tok.eot_id = special[chat["eos_token"]]
        add_bos, bos = read_add_bos(Path(folder), chat.get("bos_token"))
        # GPT-2's files name <|endoftext|> both bos and eos: no BOS of its own, unless added
        if bos in special and (add_bos or bos != chat.get("eos_token")):
            tok.bos_id = special[bos]
            tok.add_bos = add_bos
        tok.chat_template = chat.get("chat_template")
    return tok


def load_tokenizer(folder: Path, meta: dict[str, Any] | None) -> Tokenizer:
    """The tokenizer of a model folder, from the description ``save`` returned (``meta``).

    Without a description: Hugging Face tokenizer files if present, else token ids only.
    """
    folder = Path(folder)
    if meta is not None and not isinstance(meta, dict):
        raise MlxgptError(f"{folder}: the tokenizer description in config.json must be an "
                          f"object, got {shown(meta)}")
    kind = (meta or {}).get("type")
    where = f"{folder / 'config.json'}: mlxgpt.tokenizer"
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "byte":
        return byte_tokenizer()
    if kind == "ids":
        return IdTokenizer(check_int(meta.get("vocab_size") or 0, f"{where}.vocab_size", 0,
                                     MAX_ID))
    if kind == "bpe":
        found = read_hf_parts(folder)
        if found is None:
            raise MlxgptError(f"{folder}: tokenizer files ({VOCAB_FILE}, {MERGES_FILE}) missing")
        (vocab, merges, special, pattern), source = found
        pattern = meta.get("pattern", pattern)
        if not isinstance(pattern, str):
            raise MlxgptError(f"{where}.pattern must be a string, got {shown(pattern)}")
        special = check_special(meta.get("special_tokens", special), f"{where}.special_tokens")
        tok = build_bpe(vocab, merges, special, pattern, source)
        if tok.name == "bpe":  # never alter the shared (cached) tokenizers
            for key in ("eot_id", "bos_id"):
                if meta.get(key) is not None:
                    setattr(tok, key, check_int(meta[key], f"{where}.{key}", 0,
                                                tok.vocab_size - 1))
            tok.add_bos = meta.get("add_bos", False)
            if not isinstance(tok.add_bos, bool):
                raise MlxgptError(f"{where}.add_bos must be true or false, got "
                                  f"{shown(tok.add_bos)}")
            tok.chat_template = read_chat_config(folder).get("chat_template")
        return tok
    if meta is not None and kind is not None:
        raise MlxgptError(f"{folder}: unknown tokenizer type {kind!r} in config.json")
    tok = tokenizer_from_hf_folder(folder)
    if tok is not None:
        return tok
    vocab_size = 0
    if (folder / "config.json").is_file():
        cfg = read_json_file(folder / "config.json")
        vocab_size = cfg.get("vocab_size") or 0 if isinstance(cfg, dict) else 0
        check_int(vocab_size, f"{folder / 'config.json'}: vocab_size", 0, MAX_ID)
    return IdTokenizer(vocab_size)
