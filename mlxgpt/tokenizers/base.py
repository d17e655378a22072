"""Tokenizer base class, the stream decoder and the ids-only tokenizer: what every tokenizer
shares."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import MlxgptError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM's: every digit on its own (Hugging Face's Digits(individual_digits) before GPT-2's split,
# llama.cpp's "smollm"), as one regex: no space joins a digit, and whitespace before a digit
# ends as it ends before the end of the text.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# Llama 3's (llama.cpp's "llama-bpe"; tiktoken's cl100k split).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


EOT = "<|endoftext|>"


# Bytes that begin a character which is not whitespace (nor a UTF-8 continuation byte): ASCII
# '!'..'~' and the lead bytes of U+00C0-U+0FFF and U+4000-U+10FFFF, ranges without any of
# Unicode's White_Space characters (U+0085, U+00A0, U+1680, U+2000-U+205F and U+3000 are not).
_NOT_SPACE_START = frozenset([*range(0x21, 0x7F), *range(0xC3, 0xE1), *range(0xE4, 0xF5)])


def text_pieces(data: bytes, size: int = 1 << 20) -> list[bytes]:
    """Cut UTF-8 text into pieces of about ``size`` bytes, each cut just before a newline that is
    followed by a character that is not whitespace.

    There GPT-2's pre-tokenizer (``GPT2_PATTERN``) splits the whole text as it splits the pieces:
    the newline is a pre-token of its own (nothing joins it to the character after) and the
    whitespace before it ends a pre-token in both cases. So encoding (or training on) the pieces
    one by one gives what the whole text gives, and every piece is whole UTF-8. Text without
    such a newline stays in one piece. Other split patterns may join across the cut.
    """
    pieces, start, end = [], 0, len(data)
    while end - start > size:
        cut = data.find(b"\n", start + size, end - 1)
        while cut >= 0 and data[cut + 1] not in _NOT_SPACE_START:
            cut = data.find(b"\n", cut + 1, end - 1)
        if cut < 0:
            break
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


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
    eot_id: int | None = None  # where generation ends: end of text, or a chat model's end of turn
    chat_template: str | None = None  # Jinja (Hugging Face's chat_template), see chat_template.py
    bos_id: int | None = None  # the template's bos_token, and what ``add_bos`` puts first
    # Whether text read from its start begins with bos_id (Llama 2/3's tokenizers), as
    # transformers' tokenizer(text) and llama.cpp's tokenize(add_special) give it.
    add_bos: bool = False

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. With ``allow_special=False`` "<|endoftext|>" is ordinary text."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, as ordinary text (what tokenizing a corpus needs)."""
        return [self.encode(t) for t in texts]

    @property
    def prepends_bos(self) -> bool:
        """Whether :meth:`encode_prompt` puts ``bos_id`` first (``add_bos`` and a BOS id)."""
        return self.add_bos and self.bos_id is not None

    def with_bos(self, ids: list[int]) -> list[int]:
        """``ids`` as the start of a model's input: ``bos_id`` first where the tokenizer adds
        it, unless they already start with it."""
        bos = self.bos_id
        if self.add_bos and bos is not None and ids[:1] != [bos]:
            return [bos, *ids]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Text that a model reads from its start (a prompt, a training example) -> its input
        ids: ``encode`` (ordinary text), with BOS first where ``add_bos`` says.

        Not for text that continues other ids (after a cached prefix), nor for a chat
        template's output: the template writes ``bos_token`` itself, and transformers'
        ``apply_chat_template`` adds no special tokens to it either.
        """
        return self.with_bos(self.encode(text) if text else [])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id decodes to."""
        raise NotImplementedError

    def save(self, folder: Path) -> dict[str, Any]:
        """Write this tokenizer's files into ``folder``; return the description for config."""
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(i) for i in as_ids(ids))

    def decode(self, ids) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.token_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def as_ids(ids) -> list[int]:
    """Accept a list, tuple, numpy or mx array (1-D) or a single int."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def bad_id(token_id: int, vocab_size: int) -> MlxgptError:
    return MlxgptError(f"token id {token_id} is not in the tokenizer's vocabulary ({vocab_size})")


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
            raise bad_id(token_id, self.vocab_size)
        return f"<{token_id}>".encode()

    def save(self, folder: Path) -> dict[str, Any]:
        return {"type": "ids", "vocab_size": self.vocab_size}
