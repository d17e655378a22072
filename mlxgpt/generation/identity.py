"""What makes two tokenizers the same one: a digest of everything that decides their ids.

A draft model must share its model's tokenizer, and a prompt cache file holds token ids that mean
something only under the tokenizer that made them; both compare :func:`tokenizer_digest`.
"""

from __future__ import annotations

import hashlib
import json
import weakref

from ..tokenizers import Tokenizer

_DIGESTS: weakref.WeakKeyDictionary[Tokenizer, str] = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 (hex) of the bytes of every id, the special tokens, the pre-tokenizer pattern and
    the BPE merge ranks: equal digests encode and decode alike. Cached per tokenizer object."""
    if tokenizer in _DIGESTS:
        return _DIGESTS[tokenizer]
    h = hashlib.sha256()
    head = {
        "name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pattern": getattr(tokenizer, "pattern", None),
        "special_tokens": getattr(tokenizer, "special_tokens", None),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for i in range(tokenizer.vocab_size):
        try:
            b = tokenizer.token_bytes(i)
        except Exception:  # a hole in the vocabulary (an id no text maps to)
            b = b""
        h.update(len(b).to_bytes(4, "little") + b)
    ranks = getattr(tokenizer, "ranks", None)  # BPE: the merge order decides the encoding
    if ranks:
        for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            h.update(r.to_bytes(4, "little") + len(b).to_bytes(4, "little") + b)
    digest = h.hexdigest()
    _DIGESTS[tokenizer] = digest
    return digest
