"""The Llama family: numerics against ``transformers``' LlamaForCausalLM (float32, 1e-4 absolute
on logits), Hugging Face folders in and out, GGUF files written as llama.cpp's converter writes
them (every tensor type mlxgpt maps: F32, F16, BF16, Q8_0, Q4_0, Q4_1), every decoding path
(single, batched rows, speculative, prompt cache files, JSON-schema constrained), the chat
template, and the refusals. The real SmolLM2 weights: tests/test_smollm2.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from _llama_helpers import (  # noqa: E402
    SMOL_TEMPLATE,
    hf_unpermute,
    llama_logits,
    random_llama,
    save_llama,
    write_llama_gguf,
)

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints.folder import load_model, save_model  # noqa: E402
from mlxgpt.checkpoints.quantize import dense_weight  # noqa: E402
from mlxgpt.core.backend import Backend  # noqa: E402
from mlxgpt.core.llama import Llama  # noqa: E402
from mlxgpt.errors import MlxgptError  # noqa: E402
from mlxgpt.generation.context import Context  # noqa: E402

TOL = 1e-4  # float32 logits, absolute
CONFIGS = {
    "grouped-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "plain-untied": {"num_key_value_heads": 4},
    "one-kv-head-bias-odd": {"num_key_value_heads": 1, "attention_bias": True,
                             "hidden_size": 36, "num_attention_heads": 3,
                             "intermediate_size": 50, "vocab_size": 301},
    "rope-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32}},
    "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
}


def tokens(n: int = 40, batch: int = 2, vocab: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, n))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    hf = random_llama({"num_key_value_heads": 2})
    return hf, save_llama(hf, tmp_path_factory.mktemp("llama") / "hf")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf = random_llama(CONFIGS[name])
    folder = save_llama(hf, tmp_path / "hf")
    model, _ = mlxgpt.load(folder)
    assert isinstance(model, Llama) and model.config.n_kv_head == hf.config.num_key_value_heads
    ids = tokens(vocab=hf.config.vocab_size)
    diff = np.abs(np.array(model(mx.array(ids))) - llama_logits(hf, ids)).max()
    assert diff < TOL, diff
    if hf.config.tie_word_embeddings:
        assert "lm_head" not in model


def test_sharded_folder_and_mlxgpt_folder_round_trip(tmp_path, small):
    hf, _ = small
    sharded = save_llama(hf, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    model, tok = mlxgpt.load(sharded)
    ids = tokens()
    ref = llama_logits(hf, ids)
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() < TOL
    out = save_model(model, tmp_path / "mlx", tok)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    again = load_model(out)
    assert np.abs(np.array(again(mx.array(ids))) - ref).max() < TOL


def test_export_is_read_by_transformers_and_mlx_lm(tmp_path, small, cli_ok):
    import torch
    import transformers

    hf, folder = small
    cli_ok("convert", folder, tmp_path / "mlx")
    cli_ok("export", tmp_path / "mlx", tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    ids = tokens()
    ref = llama_logits(hf, ids)
    assert np.abs(llama_logits(back.eval(), ids) - ref).max() < TOL
    mlx_lm = pytest.importorskip("mlx_lm")
    for path in (tmp_path / "mlx", tmp_path / "back"):  # mlxgpt's folder and the export
        lm, _ = mlx_lm.utils.load_model(Path(path))
        assert np.abs(np.array(lm(mx.array(ids))) - ref).max() < TOL


def test_decoding_with_the_cache_equals_one_forward(small):
    model, _ = mlxgpt.load(small[1])
    ids = tokens(30, 1)[0].tolist()
    full = np.array(model(mx.array([ids])))[0]
    ctx = Context(model)
    first = np.array(ctx.prefill(ids[:17]))  # logits at the last prompt position
    assert np.abs(first.reshape(-1) - full[16]).max() < TOL
    for i in range(17, 30):  # one token at a time, through the compiled decode step
        step = np.array(ctx.step(mx.array([ids[i]])))
        assert np.abs(step.reshape(-1) - full[i]).max() < TOL, i


# --------------------------------------------------------------------------- GGUF


MIXED = {  # HF key -> GGML type, as a file might mix them
    "model.embed_tokens.weight": "Q8_0",
    "lm_head.weight": "F16",
    "model.layers.0.self_attn.q_proj.weight": "Q4_1",
    "model.layers.0.self_attn.k_proj.weight": "Q4_0",
    "model.layers.0.self_attn.v_proj.weight": "BF16",
    "model.layers.0.mlp.down_proj.weight": "Q8_0",
    "model.layers.1.self_attn.q_proj.weight": "Q4_0",
    "model.layers.1.self_attn.k_proj.weight": "Q4_1",
    "model.layers.1.mlp.up_proj.weight": "F16",
}


def gguf_reference(path: Path, hf) -> dict[str, np.ndarray]:
    """The file's tensors as the gguf package dequantizes them, rows back in HF order."""
    cfg = hf.config
    reader = gguf.GGUFReader(path)
    by_gguf = {t.name: t for t in reader.tensors}
    from _llama_helpers import gguf_name

    out = {}
    for key in hf.state_dict():
        t = by_gguf[gguf_name(key)]
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        arr = arr.reshape(tuple(reversed(t.shape.tolist()))).astype(np.float32)
        if ".q_proj." in key:
            arr = hf_unpermute(arr, cfg.num_attention_heads)
        elif ".k_proj." in key:
            arr = hf_unpermute(arr, cfg.num_key_value_heads)
        out[key] = arr
    return out


