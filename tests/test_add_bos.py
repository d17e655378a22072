"""A tokenizer's add_bos (Llama 3's and other byte-level BPEs that put BOS before text): read
from GGUF files as llama.cpp reads them and from Hugging Face folders as llama.cpp's converter
reads them, written back by both exporters, and honoured wherever text becomes model input
(generation, batches, prompt caches, the server, the transcript chat, fine-tuning data) but not
after a chat template, which writes ``bos_token`` itself (as transformers' apply_chat_template).
References: llama.cpp (``llama_cpp``), transformers' AutoTokenizer and generate, gguf-py's
SpecialVocab (what llama.cpp's converter reads from a folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from _llama_helpers import random_llama, save_llama, write_llama_gguf  # noqa: E402

import mlxgpt  # noqa: E402
from mlxgpt.generation.sample import SamplingSettings  # noqa: E402
from mlxgpt.tokenizers import load_tokenizer, tokenizer_from_hf_folder  # noqa: E402
from mlxgpt.tokenizers.base import LLAMA3_PATTERN  # noqa: E402

TEXT = "Hello world"
BOS, N_NORMAL = "<|begin_of_text|>", 296  # Llama 3's BOS; GPT-2's first ids as the vocabulary
SPECIALS = [BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (  # Llama 3's template, less its default system text: it writes bos_token
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
GREEDY = SamplingSettings(temperature=0)


@pytest.fixture(scope="module")
def hf_model():
    return random_llama()


def llama3_folder(folder: Path, hf_model=None, *, post: str = "sequence",
                  flag: bool | None = None, template: str | None = LLAMA3_TEMPLATE) -> Path:
    """A Llama-3-style Hugging Face folder (tokenizer.json by the ``tokenizers`` library):
    ``post`` "sequence" (ByteLevel then a TemplateProcessing putting BOS first, as Llama 3's),
    "template" (that TemplateProcessing alone) or "none" (ByteLevel only); ``flag``:
    tokenizer_config.json's add_bos_token (None: absent, as in Llama 3's)."""
    import tokenizers
    from tokenizers import decoders, processors
    from tokenizers import pre_tokenizers as pre

    from mlxgpt.tokenizers import gpt2_tokenizer
    from mlxgpt.tokenizers.hf_files import to_hf

    folder.mkdir(parents=True, exist_ok=True)
    if hf_model is not None:
        save_llama(hf_model, folder)
    g = gpt2_tokenizer()
    vocab = {to_hf(g.token_bytes(i)): i for i in range(N_NORMAL)}
    vocab.update({s: N_NORMAL + k for k, s in enumerate(SPECIALS)})
    merges = [(to_hf(a), to_hf(b)) for a, b in g.merges[:N_NORMAL - 256]]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre.Sequence([pre.Split(tokenizers.Regex(LLAMA3_PATTERN), "isolated"),
                                      pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in SPECIALS])
    bos_first = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, N_NORMAL)])
    tok.post_processor = {
        "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False), bos_first]),
        "template": bos_first, "none": processors.ByteLevel(trim_offsets=False)}[post]
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
           "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": False}
    if template:
        cfg["chat_template"] = template
    if flag is not None:
        cfg["add_bos_token"] = flag
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def auto_tokenizer(folder: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(folder)


def chat_ids(ref, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True,
                                  add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_greedy(hf_model, ids: list[int], n: int = 8) -> list[int]:
    """transformers' greedy generate from ``ids``, never stopping early."""
    import torch
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), generation_config=config)
    return out[0, len(ids):].tolist()


def mlxgpt_greedy(model, tok, prompt, n: int = 8, **kwargs) -> tuple[list[int], int]:
    """mlxgpt's greedy tokens and how many prompt tokens the model read."""
    out = list(mlxgpt.stream_generate(model, tok, prompt, max_tokens=n, sampling=GREEDY,
                                      stop_at_eos=False, **kwargs))
    return [r.token for r in out if r.token is not None], out[-1].prompt_tokens


def llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# --------------------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
@pytest.mark.parametrize("flag", [None, True, False])
def test_gguf_add_bos_is_read_as_llama_cpp_reads_it(tmp_path, hf_model, pre, flag):
    """The key where present, else llama.cpp's default (true for Llama 3's pre-tokeniser);
    the prompt ids equal llama.cpp's tokenize(add_bos=True) either way (SmolLM2's: no BOS)."""
    path = write_llama_gguf(hf_model, tmp_path / "m.gguf", pre=pre, add_bos=flag)
    ref = llama_cpp_vocab(path)
    _, tok = mlxgpt.load(path)
    assert tok.add_bos == ref._model.add_bos_token()
    for text in (TEXT, "", "  two\nlines 123"):
        assert tok.encode_prompt(text) == ref.tokenize(text.encode(), add_bos=True), text
    assert tok.add_bos == (flag if flag is not None else pre == "llama-bpe")


def test_gguf_with_add_bos_generates_as_transformers_from_bos(tmp_path, hf_model):
    path = write_llama_gguf(hf_model, tmp_path / "m.gguf", add_bos=True)
    model, tok = mlxgpt.load(path, dtype="float32")
    ids = llama_cpp_vocab(path).tokenize(TEXT.encode(), add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode(TEXT)
    got, read = mlxgpt_greedy(model, tok, TEXT)
    assert read == len(ids)
    assert got == hf_greedy(hf_model, ids)
    # every other way a text prompt is read puts the same BOS first
    from mlxgpt.generation.batch import stream_batch
    from mlxgpt.serve.protocol import _prompt_ids

    assert _prompt_ids({"prompt": TEXT}, tok, model.config.vocab_size) == ids
    batched = [e.token for _, e in stream_batch(model, tok, [TEXT], max_tokens=8,
                                                sampling=GREEDY, stop_at_eos=False)
               if e.token is not None]
    assert batched == got
    assert mlxgpt.generate(model, tok, "", max_tokens=1, sampling=GREEDY) is not None
    assert mlxgpt_greedy(model, tok, "", 1)[1] == 1  # an empty prompt is BOS alone


def test_prompt_cache_puts_bos_before_the_prefix_only(tmp_path, hf_model):
    from mlxgpt.generation.prompt_cache import make_prompt_cache

    model, tok = mlxgpt.load(write_llama_gguf(hf_model, tmp_path / "m.gguf", add_bos=True),
                             dtype="float32")
    cache = make_prompt_cache(model, tok, "A shared prefix:")
    assert cache.tokens == tok.encode_prompt("A shared prefix:") and cache.tokens[0] == tok.bos_id
    ids = cache.tokens + tok.encode(" why?")
    cached, read = mlxgpt_greedy(model, tok, " why?", prompt_cache=cache)
    assert read == len(ids)  # the continuation got no second BOS
    assert cached == mlxgpt_greedy(model, tok, ids)[0] == hf_greedy(hf_model, ids)


# --------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("post,flag", [("sequence", None), ("template", None), ("none", None),
                                       ("none", True), ("sequence", False), ("template", True)])
def test_hf_folder_add_bos_is_read_as_llama_cpp_converter_reads_it(tmp_path, post, flag):
    folder = llama3_folder(tmp_path, post=post, flag=flag)
    tok = tokenizer_from_hf_folder(folder)
    want = gguf.SpecialVocab(folder, load_merges=False).add_special_token.get("bos", False)
    assert tok.add_bos == want
    assert tok.bos_id == N_NORMAL
    assert tok.encode_prompt(TEXT) == [N_NORMAL] * want + tok.encode(TEXT)


