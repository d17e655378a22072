"""GGUF files of architecture ``llama`` (SmolLM2, TinyLlama, Llama 3, ...) -> a Llama model and
its tokenizer, read by MLX itself (``mx.load``; no other package).

Tensors: F32, F16 and BF16 as they are; Q4_0, Q4_1 and Q8_0 map exactly onto MLX's affine
quantization with group size 32 (value = scale * q + bias: Q4_1's scale d and minimum m; Q4_0's
d and -8d; Q8_0's d and -128d), which is how ``mx.load`` returns them. Scales and biases come
as float16; in float32 the dequantized weights equal llama.cpp's bit for bit. Other types
(K-quants, ...) are refused in one line. A file may mix types: each layer keeps its own
(``model_quantization`` records them per module).

llama.cpp's converter permutes the rows of the query and key projections so that each head's
rotary pairs are interleaved; :func:`permute_rotary` undoes it on import (whole rows move, so
quantization groups stay intact) and redoes it on export, and the model rotates halves as
``transformers`` does.

Whether quantized layers stay quantized follows the backend record (``keep_quantized`` of
:class:`mlxgpt.core.backend.Backend`): on a GPU quantized matmuls are the fast path; on a CPU
they are dequantized when a measurement there (kept for the machine) says float32 is faster.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx

from ..core.backend import Backend
from ..core.backend import backend as current_backend
from ..core.llama import Llama, LlamaConfig
from ..errors import MlxgptError
from ..tokenizers import GPT2_PATTERN, Tokenizer
from ..tokenizers.base import LLAMA3_PATTERN, SMOLLM_PATTERN
from ..tokenizers.load import build_bpe

ARCH = "llama"
GROUP = 32  # every GGUF block type MLX maps holds 32 values
# llama.cpp's tokenizer.ggml.pre -> the split regex (unknown ones are refused)
PRE_TOKENIZERS = {"default": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                  "llama3": LLAMA3_PATTERN, "llama-bpe": LLAMA3_PATTERN,
                  "llama-v3": LLAMA3_PATTERN}
# the pre-tokenisers for which llama.cpp adds BOS when tokenizer.ggml.add_bos_token is absent
BOS_PRE = frozenset({"llama3", "llama-bpe", "llama-v3"})
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tensor_names(n_layer: int) -> dict[str, str]:
    """GGUF module name -> the model's (``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``)."""
    out = dict(_GLOBAL)
    for i in range(n_layer):
        out.update({f"blk.{i}.{g}": f"model.layers.{i}.{m}" for g, m in _BLOCK.items()})
    return out


def export_names(n_layer: int) -> dict[str, str]:
    """The model's parameter name -> GGUF tensor name, every parameter a Llama may have."""
    return {f"{m}.{leaf}": f"{g}.{leaf}" for g, m in tensor_names(n_layer).items()
            for leaf in ("weight", "bias")}


def to_llama_cpp_rows(key: str, w: mx.array, cfg: LlamaConfig) -> mx.array:
    """A weight in the row order llama.cpp's files use (query/key rows permuted)."""
    if ".self_attn.q_proj." in key:
        return permute_rotary(w, cfg.n_head, undo=False)
    if ".self_attn.k_proj." in key:
        return permute_rotary(w, cfg.n_kv_head, undo=False)
    return w


