"""Fine-tuning Llama-family models: LoRA and DoRA on any of the q/k/v/o and gate/up/down
projections (by default every one, in the last 16 blocks), DoRA's forward against PEFT's
``use_dora=True``, adapters that mlx-lm loads on the exported Hugging Face folder, chat data
through the model's own template (the loss on exactly the assistant turns), a two-label mapping
learnt to 100 % on held-out rows, and the classifier head against transformers'
``LlamaForSequenceClassification`` (import, export, padding), trained by ``finetune --task
classify``.

The models are small random Llamas (tests/_llama_helpers.py), given a tokenizer with SmolLM2's
chat template by a round trip through GGUF (float32: the weights stay transformers').
"""

from __future__ import annotations

import copy
import itertools
import json
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from _llama_helpers import SMALL, SMOL_TEMPLATE, random_llama, write_llama_gguf  # noqa: E402

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints.adapters.lora import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAConfig,
    apply_lora,
    base_identity,
    fuse,
    lora_modules,
    parse_targets,
    save_adapter,
)
from mlxgpt.checkpoints.folder import load_model, save_classifier, save_model  # noqa: E402
from mlxgpt.core.classifier import GPTClassifier  # noqa: E402
from mlxgpt.core.llama import Llama, LlamaConfig  # noqa: E402
from mlxgpt.data.examples import answer_prompt, encode_records, read_jsonl  # noqa: E402
from mlxgpt.errors import MlxgptError  # noqa: E402
from mlxgpt.training.evaluate import generated_labels  # noqa: E402

TOL = 1e-4  # float32 logits, absolute
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEYS = [f"self_attn.{t}" for t in TARGETS[:4]] + [f"mlp.{t}" for t in TARGETS[4:]]
# At transformers' initializer_range (0.02) the frozen LM head behind the final RMSNorm caps
# every logit near 1, so no adapter could make a confident prediction; 1/sqrt(hidden) keeps the
# model's scale.
CONFIG = {"num_key_value_heads": 2, "initializer_range": 0.125}


def ids(batch=2, n=24, vocab=SMALL["vocab_size"], seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (batch, n)), mx.int32)


def randomize(model, seed=1):
    """Non-zero B matrices and DoRA magnitudes off the base's row norms, as training leaves them."""
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
        if "m" in m:
            m.m = m.m * mx.array(rng.uniform(0.8, 1.2, m.m.shape).astype(np.float32))
    mx.eval(model.parameters())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, mlxgpt model folder with SmolLM2's template, tokenizer)."""
    root = tmp_path_factory.mktemp("llama")
    hf = random_llama(CONFIG)
    model, tok = mlxgpt.load(write_llama_gguf(hf, root / "m.gguf"))
    assert tok.chat_template == SMOL_TEMPLATE and tok.eot_id == SMALL["vocab_size"] - 1
    return hf, save_model(model, root / "model", tok), tok


# --------------------------------------------------------------------------- targets, DoRA


def test_default_targets_every_projection_of_the_last_16_blocks():
    def tiny(n_layer):
        return Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=n_layer, num_attention_heads=4,
                                 num_key_value_heads=2))

    model, cfg = tiny(20), LoRAConfig(rank=2)
    apply_lora(model, cfg)
    assert cfg.targets == TARGETS and cfg.layers == tuple(range(4, 20))
    assert {p for p, _ in lora_modules(model)} == {
        f"model.layers.{i}.{k}" for i in range(4, 20) for k in KEYS}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == {f"model.layers.{i}.{k}.lora_{ab}" for i in range(4, 20) for k in KEYS
                         for ab in "ab"}
    small = LoRAConfig(rank=2, targets="q,v,down", dora=True)
    apply_lora(tiny(3), small)  # a smaller model: every block
    assert small.layers == (0, 1, 2) and small.targets == ("q_proj", "v_proj", "down_proj")
    assert parse_targets("self_attn.o_proj,gate_proj", "llama") == ("o_proj", "gate_proj")
    with pytest.raises(MlxgptError, match="unknown LoRA target 'c_attn' for a llama model "
                                          r"\(choose from q_proj, k_proj, v_proj, o_proj, "
                                          r"gate_proj, up_proj, down_proj, or all\)"):
        parse_targets("c_attn", "llama")