def test_llama3_folder_prompts_and_chat_equal_transformers(tmp_path, hf_model):
    folder = llama3_folder(tmp_path / "hf", hf_model)
    ref = auto_tokenizer(folder)
    model, tok = mlxgpt.load(folder, dtype="float32")
    assert tok.add_bos and tok.bos_id == ref.bos_token_id
    for text in (TEXT, "  two\nlines 123", "x"):
        assert tok.encode_prompt(text) == ref(text).input_ids, text
    # the template writes bos_token: once, not again by the encoding
    from mlxgpt.tokenizers.transcript import chat_prompt

    for add in (True, False):
        want = chat_ids(ref, MESSAGES, add)
        assert want.count(ref.bos_token_id) == 1
        assert chat_prompt(tok, MESSAGES, add)[0] == want
    from mlxgpt.generation.chat import ChatSession, Message

    session = ChatSession(model, tok, system="Be brief.")
    session.messages.append(Message("user", "Hi!"))
    assert session.prompt_ids() == chat_ids(ref, MESSAGES)
    # generation from the text equals transformers' from its own ids
    assert mlxgpt_greedy(model, tok, TEXT)[0] == hf_greedy(hf_model, ref(TEXT).input_ids)


def test_transcript_chat_starts_with_one_bos(tmp_path, hf_model):
    """Without a template the conversation is plain text: BOS first, in the session as in
    chat_prompt (the server's)."""
    from mlxgpt.generation.chat import ChatSession, Message
    from mlxgpt.tokenizers.transcript import chat_prompt

    model, tok = mlxgpt.load(llama3_folder(tmp_path, hf_model, template=None), dtype="float32")
    assert tok.chat_template is None and tok.add_bos
    session = ChatSession(model, tok, system="Be brief.")
    session.messages.append(Message("user", "Hi!"))
    ids, _ = chat_prompt(tok, MESSAGES)
    assert session.prompt_ids() == ids and ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert session.transcript_ids() == chat_prompt(tok, MESSAGES, False)[0]


# --------------------------------------------------------------------------- round trips