def permute_rotary(w: mx.array, n_head: int, *, undo: bool) -> mx.array:
    """llama.cpp's row order for a query/key projection (``undo``: back to Hugging Face's).
    Rows are (head, half, i) in Hugging Face's order and (head, i, half) in llama.cpp's."""
    rows = w.shape[0]
    inner = (2, rows // n_head // 2) if not undo else (rows // n_head // 2, 2)
    return w.reshape(n_head, *inner, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGML tensor types MLX maps exactly (F32, F16, Q4_0, Q4_1, Q8_0, BF16), and names for others
SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M"}
# metadata value type -> fixed size in bytes (8: string and 9: array are walked)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_types(path: Path) -> dict[str, int]:
    """Each tensor's GGML type, from the file's header (its metadata is skipped, not read):
    what ``mx.load`` does not say."""

    def take(f: BinaryIO, n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise MlxgptError(f"{path}: not a readable GGUF file (its header is truncated)")
        return b

    def u(f: BinaryIO, fmt: str) -> int:
        return struct.unpack("<" + fmt, take(f, struct.calcsize(fmt)))[0]

    def skip(f: BinaryIO, kind: int) -> None:
        if kind == 8:
            f.seek(u(f, "Q"), 1)
        elif kind == 9:
            item, n = u(f, "I"), u(f, "Q")
            if item in _SIZES:
                f.seek(n * _SIZES[item], 1)
            else:
                for _ in range(n):
                    skip(f, item)
        elif kind in _SIZES:
            f.seek(_SIZES[kind], 1)
        else:
            raise MlxgptError(f"{path}: not a readable GGUF file (metadata type {kind})")

    with path.open("rb") as f:
        if take(f, 4) != b"GGUF":
            raise MlxgptError(f"{path}: not a readable GGUF file (no GGUF magic)")
        version = u(f, "I")
        if version not in (2, 3):
            raise MlxgptError(f"{path}: not a readable GGUF file (version {version}; "
                              "mlxgpt reads 2 and 3)")
        n_tensors, n_kv = u(f, "Q"), u(f, "Q")
        for _ in range(n_kv):
            f.seek(u(f, "Q"), 1)  # the key
            skip(f, u(f, "I"))
        types = {}
        for _ in range(n_tensors):
            name = take(f, u(f, "Q")).decode("utf-8", "replace")
            f.seek(8 * u(f, "I"), 1)  # the dimensions
            types[name] = u(f, "I")
            f.seek(8, 1)  # the data offset
    return types


def load_gguf_file(path: str | os.PathLike) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """``mx.load`` of a GGUF file: (tensors, metadata), errors in one line; tensor types MLX
    would not map exactly (K-quants, ...) are refused first."""
    p = Path(path)
    if not p.is_file():
        raise MlxgptError(f"{p}: no such file")
    for name, kind in tensor_types(p).items():
        if kind not in SUPPORTED_TYPES:
            raise MlxgptError(f"{p}: tensor {name} is {OTHER_TYPES.get(kind, f'type {kind}')}; "
                              f"mlxgpt reads {', '.join(SUPPORTED_TYPES.values())} tensors")
    try:
        return mx.load(str(p), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError on bad or unsupported files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxgptError(f"{p}: cannot read this GGUF file ({first}); mlxgpt reads F32, F16, "
                          "BF16, Q8_0, Q4_0 and Q4_1 tensors") from None


def _value(meta: dict[str, Any], key: str, path: Path, kind: type = int,
           default: Any = MlxgptError) -> Any:
    """One metadata value as ``kind`` (int, float, str), checked."""
    v = meta.get(key)
    if v is None:
        if default is MlxgptError:
            raise MlxgptError(f"{path}: GGUF key {key} missing")
        return default
    if isinstance(v, mx.array):
        if v.ndim != 0 or kind is str:
            raise MlxgptError(f"{path}: GGUF key {key} is not a single {kind.__name__}")
        v = v.item()
    if kind is str:
        if not isinstance(v, str):
            raise MlxgptError(f"{path}: GGUF key {key} is not a string")
        return v
    if isinstance(v, str) or (kind is int and v != int(v)):
        raise MlxgptError(f"{path}: GGUF key {key} is {v!r}, not a {kind.__name__}")
    return kind(v)


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], path: Path) -> LlamaConfig:
    """The Llama hyper-parameters of a GGUF file's metadata."""
    a = ARCH
    n_embd = _value(meta, f"{a}.embedding_length", path)
    n_head = _value(meta, f"{a}.attention.head_count", path)
    emb = weights.get("token_embd.weight")
    if emb is None:
        raise MlxgptError(f"{path}: tensor token_embd.weight missing")
    scaling = _value(meta, f"{a}.rope.scaling.type", path, str, "none")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"rope_type": "linear",
                        "factor": _value(meta, f"{a}.rope.scaling.factor", path, float)}
    elif scaling != "none":
        raise MlxgptError(f"{path}: rope scaling {scaling!r} is not supported (linear)")
    if "rope_freqs.weight" in weights:
        raise MlxgptError(f"{path}: rope frequency factors (rope_freqs, Llama 3.1's scaling) "
                          "are not supported in GGUF files; convert the Hugging Face folder")
    head_dim = _value(meta, f"{a}.attention.key_length", path, int, n_embd // max(n_head, 1))
    rot = _value(meta, f"{a}.rope.dimension_count", path, int, head_dim)
    if rot != head_dim:
        raise MlxgptError(f"{path}: rotary positions on {rot} of {head_dim} dimensions per head "
                          "are not supported")
    eps = _value(meta, f"{a}.attention.layer_norm_rms_epsilon", path, float)
    return LlamaConfig(
        vocab_size=int(emb.shape[0]),
        hidden_size=n_embd,
        intermediate_size=_value(meta, f"{a}.feed_forward_length", path),
        num_hidden_layers=_value(meta, f"{a}.block_count", path),
        num_attention_heads=n_head,
        num_key_value_heads=_value(meta, f"{a}.attention.head_count_kv", path, int, n_head),
        head_dim=head_dim,
        max_position_embeddings=_value(meta, f"{a}.context_length", path),
        # stored as float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
        rms_norm_eps=float(f"{eps:.7g}"),
        rope_theta=_value(meta, f"{a}.rope.freq_base", path, float, 10000.0),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in weights,
        tie_word_embeddings="output.weight" not in weights,
    )


def gguf_weights(weights: dict[str, mx.array], cfg: LlamaConfig,
                 path: Path) -> tuple[dict[str, mx.array], dict[str, dict[str, int]]]:
    """The tensors under the model's names, query/key rows in Hugging Face's order; and each
    quantized module's {group_size, bits}."""
    names = tensor_names(cfg.n_layer)
    out: dict[str, mx.array] = {}
    quant: dict[str, dict[str, int]] = {}
    for key, w in weights.items():
        module, _, leaf = key.rpartition(".")
        if module not in names or leaf not in ("weight", "bias", "scales", "biases"):
            raise MlxgptError(f"{path}: tensor {key} is not part of a Llama model")
        name = names[module]
        if module.endswith((".attn_q", ".attn_k")):
            heads = cfg.n_head if module.endswith(".attn_q") else cfg.n_kv_head
            w = permute_rotary(w, heads, undo=True)
        out[f"{name}.{leaf}"] = w
        if leaf == "scales":  # packed (out, in * bits / 32) uint32, scales (out, in / 32)
            packed = weights[f"{module}.weight"]
            bits, rest = divmod(packed.shape[-1] * 32, w.shape[-1] * GROUP)
            if packed.dtype != mx.uint32 or rest or bits not in (4, 8):
                raise MlxgptError(f"{path}: tensor {module} has an unexpected quantized layout")
            quant[name] = {"group_size": GROUP, "bits": bits}
    return out, quant


def gguf_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    """The byte-level BPE of a GGUF file (``tokenizer.ggml.model`` gpt2), with its special
    tokens, end-of-text (or end-of-turn) id, bos (and whether text starts with it) and chat
    template."""
    model = _value(meta, "tokenizer.ggml.model", path, str)
    if model != "gpt2":
        raise MlxgptError(f"{path}: tokenizer {model!r} is not supported (byte-level BPE, "
                          "tokenizer.ggml.model = gpt2, only)")
    pre = _value(meta, "tokenizer.ggml.pre", path, str, "default")
    if pre not in PRE_TOKENIZERS:
        raise MlxgptError(f"{path}: pre-tokeniser {pre!r} is not supported "
                          f"({', '.join(sorted(PRE_TOKENIZERS))})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise MlxgptError(f"{path}: tokenizer.ggml.tokens / merges missing or not lists")
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else mx.array(types).tolist()
    if len(types) != len(tokens):
        raise MlxgptError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    vocab, special = {}, {}
    for i, (s, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (CONTROL, USER_DEFINED):
            special[s] = i
        elif kind != UNUSED:
            vocab[s] = i
    pairs = []
    for n, m in enumerate(merges, 1):
        a, sep, b = m.partition(" ") if isinstance(m, str) else ("", "", "")
        if not sep or not a or not b:
            raise MlxgptError(f"{path}: merge {n} ({m!r}) is not two tokens")
        pairs.append((a, b))
    tok = build_bpe(vocab, pairs, special, PRE_TOKENIZERS[pre], path)
    if tok.name != "bpe":  # never alter the shared gpt2/byte tokenizers
        return tok
    eos = _value(meta, "tokenizer.ggml.eos_token_id", path, int, None)
    bos = _value(meta, "tokenizer.ggml.bos_token_id", path, int, None)
    for what, i in (("eos", eos), ("bos", bos)):
        if i is not None and not 0 <= i < len(tokens):
            raise MlxgptError(f"{path}: {what} token id {i} is outside the vocabulary")
    if eos is not None:
        tok.eot_id = eos
    tok.bos_id = bos
    # llama.cpp's rule: the key where present, else true for Llama 3's pre-tokeniser only
    add_bos = _value(meta, "tokenizer.ggml.add_bos_token", path, bool, pre in BOS_PRE)
    tok.add_bos = add_bos and bos is not None
    tok.chat_template = _value(meta, "tokenizer.chat_template", path, str, None)
    return tok


def read_llama_gguf(path: str | os.PathLike, dtype: mx.Dtype | None = None, *,
                    loaded: tuple[dict, dict] | None = None,
                    backend: Backend | None = None) -> tuple[Llama, Tokenizer]:
    """A Llama GGUF file -> (model, tokenizer) for ``backend`` (default: the default device's
    record). ``dtype`` (None: the backend's) is the float dtype; quantized layers stay quantized
    where ``backend.keep_quantized`` says, and are otherwise dequantized exactly (float32
    scales)."""
    from .folder import build_model
    from .quantize import dequantize

    path = Path(path)
    weights, meta = loaded or load_gguf_file(path)
    cfg = gguf_config(meta, weights, path)
    tok = gguf_tokenizer(meta, path)
    if tok.vocab_size > cfg.vocab_size:
        raise MlxgptError(f"{path}: {tok.vocab_size} tokens but {cfg.vocab_size} embedding rows")
    arrays, quant = gguf_weights(weights, cfg, path)
    backend = backend or current_backend()
    dtype = dtype or backend.dtype
    keep = bool(quant) and backend.keep_quantized
    # float32 scales dequantize exactly; kept quantized, they take the model's dtype
    arrays = {k: v.astype(dtype if keep or not k.endswith((".scales", ".biases"))
                          else mx.float32)
              if mx.issubdtype(v.dtype, mx.floating) else v for k, v in arrays.items()}
    quantization = {"group_size": GROUP, "bits": 4, **quant} if quant else None  # each its own
    model = build_model(cfg, arrays, quantization, source=str(path), kernels=backend.kernels)
    if quant and not keep:
        dequantize(model)
        model.set_dtype(dtype, lambda t: mx.issubdtype(t, mx.floating))
        mx.eval(model.parameters())
    return model, tok