def test_gguf_f32_reads_as_transformers_computes(tmp_path, small):
    hf, _ = small
    path = write_llama_gguf(hf, tmp_path / "m.gguf")
    model, tok = mlxgpt.load(path)  # rows permuted back: else attention would differ
    ids = tokens()
    assert np.abs(np.array(model(mx.array(ids))) - llama_logits(hf, ids)).max() < TOL
    assert tok.eot_id == 299 and tok.bos_id == 298 and tok.chat_template == SMOL_TEMPLATE


def test_gguf_quantized_tensors_equal_gguf_dequantization(tmp_path, small):
    import torch

    hf, _ = small
    path = write_llama_gguf(hf, tmp_path / "mixed.gguf", MIXED)
    ref = gguf_reference(path, hf)
    # kept quantized (the GPU's choice): each layer with its own bits, values exact
    kept, _ = mlxgpt.load(path, backend=Backend(mx.cpu, force_quantized=True))
    layers = dict(kept.named_modules())
    assert layers["model.layers.0.mlp.down_proj"].bits == 8
    assert layers["model.layers.0.self_attn.q_proj"].bits == 4
    assert layers["model.embed_tokens"].bits == 8
    for key, want in ref.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in layers:
            got = np.array(dense_weight(layers[module]).astype(mx.float32))
            assert np.array_equal(got, want), key
    # dequantized (the CPU's choice here): the same values in float32
    dense, _ = mlxgpt.load(path, backend=Backend(mx.cpu, force_quantized=False))
    from mlx.utils import tree_flatten

    flat = dict(tree_flatten(dense.parameters()))
    for key, want in ref.items():
        assert np.array_equal(np.array(flat[key]), want), key
    # and it computes what transformers computes on those weights (a copy: the fixture is shared)
    import copy

    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for key, p in hf.state_dict().items():
            p.copy_(torch.from_numpy(ref[key]))
    ids = tokens()
    assert np.abs(np.array(dense(mx.array(ids))) - llama_logits(hf, ids)).max() < TOL


