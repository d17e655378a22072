"""GGUF files (llama.cpp's format) for GPT-2 models, out and in, through the ``gguf`` package
(the reader and writer llama.cpp maintains).

Out: a model + its tokenizer -> one GGUF file that llama.cpp runs as architecture ``gpt2``:
the hyper-parameters, the byte-level BPE vocabulary and merges with GPT-2's pre-tokeniser
(``tokenizer.ggml.pre = "gpt-2"``), token types and ``<|endoftext|>`` as bos/eos/unk. Weights
keep MLX's Linear layout ``(out, in)``, which is GGUF's too (llama.cpp's own converter transposes
Hugging Face's Conv1D weights into it). Tensor types: ``f32``; ``f16`` (2-D weights, the rest
f32, as llama.cpp's converter does); ``q8_0`` (2-D weights in blocks of 32, position embeddings
f32, a matrix whose rows are not a multiple of 32 f16). Quantized mlxgpt layers are dequantized
first. The file is written under a temporary name and renamed into place.

In: a GPT-2 GGUF (F32, F16 or Q8_0 tensors; Q8_0 dequantized by the ``gguf`` package) -> a GPT
and its tokenizer (GPT-2's and the byte vocabulary are recognised as mlxgpt's own).

A vocabulary without merges (the byte tokenizer) gets one merge that can never apply
(``INERT_MERGE``): llama.cpp requires the merges key and the writer refuses empty arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..checks import shown
from ..core.backend import Backend, Kernels
from ..core.config import TANH_GELU, GPTConfig
from ..core.gpt2 import GPT
from ..core.model import Model, ModelConfig
from ..errors import MlxgptError
from ..tokenizers import EOT, GPT2_PATTERN, IdTokenizer, Tokenizer
from ..tokenizers.hf_files import from_hf, to_hf
from ..tokenizers.load import build_bpe
from .files import atomic_file, check_apart, write_error
from .quantize import dequantized_weights, float_dtype

ARCH = "gpt2"
DTYPES = ("f32", "f16", "q8_0")
# Two control tokens: symbols start as single characters and nothing merges into this pair.
INERT_MERGE = f"{EOT} {EOT}"

# mlxgpt module path -> llama.cpp tensor (gguf.MODEL_TENSOR member name), outside and per block.
_GLOBAL = {"wte": "TOKEN_EMBD", "wpe": "POS_EMBD", "ln_f": "OUTPUT_NORM", "lm_head": "OUTPUT"}
_BLOCK = {"ln_1": "ATTN_NORM", "attn.c_attn": "ATTN_QKV", "attn.c_proj": "ATTN_OUT",
          "ln_2": "FFN_NORM", "mlp.c_fc": "FFN_UP", "mlp.c_proj": "FFN_DOWN"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MlxgptError("GGUF needs the gguf package: pip install 'mlxgpt[gguf]'") from None
    return gguf


def tensor_names(n_layer: int) -> dict[str, str]:
    """mlxgpt parameter name -> GGUF tensor name (``h.3.attn.c_attn.weight`` ->
    ``blk.3.attn_qkv.weight``), for every parameter a GPT-2 of ``n_layer`` blocks may have."""
    gguf = _gguf()

    def name(member: str, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=bid)

    out = {}
    for path, member in _GLOBAL.items():
        for leaf in ("weight", "bias"):
            out[f"{path}.{leaf}"] = f"{name(member)}.{leaf}"
    for i in range(n_layer):
        for path, member in _BLOCK.items():
            for leaf in ("weight", "bias"):
                out[f"h.{i}.{path}.{leaf}"] = f"{name(member, i)}.{leaf}"
    return out


# --------------------------------------------------------------------------- writing


@dataclass
class GGUFExport:
    path: Path
    dtype: str
    n_params: int
    tokenizer: str
    size_bytes: int
    kept_f16: int = 0  # q8_0: matrices whose rows are not a multiple of 32

    def line(self) -> str:
        kept = f", {self.kept_f16} tensors kept f16 (rows not a multiple of 32)" \
            if self.kept_f16 else ""
        return (f"wrote {self.path}: GGUF {self.dtype}, {self.n_params / 1e6:.1f}M parameters, "
                f"tokenizer {self.tokenizer}, {self.size_bytes / 1e6:.1f} MB{kept}")


def default_dtype(model: GPT) -> str:
    """f32 for a float32 model, f16 for half-precision or quantized ones."""
    return "f32" if float_dtype(model) == mx.float32 else "f16"


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int, arch: str = ARCH) -> dict[str, Any]:
    """The tokenizer as GGUF's ``tokenizer.ggml.*`` lists: tokens (GPT-2's byte-level strings,
    by id), token types, merges, the id of <|endoftext|> (or the end of turn) and llama.cpp's
    name of the pre-tokeniser. Ids the tokenizer does not use (padding up to the model's
    vocab_size) become ``[PAD{id}]`` tokens of type UNUSED."""
    from .gguf_llama import PRE_TOKENIZERS

    gguf = _gguf()
    if isinstance(tokenizer, IdTokenizer):
        raise MlxgptError("the model has no tokenizer (token ids only); GGUF needs its vocabulary")
    pattern = getattr(tokenizer, "pattern", GPT2_PATTERN)  # the byte tokenizer splits nothing
    pre = "gpt-2" if pattern == GPT2_PATTERN else next(
        (name for name, p in PRE_TOKENIZERS.items() if p == pattern), None)
    if pre is None or (arch == ARCH and pre != "gpt-2"):
        raise MlxgptError("the tokenizer splits text with its own pattern; llama.cpp's "
                          "pre-tokeniser would split it differently")
    if tokenizer.vocab_size > vocab_size:
        raise MlxgptError(f"the tokenizer has {tokenizer.vocab_size} ids, the model "
                          f"{vocab_size}")
    special = getattr(tokenizer, "special_tokens", {EOT: tokenizer.eot_id})
    by_id = {i: s for s, i in special.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
            continue
        try:
            tokens.append(to_hf(tokenizer.token_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
        except MlxgptError:  # an id without bytes: a hole, or padding past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [f"{to_hf(a)} {to_hf(b)}" for a, b in getattr(tokenizer, "merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges or [INERT_MERGE],
            "eot_id": tokenizer.eot_id, "bos_id": tokenizer.bos_id, "pre": pre,
            "chat_template": tokenizer.chat_template, "add_bos": tokenizer.prepends_bos}


def _tensor_type(gguf: Any, name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """The GGML type one tensor is written in (see the module doc)."""
    T = gguf.GGMLQuantizationType
    if dtype == "f32" or len(shape) == 1 or name.startswith("position_embd"):
        return T.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def _model_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, or None where ``path`` is no readable GGUF."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":  # the magic: anything else is read no further
                return None
        field = _gguf().GGUFReader(path).get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception:  # damage of any kind: not a file to replace
        return None
    return arch if isinstance(arch, str) else None


def check_gguf_output(out: Path, force: bool) -> None:
    """Refuse an OUT that exists, unless ``force`` and it is a GGUF model mlxgpt reads back
    (gpt2 or llama, what it writes): --force never replaces a file of another kind."""
    if out.is_dir():
        raise MlxgptError(f"{out} is a folder; GGUF is one file (e.g. {out / 'model.gguf'})")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise MlxgptError(f"{out} already exists (use --force to replace it)")
    if out.is_symlink() or _model_architecture(out) not in (ARCH, "llama"):
        what = "a symbolic link" if out.is_symlink() else "not a GGUF model file"
        raise MlxgptError(f"{out} is {what}; --force replaces only a GGUF model (gpt2 or "
                          "llama): move it away or choose another OUT")


def write_gguf(model: Model, tokenizer: Tokenizer, out_path: str | os.PathLike,
               dtype: str | None = None, *, name: str | None = None,
               force: bool = False) -> GGUFExport:
    """Write ``model`` and ``tokenizer`` as a GGUF file llama.cpp runs (see the module doc;
    Llama models as :mod:`.gguf_llama` describes)."""
    gguf = _gguf()
    out = Path(out_path)
    check_gguf_output(out, force)
    dtype = dtype or default_dtype(model)
    if dtype not in DTYPES:
        raise MlxgptError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    cfg = model.config
    llama = cfg.model_type == "llama"
    if not llama and cfg.activation_function not in TANH_GELU:
        raise MlxgptError(f"activation {cfg.activation_function!r} (erf GELU): llama.cpp's gpt2 "
                          "computes the tanh GELU only")
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, cfg.model_type)
    if llama:
        from . import gguf_llama

        names = gguf_llama.export_names(cfg.n_layer)
    else:
        names = tensor_names(cfg.n_layer)
    T = gguf.GGMLQuantizationType
    kept_f16, tensors = 0, []
    for key, w in dequantized_weights(model).items():
        if llama:
            w = gguf_llama.to_llama_cpp_rows(key, w, cfg)
        arr = np.array(w.astype(mx.float32))  # (out, in) for matrices: GGUF's order as well
        qtype = _tensor_type(gguf, names[key], arr.shape, dtype)
        kept_f16 += dtype == "q8_0" and arr.ndim == 2 and qtype == T.F16
        tensors.append((names[key], gguf.quants.quantize(arr, qtype), qtype))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out.parent) from None
    # a full disk, a vanished folder: one line, and nothing is left behind
    with atomic_file(out) as tmp:
        _write(gguf, tmp, cfg, file_type, vocab, tensors, name)
    return GGUFExport(out, dtype, model.n_params, getattr(tokenizer, "name", "?"),
                      out.stat().st_size, kept_f16)


def _write(gguf: Any, path: Path, cfg: ModelConfig, file_type: Any, vocab: dict[str, Any],
           tensors: list[tuple[str, np.ndarray, Any]], name: str | None) -> None:
    """The GGUF file itself: llama.cpp's gpt2 keys, the tokenizer, the tensors."""
    w = gguf.GGUFWriter(path, cfg.model_type)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        if cfg.model_type == "llama":
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_head_count_kv(cfg.n_kv_head)
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_rope_freq_base(cfg.rope_theta)
            w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
            w.add_vocab_size(cfg.vocab_size)
        else:
            w.add_feed_forward_length(cfg.hidden_dim)
            w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        if vocab["eot_id"] is not None:  # GPT-2's tokenizer calls <|endoftext|> all three
            w.add_bos_token_id(vocab["bos_id"] if vocab["bos_id"] is not None
                               else vocab["eot_id"])
            w.add_eos_token_id(vocab["eot_id"])
            w.add_unk_token_id(vocab["eot_id"])
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])
        # llama.cpp then puts BOS before a prompt as mlxgpt does (a chat template writes its own)
        w.add_add_bos_token(vocab["add_bos"])
        for tname, data, qtype in tensors:
            w.add_tensor(tname, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def export_gguf(model_path: str | os.PathLike, out_path: str | os.PathLike,
                dtype: str | None = None, *, force: bool = False) -> GGUFExport:
    """``mlxgpt export --format gguf``: a model reference (mlxgpt or Hugging Face folder, hub
    id, shipped model's name) -> a GGUF file, weights as stored unless ``dtype`` says."""
    from . import folder as mlx_folder
    from .hf import is_hf_classifier, load_hf
    from .hub import resolve_source

    out = Path(out_path)
    check_apart(out, {"MODEL": model_path}, out_label="OUT")  # before reading the model
    check_gguf_output(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise MlxgptError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    src = resolve_source(model_path)
    check_apart(out, {"MODEL": src}, out_label="OUT")  # a name resolved to a local file
    if mlx_folder.is_classifier_folder(src) or is_hf_classifier(src):
        raise MlxgptError(f"{model_path}: a classifier; llama.cpp's gpt2 is a language model only")
    if src.is_file():  # another GGUF file (a known model fetched as one)
        model, tok = read_gguf(src)
    elif mlx_folder.is_model_folder(src):
        from ..tokenizers import load_tokenizer

        model = mlx_folder.load_model(src)
        tok = load_tokenizer(src, mlx_folder.read_folder_meta(src).get("tokenizer"))
    else:
        model, tok = load_hf(src)
    return write_gguf(model, tok, out, dtype, name=Path(src).stem, force=force)


# --------------------------------------------------------------------------- reading


def _open(path: Path) -> Any:
    gguf = _gguf()
    if not path.is_file():
        raise MlxgptError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:  # bad magic, truncated, bad type
        raise MlxgptError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, path: Path, default: Any = MlxgptError) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is MlxgptError:
            raise MlxgptError(f"{path}: GGUF key {key} missing")
        return default
    return field.contents()


def _whole(reader: Any, key: str, path: Path, default: Any = MlxgptError) -> Any:
    """An integer field (a count, a size, an id), or ``default`` where it is missing: a string,
    a list or a fraction is refused here (GPTConfig bounds sizes)."""
    if default is not MlxgptError and reader.get_field(key) is None:
        return default
    v = _field(reader, key, path)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise MlxgptError(f"{path}: GGUF key {key} is {shown(v)}, not an integer")
    return int(v)


def gguf_config(reader: Any, path: Path) -> GPTConfig:
    """The GPT-2 hyper-parameters of an open GGUF file (architecture gpt2 only)."""
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise MlxgptError(f"{path}: architecture {arch!r}; mlxgpt reads GPT-2 GGUF files "
                          f"({ARCH!r}) only")
    n_head = _whole(reader, f"{ARCH}.attention.head_count", path)
    if _whole(reader, f"{ARCH}.attention.head_count_kv", path, n_head) != n_head:
        raise MlxgptError(f"{path}: grouped-query attention is not GPT-2")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise MlxgptError(f"{path}: tensor token_embd.weight missing")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    n_embd, n_ff = (_whole(reader, f"{ARCH}.{k}_length", path)
                    for k in ("embedding", "feed_forward"))
    eps = _field(reader, f"{ARCH}.attention.layer_norm_epsilon", path)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.number)):
        raise MlxgptError(f"{path}: GGUF key {ARCH}.attention.layer_norm_epsilon is "
                          f"{shown(eps)}, not a number")
    return GPTConfig(
        vocab_size=int(embd.shape[1]),  # ggml order: (n_embd, n_vocab)
        n_positions=_whole(reader, f"{ARCH}.context_length", path),
        n_embd=n_embd,
        n_layer=_whole(reader, f"{ARCH}.block_count", path),
        n_head=n_head,
        n_inner=None if n_ff == 4 * n_embd else n_ff,  # None: GPT-2's default, as written
        # stored as float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
        layer_norm_epsilon=float(str(np.float32(eps))),
        tie_word_embeddings=not has_output,
    )


