"""Tokenizers: GPT-2 BPE through tiktoken, a byte-level tokenizer, token ids only; their files in
model folders (Hugging Face ``vocab.json`` + ``merges.txt``)."""

from .tokenizer import (
    EOT,
    BPETokenizer,
    ByteTokenizer,
    IdTokenizer,
    StreamDecoder,
    Tokenizer,
    byte_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_from_hf_folder,
)

__all__ = ["EOT", "BPETokenizer", "ByteTokenizer", "IdTokenizer", "StreamDecoder", "Tokenizer",
           "byte_tokenizer", "gpt2_tokenizer", "load_tokenizer", "tokenizer_from_hf_folder"]