def test_dora_forward_equals_peft_use_dora(tmp_path):
    """Same weights (base with biases, A, B, magnitudes): the same logits as PEFT's DoRA."""
    import peft
    import torch

    hf = random_llama({**CONFIG, "attention_bias": True, "mlp_bias": True})
    hf.save_pretrained(tmp_path / "hf")
    model, _ = mlxgpt.load(tmp_path / "hf")
    x = ids()
    before = np.array(model(x))
    cfg = LoRAConfig(rank=4, alpha=8, dora=True)
    apply_lora(model, cfg)
    # A fresh DoRA layer (B = 0, m = the row norms of W) leaves the model as it was.
    np.testing.assert_allclose(np.array(model(x)), before, atol=1e-5)

    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(
        TARGETS), use_dora=True)).eval()
    gen = torch.Generator().manual_seed(0)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, layer in lora_modules(model):
            key = f"base_model.model.{path}"
            b = params[f"{key}.lora_B.default.weight"]  # (out, r)
            b.normal_(0.0, 0.1, generator=gen)
            m = params[f"{key}.lora_magnitude_vector.default.weight"]  # (out,)
            m.mul_(torch.empty_like(m).uniform_(0.8, 1.2, generator=gen))
            layer.lora_a = mx.array(params[f"{key}.lora_A.default.weight"].numpy().T)
            layer.lora_b = mx.array(b.numpy().T)
            layer.m = mx.array(m.numpy())
        ref = theirs(torch.from_numpy(np.array(x)).long()).logits.numpy()
    got = np.array(model(x))
    assert np.abs(ref - before).max() > 0.1  # the adapter changes the logits...
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)  # ...as PEFT's does

    # The magnitudes train (the norm is a constant for the gradient, as in PEFT and mlx-lm).
    def loss(m):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    assert float(mx.abs(grads["model.layers.1.mlp.down_proj.m"]).max()) > 0
    fuse(model)  # m / |W + dW| (W + dW) as one weight
    assert not lora_modules(model)
    np.testing.assert_allclose(np.array(model(x)), got, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- mlx-lm


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_loads_the_adapter_on_the_exported_folder(llama, tmp_path, cli_ok, kind):
    mlx_lm = pytest.importorskip("mlx_lm")
    _, folder, _ = llama
    model = load_model(folder)
    cfg = LoRAConfig(rank=4, alpha=8, dora=kind == "dora", base=base_identity(model.config))
    apply_lora(model, cfg)
    randomize(model)
    save_adapter(model, tmp_path / "ad", cfg)
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert meta["fine_tune_type"] == kind and meta["num_layers"] == 2
    assert meta["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": KEYS}
    leaves = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    keys = mx.load(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    assert set(keys) == {f"model.layers.{i}.{k}.{leaf}" for i in range(2) for k in KEYS
                         for leaf in leaves}

    cli_ok("export", folder, tmp_path / "hf")
    theirs, _ = mlx_lm.load(str(tmp_path / "hf"), adapter_path=str(tmp_path / "ad"))
    x = ids()
    want = np.array(model(x))
    np.testing.assert_allclose(np.array(theirs(x)), want, atol=TOL, rtol=0)
    ours, _ = mlxgpt.load(folder, adapter=tmp_path / "ad")  # and back into mlxgpt
    np.testing.assert_allclose(np.array(ours(x)), want, atol=1e-6, rtol=0)


def test_reads_a_dora_adapter_written_by_mlx_lm(llama, tmp_path):
    _, folder, _ = llama
    model, cfg = load_model(folder), LoRAConfig(rank=4, alpha=8, dora=True)
    apply_lora(model, cfg)
    randomize(model)
    save_adapter(model, tmp_path / "ad", cfg)
    # What mlx_lm.lora writes by default: no keys (every linear layer), 16 layers (more than
    # this model has: every block), scale instead of alpha, no mlxgpt keys.
    config = tmp_path / "ad" / ADAPTER_CONFIG
    config.write_text(json.dumps({"fine_tune_type": "dora", "num_layers": 16, "lora_parameters": {
        "rank": 4, "scale": 2.0, "dropout": 0.0}}))
    theirs, _ = mlxgpt.load(folder, adapter=tmp_path / "ad")
    np.testing.assert_array_equal(np.array(theirs(ids())), np.array(model(ids())))
    config.write_text(json.dumps({"fine_tune_type": "full", "num_layers": 16}))
    with pytest.raises(MlxgptError, match="mlx-lm's full fine-tune .* not an adapter"):
        mlxgpt.load(folder, adapter=tmp_path / "ad")


# --------------------------------------------------------------------------- chat data


def test_chat_template_puts_the_loss_on_exactly_the_assistant_turns(llama, tmp_path):
    import transformers

    _, folder, tok = llama
    convos = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "And you?"}, {"role": "assistant", "content": "Fine, ok"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name one"},
         {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "Thanks"}],
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convos))
    examples, _ = encode_records(read_jsonl(data), tok, mask_prompt=True, max_len=512)
    reference = transformers.AutoTokenizer.from_pretrained(folder)  # the template, rendered
    for messages, ex in zip(convos, examples, strict=True):
        text = reference.apply_chat_template(messages, tokenize=False)
        # The tokens are the rendered conversation (the template's own end-of-turn tokens, no
        # end-of-text added), tokenized as a whole string would be.
        assert tok.decode(ex.tokens) == text
        assert ex.tokens == tok.encode(text, allow_special=True)
        # Each assistant turn, found in the string: its content and the end-of-turn marker.
        spans = []
        for m in messages:
            if m["role"] == "assistant":
                cue = f"<|im_start|>assistant\n{m['content']}<|im_end|>"
                start = text.index(cue) + len("<|im_start|>assistant\n")
                spans.append((start, text.index(cue) + len(cue)))
        # A token counts iff its characters lie in a turn, and the counted ones cover the turns.
        trained, at = 0, 0
        for token, counted in zip(ex.tokens, ex.mask, strict=True):
            end = at + len(tok.decode([token]))
            assert counted == any(a <= at and end <= b for a, b in spans), (text[at:end], counted)
            trained += (end - at) * counted
            at = end
        assert trained == sum(b - a for a, b in spans)

    # Without a prefix-stable rendering the turns cannot be found: one line naming the record.
    odd = copy.copy(tok)
    odd.chat_template = ("{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(MlxgptError, match=r"chat.jsonl:1: the chat template renders a "
                                          "conversation otherwise than its beginning"):
        encode_records(read_jsonl(data), odd, mask_prompt=True, max_len=512)


