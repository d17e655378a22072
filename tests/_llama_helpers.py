"""Random-init Hugging Face Llama checkpoints, and GGUF files written the way llama.cpp's
converter writes them (``convert_hf_to_gguf.py``: query/key rows permuted for its interleaved
rotary layout, tensors quantized by the ``gguf`` package), for tests (no network).

    hf = random_llama({"num_key_value_heads": 2})     # transformers.LlamaForCausalLM, eval
    folder = save_llama(hf, tmp_path / "hf")           # config.json + model.safetensors
    path = write_llama_gguf(hf, tmp_path / "m.gguf", types)   # types: tensor -> GGML type name

Every parameter is random, RMSNorm gains included (transformers starts them at 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def random_llama(config: dict[str, Any] | None = None, seed: int = 0):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, **(config or {})}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def save_llama(model, folder: Path, max_shard_size: str | None = None) -> Path:
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def llama_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): Hugging Face rows -> its own order."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
              "lm_head": "output"}
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_key: str) -> str:
    module, _, leaf = hf_key.rpartition(".")
    if module in GGUF_NAMES:
        return f"{GGUF_NAMES[module]}.{leaf}"
    _, _, i, rest = module.split(".", 3)
    return f"blk.{i}.{BLOCK[rest]}.{leaf}"


def smollm_reference_tokenizer(tokens: list[str], types: list[int], merges: list[str]):
    """SmolLM2's tokenizer as Hugging Face ``tokenizers`` runs it (its tokenizer.json: digits
    split one by one, then GPT-2's byte-level split), from GGUF-style lists: the reference for
    mlxgpt's own."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True)
                            for t, k in zip(tokens, types, strict=True) if k == 3])
    return tok


def small_vocab(n: int):
    """The first ``n`` ids of GPT-2's BPE as GGUF token strings + merges, plus two specials."""
    from mlxgpt.tokenizers import gpt2_tokenizer
    from mlxgpt.tokenizers.hf_files import to_hf

    tok = gpt2_tokenizer()
    tokens = [to_hf(tok.token_bytes(i)) for i in range(n - 2)] + ["<|im_start|>", "<|im_end|>"]
    merges = [f"{to_hf(a)} {to_hf(b)}" for a, b in tok.merges[: n - 2 - 256]]
    types = [1] * (n - 2) + [3, 3]
    return tokens, types, merges


def write_llama_gguf(model, path: Path, types: dict[str, str] | None = None, *,
                     default: str = "F32", arch: str = "llama", pre: str = "gpt-2",
                     meta: dict[str, Any] | None = None, add_bos: bool | None = None) -> Path:
    """``model`` as llama.cpp's converter writes it; ``types`` maps an HF tensor key to a GGML
    type name (``default`` for the other matrices; 1-D tensors are F32, as llama.cpp keeps
    them). ``meta`` overrides metadata values (key -> value) for refusal tests. ``add_bos``:
    tokenizer.ggml.add_bos_token (None: no such key, as SmolLM2's converter wrote none)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    n_vocab = cfg.vocab_size
    tokens, token_types, merges = small_vocab(n_vocab)
    values = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "block_count": cfg.num_hidden_layers,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        "rope.dimension_count": head_dim,
    }
    for k, v in {**values, **(meta or {})}.items():
        key = f"{arch}.{k}"
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, float):
            w.add_float32(key, v)
        else:
            w.add_uint32(key, v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 2)
    w.add_eos_token_id(n_vocab - 1)
    w.add_chat_template(SMOL_TEMPLATE)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    T = gguf.GGMLQuantizationType
    for key, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            arr = hf_permute(arr, cfg.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            arr = hf_permute(arr, cfg.num_key_value_heads)
        kind = T[(types or {}).get(key, default)] if arr.ndim == 2 else T.F32
        try:
            data = arr.astype(np.float32) if kind == T.F32 else gguf.quants.quantize(arr, kind)
        except NotImplementedError:  # gguf-py cannot make K-quants: zero blocks of their size
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(arr.shape, kind), np.uint8)
        w.add_tensor(gguf_name(key), data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