def test_gguf_convert_keeps_per_module_quantization(tmp_path, small, cli_ok, monkeypatch):
    from mlxgpt.core import backend

    hf, _ = small
    path = write_llama_gguf(hf, tmp_path / "mixed.gguf", MIXED, default="Q4_1")
    # every record the command asks for keeps quantized layers (the GPU's choice)
    device = mx.default_device()
    monkeypatch.setattr(backend, "_records", {str(device): Backend(device, True)})
    cli_ok("convert", path, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    q = config["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 32
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    a, _ = mlxgpt.load(path, dtype="float32")
    b = load_model(tmp_path / "out")
    ids = mx.array(tokens())
    assert np.array_equal(np.array(a(ids)), np.array(b(ids)))


@pytest.mark.parametrize("change,match", [
    ({"arch": "qwen2"}, "architecture 'qwen2'"),
    ({"pre": "deepseek-coder"}, "pre-tokeniser 'deepseek-coder' is not supported"),
    ({"meta": {"attention.head_count": "four"}}, "attention.head_count is 'four'"),
    ({"default": "Q4_K"}, "is Q4_K; mlxgpt reads F32, F16, Q4_0, Q4_1, Q8_0, BF16"),
])
def test_gguf_refusals_are_one_line(tmp_path, small, cli, refused, change, match):
    hf = small[0] if "default" not in change else random_llama(
        {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1})
    path = write_llama_gguf(hf, tmp_path / "bad.gguf", **change)
    refused(cli("generate", "-m", path, "-p", "hi", "-n", "2"), match)
    refused(cli("convert", path, tmp_path / "out"), match)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- decoding paths


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, small):
    path = write_llama_gguf(small[0], tmp_path_factory.mktemp("g") / "m.gguf")
    return mlxgpt.load(path)


def test_batched_rows_equal_single_decoding(gguf_model):
    from mlxgpt.generation.sample import SamplingSettings

    model, tok = gguf_model
    prompts = ["Hello there", "The", "A much longer prompt than the others, to pad"]
    greedy = SamplingSettings(temperature=0)
    single = [mlxgpt.generate(model, tok, p, max_tokens=12, sampling=greedy) for p in prompts]
    batched = mlxgpt.batch_generate(model, tok, prompts, max_tokens=12, sampling=greedy)
    assert batched == single


def test_speculative_equals_plain_decoding(tmp_path, gguf_model):
    from mlxgpt.generation.sample import SamplingSettings

    model, tok = gguf_model
    draft = Llama(model.config)  # random, same vocabulary: most drafts are rejected
    mx.eval(draft.parameters())
    greedy = SamplingSettings(temperature=0)
    plain = mlxgpt.generate(model, tok, "Once upon", max_tokens=20, sampling=greedy)
    spec = mlxgpt.generate(model, tok, "Once upon", max_tokens=20, sampling=greedy,
                           draft_model=draft, draft_tokens=3)
    self_draft = mlxgpt.generate(model, tok, "Once upon", max_tokens=20, sampling=greedy,
                                 draft_model=model, draft_tokens=4)  # every draft accepted
    assert spec == plain == self_draft


def test_prompt_cache_file_gives_the_same_text(tmp_path, gguf_model):
    from mlxgpt.generation.prompt_cache import (
        load_prompt_cache,
        make_prompt_cache,
        save_prompt_cache,
    )
    from mlxgpt.generation.sample import SamplingSettings

    model, tok = gguf_model
    prefix, suffix = tok.encode("A long shared prefix for every question:"), tok.encode(" why?")
    path = save_prompt_cache(make_prompt_cache(model, tok, prefix), tmp_path / "p.safetensors")
    cache = load_prompt_cache(path, model, tok)
    assert cache.kv[0][0].shape[1] == model.config.n_kv_head  # grouped: the K heads only
    greedy = SamplingSettings(temperature=0)
    fresh = mlxgpt.generate(model, tok, prefix + suffix, max_tokens=10, sampling=greedy)
    cached = mlxgpt.generate(model, tok, suffix, max_tokens=10, sampling=greedy,
                             prompt_cache=cache)  # the prompt continues the cached prefix
    assert cached == fresh


def test_json_schema_output_on_a_llama_model(gguf_model):
    import jsonschema

    from mlxgpt.generation.constrain import JsonConstraint
    from mlxgpt.generation.sample import SamplingSettings

    model, tok = gguf_model
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    constraint = JsonConstraint(tok, schema, model.config.vocab_size)
    for seed in range(3):
        [text] = mlxgpt.batch_generate(model, tok, ["Give JSON:"], max_tokens=40,
                                       sampling=SamplingSettings(temperature=0.9, seed=seed),
                                       constraint=constraint.start(40))
        jsonschema.validate(json.loads(text), schema)


# --------------------------------------------------------------------------- chat template


def test_chat_template_renders_as_transformers(tmp_path, gguf_model):
    import transformers

    from mlxgpt.tokenizers.chat_template import render_chat

    _, tok = gguf_model
    save_model(gguf_model[0], tmp_path / "m", tok)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert ref.chat_template == SMOL_TEMPLATE
    convos = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}],
    ]
    for messages in convos:
        for add in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert render_chat(tok, messages, add) == want


