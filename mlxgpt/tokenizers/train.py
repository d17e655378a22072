"""Train a byte-level BPE tokenizer of GPT-2's kind on your own text.

Hugging Face ``tokenizers`` (Rust, on every core) learns the merges, splitting text with GPT-2's
pre-tokenizer (``ByteLevel(add_prefix_space=False)`` uses GPT-2's regex). The result is numbered
as GPT-2 is: ids 0-255 are the bytes (byte b has id b, as in the byte tokenizer), then one id per
merge in merge order, and ``<|endoftext|>`` last (GPT-2's 50256). Ids are then tiktoken's merge
ranks, so it runs with no id mapping, and ``save`` writes ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json``, which transformers and mlx-lm load with the same ids::

    tok = train_bpe(["some text", "more text"], 1024)   # texts, or a generator of them
    tok.save(folder)

``mlxgpt.data.corpus.train_tokenizer(paths, n)`` trains on files (what the CLI uses).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from ..checks import shown
from ..errors import MlxgptError
from .base import EOT, GPT2_PATTERN, text_pieces
from .bpe import BPETokenizer, merges_match
from .hf_files import from_hf

MIN_VOCAB = 258  # 256 bytes + <|endoftext|> is the byte tokenizer; BPE needs a merge at least
MAX_VOCAB = 2**20  # 1M ids: four times the largest vocabularies in use
INSTALL_HINT = "pip install 'mlxgpt[tokenizer]'"


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a size outside MIN_VOCAB..MAX_VOCAB before the trainer sees it: the Rust trainer
    reserves memory for the whole vocabulary up front and aborts the process (no exception) when
    that fails."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise MlxgptError(f"the vocabulary size must be in {MIN_VOCAB}..{MAX_VOCAB} (more than "
                          f"257: 256 bytes + {EOT}), got {shown(vocab_size)}")


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
    """A byte-level BPE of ``vocab_size`` ids learned from ``texts`` (fewer ids if the text runs
    out of pairs to merge: ``vocab_size`` of the result says)."""
    check_vocab_size(vocab_size)
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers
    except ImportError:
        raise MlxgptError(f"training a tokenizer needs Hugging Face tokenizers: "
                          f"{INSTALL_HINT}") from None
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # <|endoftext|> is added after, with the last id
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        special_tokens=[],
        show_progress=progress and sys.stderr.isatty(),
    )
    # Long texts reach the trainer in pieces cut where GPT-2's split is unchanged: its threads
    # share them, and the counts are those of the whole texts.
    pieces = (p.decode("utf-8") for t in texts for p in text_pieces(t.encode("utf-8")))
    hf.train_from_iterator(pieces, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    if not merges:  # what is left is the byte tokenizer
        raise MlxgptError("the text has nothing to merge (no pre-token is two bytes or more); "
                          "use the byte tokenizer")
    return _gpt2_numbered([m.split(" ") if isinstance(m, str) else m for m in merges])


def _gpt2_numbered(hf_merges: list) -> BPETokenizer:
    """Bytes first, then the merges in order, then <|endoftext|>: ranks and ids coincide."""
    ranks = {bytes([b]): b for b in range(256)}
    merges = []
    for a, b in hf_merges:
        pair = from_hf(a), from_hf(b)
        if pair[0] is None or pair[1] is None:
            raise MlxgptError(f"the trainer made a merge outside the byte alphabet ({a} {b})")
        merges.append(pair)
        ranks.setdefault(pair[0] + pair[1], len(ranks))
    # tiktoken merges by the rank of the joined token, Hugging Face by the rank of the pair:
    # the same splits when every token is made by exactly one merge, its own.
    if len(ranks) != 256 + len(merges) or not merges_match(ranks, merges):
        raise MlxgptError("the trained merges are not self-consistent (a token made twice)")
    return BPETokenizer("bpe", ranks, GPT2_PATTERN, {EOT: len(ranks)}, merges=merges)