# --------------------------------------------------------------------------- learning


FRUIT = ("apple", "pear", "plum", "fig", "lime", "kiwi")
TREES = ("oak", "elm", "ash", "fir", "yew", "pine")


def cue_rows(seed=0):
    """Three cue words of one list -> its label. The held-out rows are combinations of cue words
    that training never shows together."""
    combos = [(c, label) for words, label in ((FRUIT, "fruit"), (TREES, "tree"))
              for c in itertools.combinations(words, 3)]
    rng = random.Random(seed)
    rng.shuffle(combos)

    def rows(part, repeats):
        out = []
        for words, label in part:
            for _ in range(repeats):
                w = list(words)
                rng.shuffle(w)
                out.append({"prompt": " ".join(w) + " is a", "completion": f" {label}"})
        return out

    return rows(combos[10:], 4), rows(combos[:10], 1)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_learns_a_two_label_mapping_on_held_out_rows(llama, tmp_path, cli_ok):
    _, folder, tok = llama
    train, held_out = cue_rows()
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", train)
    test = read_jsonl(write_rows(tmp_path / "test.jsonl", held_out))
    assert {r["completion"] for _, r in test} == {" fruit", " tree"}
    assert generated_labels(load_model(folder), tok, test).accuracy == 0.0  # the base says neither
    r = cli_ok("finetune", "--model", folder, "--data", tmp_path / "d", "--out", tmp_path / "o",
               "--mask-prompt", "--steps", 80, "--lr", "1e-2", "--warmup", 0, "--batch-size", 8,
               "--eval-every", 0, "--save-every", 0, "--log-every", 40)
    # The defaults: every projection of every block (a model smaller than 16 blocks).
    meta = json.loads((tmp_path / "o" / ADAPTER_CONFIG).read_text())
    assert meta["targets"] == list(TARGETS) and meta["layers"] == [0, 1], r.output
    tuned, _ = mlxgpt.load(folder, adapter=tmp_path / "o")
    result = generated_labels(tuned, tok, test)
    assert result.accuracy == 1.0, result.report()


