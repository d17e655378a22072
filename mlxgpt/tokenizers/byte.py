"""The byte-level tokenizer: 256 byte ids and ``<|endoftext|>`` (257 ids), for small scratch
models."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .base import EOT, GPT2_PATTERN, Tokenizer, as_ids, bad_id
from .hf_files import write_hf_files


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
        raise bad_id(token_id, self.vocab_size)

    def decode_bytes(self, ids) -> bytes:
        ids = as_ids(ids)
        if all(0 <= i < 256 for i in ids):
            return bytes(ids)
        return super().decode_bytes(ids)

    def save(self, folder: Path) -> dict[str, Any]:
        # Also a valid (merge-free) byte-level BPE for Hugging Face: byte b has id b.
        vocab = {i: bytes((i,)) for i in range(256)}
        write_hf_files(Path(folder), vocab, [], {EOT: self.eot_id}, self.eot_id, GPT2_PATTERN)
        return {"type": "byte"}


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: pair them up, lone ones -> U+FFFD (as tiktoken)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