def test_flag_survives_convert_and_both_exports(tmp_path, hf_model, cli_ok):
    src = write_llama_gguf(hf_model, tmp_path / "in.gguf", add_bos=True)
    folder, out_gguf, out_hf = tmp_path / "mlx", tmp_path / "out.gguf", tmp_path / "hf"
    cli_ok("convert", src, folder)
    meta = json.loads((folder / "config.json").read_text())["mlxgpt"]["tokenizer"]
    assert meta["add_bos"] is True
    _, tok = mlxgpt.load(folder)
    assert tok.add_bos and tok.encode_prompt(TEXT) == [tok.bos_id, *tok.encode(TEXT)]
    cli_ok("export", folder, out_gguf, "--format", "gguf")
    ref = llama_cpp_vocab(out_gguf)
    assert ref._model.add_bos_token()
    assert mlxgpt.load(out_gguf)[1].encode_prompt(TEXT) == ref.tokenize(TEXT.encode(), True)
    cli_ok("export", folder, out_hf)
    assert json.loads((out_hf / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert auto_tokenizer(out_hf)(TEXT).input_ids == tok.encode_prompt(TEXT)
    assert tokenizer_from_hf_folder(out_hf).encode_prompt(TEXT) == tok.encode_prompt(TEXT)


def test_llama3_folder_round_trip_writes_its_post_processor(tmp_path, hf_model, cli_ok):
    """A split transformers reads from tokenizer.json: the flag is its post-processor there."""
    cli_ok("convert", llama3_folder(tmp_path / "src", hf_model, flag=None), tmp_path / "mlx")
    cli_ok("export", tmp_path / "mlx", tmp_path / "hf")
    ref = auto_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "mlx", json.loads(
        (tmp_path / "mlx" / "config.json").read_text())["mlxgpt"]["tokenizer"])
    assert ref(TEXT).input_ids == tok.encode_prompt(TEXT) == [N_NORMAL, *tok.encode(TEXT)]
    assert gguf.SpecialVocab(tmp_path / "hf", load_merges=False).add_special_token["bos"]
    assert chat_ids(ref, MESSAGES) == chat_ids(auto_tokenizer(tmp_path / "src"), MESSAGES)


def test_without_add_bos_the_files_are_as_before(tmp_path, hf_model, cli_ok):
    """SmolLM2-like files: nothing added, and no add_bos written anywhere."""
    cli_ok("convert", write_llama_gguf(hf_model, tmp_path / "in.gguf"), tmp_path / "mlx")
    meta = json.loads((tmp_path / "mlx" / "config.json").read_text())["mlxgpt"]["tokenizer"]
    assert "add_bos" not in meta
    cfg = json.loads((tmp_path / "mlx" / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in cfg
    _, tok = mlxgpt.load(tmp_path / "mlx")
    assert not tok.add_bos and tok.encode_prompt(TEXT) == tok.encode(TEXT)
    cli_ok("export", tmp_path / "mlx", tmp_path / "out.gguf", "--format", "gguf")
    assert not llama_cpp_vocab(tmp_path / "out.gguf")._model.add_bos_token()


def test_a_bad_add_bos_in_config_is_one_line(tmp_path, hf_model, cli_ok):
    from mlxgpt.errors import MlxgptError

    cli_ok("convert", write_llama_gguf(hf_model, tmp_path / "in.gguf", add_bos=True),
           tmp_path / "mlx")
    meta = json.loads((tmp_path / "mlx" / "config.json").read_text())["mlxgpt"]["tokenizer"]
    with pytest.raises(MlxgptError, match="add_bos must be true or false"):
        load_tokenizer(tmp_path / "mlx", {**meta, "add_bos": "yes"})


# --------------------------------------------------------------------------- fine-tuning data


def test_finetune_examples_start_with_bos_where_text_is_plain(tmp_path, hf_model):
    from mlxgpt.data.examples import (
        Batches,
        Example,
        answer_prompt,
        encode_record,
        text_tokens,
    )

    folder = llama3_folder(tmp_path, hf_model)
    ref = auto_tokenizer(folder)
    tok = tokenizer_from_hf_folder(folder)
    bos, eot = tok.bos_id, tok.eot_id
    # a text record: transformers' tokenizer(text), then end-of-text; BOS is input only
    tokens, mask = encode_record({"text": TEXT}, tok, mask_prompt=False)
    assert tokens == ref(TEXT).input_ids + [eot]
    inputs, targets, weights = Batches([Example(tokens, mask)], 1).batch(0)
    n = len(tokens) - 1
    assert np.array(inputs)[0, 0] == bos and bos not in np.array(targets)[0, :n].tolist()
    assert np.array(weights)[0, :n].tolist() == [1.0] * n  # every text token and the end
    # prompt/completion: BOS, the prompt (masked), the completion and end-of-text (learnt)
    rec = {"prompt": "Q: 2+2?", "completion": " 4"}
    tokens, mask = encode_record(rec, tok, mask_prompt=True)
    prompt = ref("Q: 2+2?").input_ids
    assert tokens == prompt + tok.encode(" 4") + [eot]
    assert mask == [0] * len(prompt) + [1] * (len(tokens) - len(prompt))
    assert answer_prompt(rec, tok)[0] == prompt
    # a chat record: the template's own BOS, once
    chat = {"messages": [*MESSAGES, {"role": "assistant", "content": "Hello."}]}
    tokens, _ = encode_record(chat, tok, mask_prompt=True)
    assert tokens[0] == bos and tokens.count(bos) == 1
    assert tokens == chat_ids(ref, chat["messages"], False)
    assert answer_prompt(chat, tok)[0].count(bos) == 1
    # a classifier's text
    assert text_tokens(tok, TEXT, 64)[0] == ref(TEXT).input_ids


def test_finetune_examples_without_add_bos_are_unchanged(tmp_path):
    from mlxgpt.data.examples import encode_record

    tok = tokenizer_from_hf_folder(llama3_folder(tmp_path, post="none"))
    assert not tok.add_bos
    tokens, mask = encode_record({"text": TEXT}, tok, mask_prompt=False)
    assert tokens == tok.encode(TEXT) + [tok.eot_id] and mask == [1] * len(tokens)