def test_cli_fine_tune_types_and_refusals(llama, tmp_path, cli, cli_ok, refused, model_folder):
    _, folder, _ = llama
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", cue_rows()[0][:16])
    # A constant learning rate, so that 2 + 1 steps follow the schedule of 3.
    common = ["finetune", "--model", folder, "--data", tmp_path / "d", "--steps", 2,
              "--batch-size", 4, "--eval-every", 0, "--lr", "1e-2", "--min-lr", "1e-2",
              "--warmup", 0, "--log-every", 1]
    dora = ["--fine-tune-type", "dora", "--targets", "q,down"]
    cli_ok(*common, *dora, "--out", tmp_path / "dora")
    meta = json.loads((tmp_path / "dora" / ADAPTER_CONFIG).read_text())
    assert meta["fine_tune_type"] == "dora" and meta["targets"] == ["q_proj", "down_proj"]
    weights = mx.load(str(tmp_path / "dora" / ADAPTER_WEIGHTS))
    assert "model.layers.1.mlp.down_proj.m" in weights
    base, _ = mlxgpt.load(folder)
    tuned, _ = mlxgpt.load(folder, adapter=tmp_path / "dora")
    assert np.abs(np.array(tuned(ids())) - np.array(base(ids()))).max() > 1e-4  # it trained
    r = cli_ok(*common, *dora, "--out", tmp_path / "dora", "--steps", 3, "--resume")
    assert "resuming" in r.output and "done at step 3" in r.output
    cli_ok(*common, *dora, "--out", tmp_path / "straight", "--steps", 3)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").open()) if "loss" in r]

    # The checkpoint's adapter (magnitudes included) was read back: the same losses.
    np.testing.assert_allclose(losses(tmp_path / "dora"), losses(tmp_path / "straight"),
                               atol=1e-6)
    gpt = model_folder(tmp_path, name="gpt")
    assert "adapter for a llama model does not fit this gpt2 model" in refused(
        cli("eval", "--model", gpt, "--adapter", tmp_path / "dora", "--data",
            tmp_path / "d" / "train.jsonl"))

    cli_ok(*common, "--out", tmp_path / "full", "--fine-tune-type", "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert "choose one of --full and --fine-tune-type dora" in refused(
        cli(*common, "--out", tmp_path / "x", "--full", "--fine-tune-type", "dora"))
    assert "unknown LoRA target 'c_attn' for a llama model" in refused(
        cli(*common, "--out", tmp_path / "x", "--targets", "c_attn"))
    assert "--layers 5: layer indices must be in 0..1" in refused(
        cli(*common, "--out", tmp_path / "x", "--layers", "5"))


