"""Tokenizers: GPT-2 BPE through tiktoken (local files only), a byte-level tokenizer, token ids.

Every tokenizer turns text into ids and ids back into bytes; text is those bytes decoded as UTF-8
with U+FFFD for invalid sequences (what tiktoken and Hugging Face do). ``StreamDecoder`` decodes
one id at a time for streaming and emits only complete characters.

A model folder carries its tokenizer: ``Tokenizer.save(folder)`` writes the files and returns a
JSON-able description that goes into ``config.json``; ``load_tokenizer(folder, meta)`` reverses
it. BPE and byte tokenizers are written as Hugging Face ``vocab.json`` + ``merges.txt`` (plus a
small ``tokenizer_config.json``) so ``transformers.AutoTokenizer`` and mlx-lm load the same
folder; GPT-2 also gets its tiktoken ranks file (``tokenizer.tiktoken``).

Modules: :mod:`.base` (the interface, stream decoding, ids only), :mod:`.bpe` (tiktoken BPE,
GPT-2), :mod:`.byte`, :mod:`.hf_files` (Hugging Face files), :mod:`.load` (a folder's tokenizer),
:mod:`.train` (train a byte-level BPE on your text; needs Hugging Face ``tokenizers``).
"""

from .base import EOT, GPT2_PATTERN, IdTokenizer, StreamDecoder, Tokenizer
from .bpe import BPETokenizer, gpt2_tokenizer, read_tiktoken_ranks
from .byte import ByteTokenizer, byte_tokenizer
from .load import load_tokenizer, tokenizer_from_hf_folder

__all__ = ["EOT", "GPT2_PATTERN", "BPETokenizer", "ByteTokenizer", "IdTokenizer", "StreamDecoder",
           "Tokenizer", "byte_tokenizer", "gpt2_tokenizer", "load_tokenizer",
           "read_tiktoken_ranks", "tokenizer_from_hf_folder"]