def test_templates_run_sandboxed(gguf_model):
    from dataclasses import replace  # noqa: F401

    from mlxgpt.tokenizers.chat_template import render_chat

    _, tok = gguf_model
    evil = tok.__class__.__new__(tok.__class__)
    evil.__dict__.update(tok.__dict__)
    evil.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(MlxgptError, match="unsafe"):
        render_chat(evil, [{"role": "user", "content": "x"}])
    evil.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(MlxgptError, match="no system messages"):
        render_chat(evil, [{"role": "user", "content": "x"}])


def test_gguf_export_round_trips(tmp_path, small, cli_ok):
    hf, _ = small
    folder = tmp_path / "with-tokenizer"
    cli_ok("convert", write_llama_gguf(hf, tmp_path / "in.gguf"), folder)
    model, tok = mlxgpt.load(folder)
    ids = tokens()
    ref = llama_logits(hf, ids)
    for dtype, tol in (("f32", TOL), ("f16", 0.05)):
        out = tmp_path / f"m-{dtype}.gguf"
        cli_ok("export", folder, out, "--format", "gguf", "--dtype", dtype)
        reader = gguf.GGUFReader(out)
        assert reader.get_field("general.architecture").contents() == "llama"
        assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
        back, tok2 = mlxgpt.load(out, dtype="float32")  # rows permuted there and back
        assert np.abs(np.array(back(mx.array(ids))) - ref).max() < tol, dtype
        assert tok2.encode("Hello there, 123") == tok.encode("Hello there, 123")


def test_a_hub_id_loads_through_the_hugging_face_cache(tmp_path, small, monkeypatch):
    from _hf_helpers import populate_hf_cache

    hf, folder = small
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    populate_hf_cache(tmp_path / "hub", "acme/tiny-llama", folder)
    model, _ = mlxgpt.load("acme/tiny-llama")
    ids = tokens()
    assert np.abs(np.array(model(mx.array(ids))) - llama_logits(hf, ids)).max() < TOL


def test_a_smollm_style_tokenizer_json_splits_digits_as_hugging_face(tmp_path):
    """SmolLM2's tokenizer.json: Digits(individual_digits) before the byte-level split."""
    pytest.importorskip("tokenizers")
    from _llama_helpers import small_vocab, smollm_reference_tokenizer

    from mlxgpt.tokenizers import tokenizer_from_hf_folder

    ref = smollm_reference_tokenizer(*small_vocab(300))
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_from_hf_folder(tmp_path)
    for text in ("12345 678.9 3,000", "in 2024  the  42nd\t7 x1y22z333", " 1 2  3   4\n5\n\n6",
                 "the theory, then 1984.", "naïve café 日本 😀 ٣٤ ①②"):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