def gguf_weights(reader: Any, cfg: GPTConfig, path: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32 numpy under mlxgpt's names (F32, F16, Q8_0 only)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    by_gguf = {g: m for m, g in tensor_names(cfg.n_layer).items()}
    weights = {}
    for t in reader.tensors:
        if t.name not in by_gguf:
            raise MlxgptError(f"{path}: tensor {t.name} is not part of a GPT-2 model")
        if t.tensor_type not in (T.F32, T.F16, T.Q8_0):
            raise MlxgptError(f"{path}: tensor {t.name} is {t.tensor_type.name}; mlxgpt reads "
                              "F32, F16 and Q8_0 GGUF files")
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        weights[by_gguf[t.name]] = arr.reshape(tuple(reversed(t.shape.tolist())))
    return weights


def gguf_tokenizer(reader: Any, path: Path) -> Tokenizer:
    """The tokenizer of an open GGUF file: a byte-level BPE with GPT-2's pre-tokeniser."""
    gguf = _gguf()
    model = _field(reader, "tokenizer.ggml.model", path)
    pre = _field(reader, "tokenizer.ggml.pre", path, "")
    if model != "gpt2" or pre != "gpt-2":
        raise MlxgptError(f"{path}: tokenizer {model!r} with pre-tokeniser {pre!r}; mlxgpt "
                          "reads byte-level BPE with GPT-2's ('gpt2', 'gpt-2')")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    types = _field(reader, "tokenizer.ggml.token_type", path,
                   [gguf.TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise MlxgptError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    merges = _field(reader, "tokenizer.ggml.merges", path)
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise MlxgptError(f"{path}: GGUF key tokenizer.ggml.{key} is not a list of strings")
    if merges == [INERT_MERGE]:
        merges = []
    vocab, special = {}, {}
    for i, (s, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            special[s] = i
        elif kind != gguf.TokenType.UNUSED:
            if from_hf(s) is None:
                raise MlxgptError(f"{path}: token {i} ({shown(s)}) is not byte-level BPE")
            vocab[s] = i
    merge_pairs = []
    for n, m in enumerate(merges, 1):
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise MlxgptError(f"{path}: merge {n} ({shown(m)}) is not two tokens")
        merge_pairs.append((a, b))
    tok = build_bpe(vocab, merge_pairs, special, GPT2_PATTERN, path)
    eos = _whole(reader, "tokenizer.ggml.eos_token_id", path, None)
    if eos is not None and tok.name == "bpe":  # never alter the shared gpt2/byte tokenizers
        tok.eot_id = int(eos)
    return tok


def read_gguf(path: str | os.PathLike, dtype: mx.Dtype | None = None,
              backend: Backend | None = None) -> tuple[Model, Tokenizer]:
    """A GGUF file -> (model, tokenizer): ``llama`` files by :mod:`.gguf_llama`, GPT-2 ones
    here. ``backend``: the device's record (default: the default device's)."""
    from .gguf_llama import load_gguf_file, read_llama_gguf

    loaded = load_gguf_file(path)
    arch = loaded[1].get("general.architecture")
    if arch == "llama":
        return read_llama_gguf(path, dtype, loaded=loaded, backend=backend)
    if arch != ARCH:
        raise MlxgptError(f"{path}: architecture {arch!r}; mlxgpt reads GGUF files of "
                          f"architecture llama and {ARCH}")
    return read_gpt2_gguf(path, dtype, backend.kernels if backend else None)


def read_gpt2_gguf(path: str | os.PathLike, dtype: mx.Dtype | None = None,
                   kernels: Kernels | None = None) -> tuple[GPT, Tokenizer]:
    """A GPT-2 GGUF file -> (GPT, tokenizer). ``dtype`` None: float16 when every matrix is
    stored F16, else float32 (Q8_0 values are exact in float32, not in float16). ``kernels``:
    the backend's (default: the default device's)."""
    from .folder import build_model

    path = Path(path)
    gguf = _gguf()
    reader = _open(path)
    cfg = gguf_config(reader, path)
    weights = gguf_weights(reader, cfg, path)
    tok = gguf_tokenizer(reader, path)
    if tok.vocab_size > cfg.vocab_size:
        raise MlxgptError(f"{path}: {tok.vocab_size} tokens but {cfg.vocab_size} embedding rows")
    if dtype is None:
        matrices = [t.tensor_type for t in reader.tensors if len(t.shape) == 2
                    and not t.name.startswith("position_embd")]
        all_f16 = matrices and all(t == gguf.GGMLQuantizationType.F16 for t in matrices)
        dtype = mx.float16 if all_f16 else mx.float32
    if "lm_head.weight" in weights and np.array_equal(weights["lm_head.weight"],
                                                      weights["wte.weight"]):
        del weights["lm_head.weight"]  # an output tensor that only copies the embedding: tie
        cfg.tie_word_embeddings = True
    arrays = {k: mx.array(v).astype(dtype) for k, v in weights.items()}
    return build_model(cfg, arrays, source=str(path), kernels=kernels), tok