def test_grad_checkpoint_gives_the_same_gradients_on_llama():
    from mlxgpt.training.finetune import grad_checkpoint
    from mlxgpt.training.loss import lm_loss

    x = ids(n=17)

    def grads(ckpt):
        mx.random.seed(0)
        model = Llama(LlamaConfig(**SMALL))
        apply_lora(model, LoRAConfig(rank=4))
        randomize(model)
        if ckpt:
            grad_checkpoint(model)
        model.train()
        (loss, _), g = nn.value_and_grad(model, lm_loss)(model, x[:, :-1], x[:, 1:])
        return float(loss), dict(tree_flatten(g))

    (plain_loss, plain), (ckpt_loss, ckpt) = grads(False), grads(True)
    assert abs(plain_loss - ckpt_loss) < 1e-6 and plain.keys() == ckpt.keys()
    for k in plain:
        np.testing.assert_allclose(np.array(ckpt[k]), np.array(plain[k]), atol=1e-6)


# --------------------------------------------------------------------------- classifier head


LABELS = ("cat", "dog", "fish")


def hf_classifier(hf, pad):
    """transformers' LlamaForSequenceClassification with ``hf``'s body and a random head."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**{**SMALL, **CONFIG}, num_labels=3, pad_token_id=pad,
                                      id2label=dict(enumerate(LABELS)),
                                      label2id={a: i for i, a in enumerate(LABELS)})
    clf = transformers.LlamaForSequenceClassification(config).eval()
    clf.model.load_state_dict(hf.model.state_dict())
    with torch.no_grad():
        clf.score.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return clf


def torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def padded(rows, pad):
    width = max(map(len, rows))
    return (np.array([r + [pad] * (width - len(r)) for r in rows], np.int32),
            np.array([len(r) for r in rows], np.int32))


def test_classifier_imports_from_transformers_with_the_same_logits(llama, tmp_path, cli_ok):
    hf, _, _ = llama
    eot = SMALL["vocab_size"] - 1
    ref_model = hf_classifier(hf, pad=eot)
    ref_model.save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, eot, n).tolist() for n in (7, 1, 13, 4)]  # no pad id inside
    tokens, lengths = padded(rows, eot)
    ref = torch_logits(ref_model, tokens)

    clf, _ = mlxgpt.load_classifier(tmp_path / "hf")
    assert clf.labels == LABELS and clf.config.model_type == "llama"
    got = np.array(clf(mx.array(tokens), mx.array(lengths)))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    # Lengths, not a pad id, end each row: padding with a token the texts use (SmolLM2 pads with
    # its end-of-turn token, 2) changes nothing, and neither does padding at all.
    rows[2][5] = 2
    tokens2, _ = padded(rows, 2)
    with_real_pad = np.array(clf(mx.array(tokens2), mx.array(lengths)))
    alone = np.concatenate([np.array(clf(mx.array([r]))) for r in rows])
    np.testing.assert_allclose(with_real_pad, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(alone[[0, 1, 3]], got[[0, 1, 3]], atol=1e-5, rtol=0)

    cli_ok("convert", tmp_path / "hf", tmp_path / "mlx")
    converted, _ = mlxgpt.load_classifier(tmp_path / "mlx")
    np.testing.assert_allclose(np.array(converted(mx.array(tokens), mx.array(lengths))), ref,
                               atol=TOL, rtol=0)


def test_classifier_exports_to_transformers_with_the_same_logits(llama, tmp_path, cli_ok):
    import transformers

    _, folder, tok = llama
    clf = GPTClassifier(load_model(folder), LABELS, key=mx.random.key(0))
    clf.score.weight = mx.random.normal(clf.score.weight.shape, key=mx.random.key(1))
    save_classifier(clf, tmp_path / "clf", tok)
    cli_ok("export", tmp_path / "clf", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["pad_token_id"] == tok.eot_id and cfg["id2label"] == {"0": "cat", "1": "dog",
                                                                      "2": "fish"}
    theirs = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["a short one", "and a somewhat longer text", "x"]
    batch = hf_tok(texts, padding=True, return_tensors="np")["input_ids"]
    tokens, lengths = padded([tok.encode(t) for t in texts], tok.eot_id)
    np.testing.assert_array_equal(batch, tokens)  # transformers pads with end-of-turn too
    want = np.array(clf(mx.array(tokens), mx.array(lengths)))
    np.testing.assert_allclose(torch_logits(theirs, tokens), want, atol=TOL, rtol=0)
    back, _ = mlxgpt.load_classifier(tmp_path / "hf")
    np.testing.assert_allclose(np.array(back(mx.array(tokens), mx.array(lengths))), want,
                               atol=1e-5, rtol=0)


def test_finetune_classify_trains_a_head_on_a_llama_model(llama, tmp_path, cli_ok):
    _, folder, _ = llama
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.sample(words, 3)), "label": label}
            for _ in range(48) for words, label in ((FRUIT, "fruit"), (TREES, "tree"))]
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", rows[:80])
    write_rows(tmp_path / "d" / "valid.jsonl", rows[80:])
    out = tmp_path / "clf"
    r = cli_ok("finetune", "--task", "classify", "--model", folder, "--data", tmp_path / "d",
               "--out", out, "--steps", 20, "--lr", "1e-2", "--batch-size", 8,
               "--eval-every", 20, "--eval-batches", 2, "--log-every", 10)
    assert "val accuracy 1.0000" in r.output, r.output
    clf, tok = mlxgpt.load_classifier(out)
    assert clf.config.model_type == "llama" and clf.labels == ("fruit", "tree")
    report = cli_ok("eval", "--task", "classify", "--model", out, "--data",
                    tmp_path / "d" / "valid.jsonl").output
    assert "accuracy: 1.0000" in report
    assert [p.label for p in mlxgpt.classify(clf, tok, ["oak elm fir", "fig kiwi plum"])] == [
        "tree", "fruit"]


def as_chat(rows):
    """The cue rows as conversations: the words asked in a user turn, the label answered."""
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"].strip()}]}
            for r in rows]


def test_chat_answers_are_learnt_and_evaluated_through_the_template(llama, tmp_path, cli_ok):
    _, folder, tok = llama
    train, held_out = cue_rows()
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", as_chat(train))
    test_file = write_rows(tmp_path / "test.jsonl", as_chat(held_out))
    # What evaluation reads and scores is what training taught: the prompt, then the answer as
    # the template writes it (its end-of-turn marker included), the only tokens with loss.
    (ex,), _ = encode_records(read_jsonl(test_file)[:1], tok, mask_prompt=True, max_len=512)
    prompt, label, answer = answer_prompt(read_jsonl(test_file)[0][1], tok)
    n = len(prompt) + len(answer)
    assert ex.tokens[:n] == prompt + answer and answer[-1] == tok.eot_id
    assert ex.mask[:n] == [0] * len(prompt) + [1] * len(answer) and not any(ex.mask[n:])
    assert label == held_out[0]["completion"].strip()

    def accuracies(*adapter):
        report = cli_ok("eval", "--task", "classify", "--model", folder, *adapter,
                        "--data", test_file).output
        values = dict(line.split(": ", 1) for line in report.splitlines() if ": " in line)
        return (float(values["accuracy"].split()[0]), float(values["label accuracy"].split()[0]),
                float(values["label macro-F1"]))

    assert accuracies()[0] == 0.0  # the base answers with neither label
    cli_ok("finetune", "--model", folder, "--data", tmp_path / "d", "--out", tmp_path / "o",
           "--mask-prompt", "--steps", 160, "--lr", "1e-2", "--warmup", 0, "--batch-size", 8,
           "--eval-every", 0, "--save-every", 0, "--log-every", 40)
    assert accuracies("--adapter", tmp_path / "o") == (1.0, 1.0, 1.0)


# --------------------------------------------------------------------------- QLoRA


def test_qlora_on_a_q4_1_gguf_base_trains_and_fuses_within_the_quantization_error(
        tmp_path, monkeypatch, cli_ok):
    """A Q4_1 file (SmolLM2's type) kept 4-bit, as on a GPU: LoRA trains on the quantized base,
    which stays as it was; fused without re-quantizing it computes base + adapter (float32,
    1e-4); re-quantized, each layer is MLX's 4-bit quantization of the exact fused weight, every
    weight within one 4-bit step of it (the quantization's own rounding), and the logits move
    accordingly (stated in the docs)."""
    from mlxgpt.checkpoints.quantize import dense_weight
    from mlxgpt.core import backend as backend_mod

    hf = random_llama(CONFIG)
    path = write_llama_gguf(hf, tmp_path / "q4_1.gguf", default="Q4_1")
    device = mx.default_device()
    monkeypatch.setitem(backend_mod._records, str(device),
                        backend_mod.Backend(device, force_quantized=True))
    base = tmp_path / "base"
    cli_ok("convert", path, base)
    model, tok = mlxgpt.load(base)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert len(quantized) == 7 * SMALL["num_hidden_layers"] + 1  # and the untied head
    assert all(m.bits == 4 and m.group_size == 32 for m in quantized.values())
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}

    train, _ = cue_rows()
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", train)
    cli_ok("finetune", "--model", base, "--data", tmp_path / "d", "--out", tmp_path / "a",
           "--mask-prompt", "--steps", 30, "--lr", "1e-2", "--warmup", 0, "--batch-size", 8,
           "--eval-every", 0, "--save-every", 0, "--log-every", 10)
    log = [json.loads(s) for s in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses  # it learns, on a 4-bit base

    tuned, _ = mlxgpt.load(base, adapter=tmp_path / "a")
    flat = dict(tree_flatten(tuned.parameters()))
    for key, value in before.items():  # the base is what it was, still 4-bit
        got = flat.get(key, flat.get(key.replace(".weight", ".linear.weight")
                                     .replace(".scales", ".linear.scales")
                                     .replace(".biases", ".linear.biases")))
        assert got is not None and np.array_equal(np.array(got), value), key
    x = ids(n=16)
    with_adapter = np.array(tuned(x))

    cli_ok("fuse", "--model", base, "--adapter", tmp_path / "a", "--out", tmp_path / "f32")
    exact, _ = mlxgpt.load(tmp_path / "f32")
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in exact.named_modules())
    assert np.abs(np.array(exact(x)) - with_adapter).max() < TOL

    cli_ok("fuse", "--model", base, "--adapter", tmp_path / "a", "--out", tmp_path / "q4",
           "--requantize")
    requant, _ = mlxgpt.load(tmp_path / "q4")
    dense = dict(exact.named_modules())
    for name, m in requant.named_modules():
        if isinstance(m, nn.QuantizedLinear) and name == "lm_head":  # not adapted: as it was
            assert np.array_equal(np.array(m.weight), before["lm_head.weight"])
        elif isinstance(m, nn.QuantizedLinear):
            assert m.bits == 4 and m.group_size == 32
            w = np.array(dense_weight(dense[name]).astype(mx.float32))
            # exactly MLX's 4-bit quantization of the exact fused weight: its error is that
            # quantization's own, under one step per weight (affine rounding keeps each group's
            # end points, so an error reaches up to a step, not half of one)
            want = nn.QuantizedLinear.from_linear(dense[name], 32, 4)
            assert mx.array_equal(m.weight, want.weight), name
            step = np.abs(np.repeat(np.array(m.scales), 32, axis=1))
            err = np.abs(np.array(dense_weight(m).astype(mx.float32)) - w)
            assert (err <= step * (1 + 1e-4)).all(), name
    # The logits move by what 4-bit rounding moves them anyway: as far as the Q4_1 file's own
    # logits are from the float model it was made from (transformers', same tokens).
    from _llama_helpers import llama_logits

    drift = np.abs(np.array(requant(x)) - with_adapter).max()
    own = np.abs(np.array(model(x)) - llama_logits(hf, np.array(x))).max()
    print(f"re-quantized fused vs base + adapter: {drift:.3f}; Q4_1 base vs float: {own:.3f}")
    assert 0 < drift < 2 * own, (drift, own)
