"""``mlxgpt finetune`` / ``fuse`` / ``eval`` end to end on a tiny byte-level model."""

import json
import os
import random
import signal

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxgpt.checkpoint import load_model, save_model
from mlxgpt.cli import main
from mlxgpt.evaluate import classify
from mlxgpt.lora import load_adapter
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.sft import Batches, read_jsonl
from mlxgpt.tokenizer import byte_tokenizer

COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green",
           "coal": "black", "snow": "white"}


def make_model(folder, n_embd=64, seed=0):
    mx.random.seed(seed)
    model = GPT(GPTConfig(vocab_size=257, n_positions=64, n_embd=n_embd, n_layer=2, n_head=2))
    save_model(model, folder, byte_tokenizer())
    return folder


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(folder, n_train=240, n_valid=30, seed=0):
    rng = random.Random(seed)
    folder.mkdir()
    for name, n in (("train", n_train), ("valid", n_valid)):
        keys = [rng.choice(list(COLOURS)) for _ in range(n)]
        write_rows(folder / f"{name}.jsonl",
                   [{"prompt": f"{k}:", "completion": f" {COLOURS[k]}"} for k in keys])
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    return make_model(root / "model"), make_data(root / "data")


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").open())
            if "loss" in r]


FAST = ["--lr", "1e-2", "--batch-size", "8", "--rank", "8", "--targets", "all",
        "--warmup", "5", "--log-every", "1"]


def test_lora_learns_a_simple_mapping(tiny, tmp_path):
    model_dir, data = tiny
    base, tok = load_model(model_dir), byte_tokenizer()
    records = read_jsonl(data / "valid.jsonl")
    before = classify(base, tok, records).accuracy
    out = tmp_path / "ad"
    r = run("finetune", "--model", model_dir, "--data", data, "--out", out, "--mask-prompt",
            "--steps", 120, "--eval-every", 60, *FAST)
    assert "trainable parameters: 16,384 of " in r.output
    curve = [v for _, v in losses(out)]
    # Start: about ln(257) = 5.5 nats (random model); the mapping is learnt far below that.
    assert curve[0] > 4.0 and np.mean(curve[-10:]) < 0.3 * curve[0]
    tuned = load_adapter(load_model(model_dir), out)
    after = classify(tuned, tok, records)
    assert before < 0.2 and after.accuracy >= 0.9, (before, after.report())
    # The published adapter is the best checkpoint; eval reports the same accuracy.
    r = run("eval", "--model", model_dir, "--adapter", out, "--data", data / "valid.jsonl",
            "--task", "classify")
    assert f"accuracy: {after.accuracy:.4f}" in r.output
    assert "confusion" in r.output


def test_resume_restores_optimizer_state_and_step(tiny, tmp_path, monkeypatch):
    model_dir, data = tiny
    args = ["finetune", "--model", model_dir, "--data", data, "--mask-prompt",
            "--steps", 8, "--eval-every", 0, "--save-every", 0, "--dropout", 0.1, *FAST]
    run(*args, "--out", tmp_path / "straight")

    # Ctrl-C during step 4 (micro-batch 3): the loop finishes the step, checkpoints, stops.
    real_batch = Batches.batch

    def interrupting(self, index):
        if index == 3 and len(self.examples) > 100:  # the train set, not validation
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, index)

    monkeypatch.setattr(Batches, "batch", interrupting)
    r = run(*args, "--out", tmp_path / "resumed")
    assert "stopped at step 4" in r.output
    state = json.loads((tmp_path / "resumed" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert (tmp_path / "resumed" / "adapters.safetensors").is_file()  # Ctrl-C keeps the adapter
    monkeypatch.setattr(Batches, "batch", real_batch)

    r = run(*args, "--out", tmp_path / "resumed", "--resume")
    assert "resuming" in r.output
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 9))
    # Same losses after the resume only if the AdamW moments and the step were restored.
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], atol=1e-6)
    a = mx.load(str(tmp_path / "straight" / "last" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "resumed" / "last" / "adapters.safetensors"))
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    opt_a = mx.load(str(tmp_path / "straight" / "last" / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "resumed" / "last" / "optimizer.safetensors"))
    assert set(opt_a) == set(opt_b) and all(np.allclose(opt_a[k], opt_b[k], atol=1e-6)
                                            for k in opt_a)


def test_fuse_and_qlora_cli(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "q"
    r = run("finetune", "--model", model_dir, "--data", data, "--out", out, "--mask-prompt",
            "--steps", 10, "--quantize", "4", *FAST)
    assert "base quantized to 4 bits" in r.output
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"] == {"group_size": 64, "bits": 4}
    # Fusing onto the float base: eval loss equals the adapter's on that base.
    run("fuse", "--model", model_dir, "--adapter", out, "--out", tmp_path / "fused")
    with_adapter = run("eval", "--model", model_dir, "--adapter", out, "--data",
                       data / "valid.jsonl").output
    fused = run("eval", "--model", tmp_path / "fused", "--data", data / "valid.jsonl").output
    assert with_adapter.splitlines()[0] == fused.splitlines()[0]  # "loss: x.xxxx"
    assert run("fuse", "--model", model_dir, "--adapter", out, "--out", tmp_path / "fused",
               ok=False).exit_code == 1  # exists, no --force


def test_full_finetune_writes_a_model_folder(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "full"
    r = run("finetune", "--model", model_dir, "--data", data, "--out", out, "--full",
            "--steps", 5, "--lr", "1e-3", "--batch-size", "8")
    assert "(100.000%)" in r.output
    tuned = load_model(out)  # OUT is itself a model folder
    base = load_model(model_dir)
    assert not mx.array_equal(tuned.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)
    r = run("eval", "--model", model_dir, "--adapter", out, "--data", data / "valid.jsonl",
            ok=False)
    assert r.exit_code == 1 and "is a model folder" in r.output


def one_error_line(result):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(
    "content, why",
    [
        ('{"prompt": "a:", "completion": " b"}\n{"prompt": "a:" "completion"}\n',
         "train.jsonl:2: not valid JSON"),
        ('{"prompt": "a:", "completion": " b"}\n{"prompt": "x"}\n',
         'train.jsonl:2: "prompt" without "completion"'),
        ("", "train.jsonl: empty (no examples)"),
    ],
)
def test_bad_data_is_one_clear_line(tiny, tmp_path, content, why):
    model_dir, _ = tiny
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(content)
    r = run("finetune", "--model", model_dir, "--data", tmp_path / "d", "--out", tmp_path / "o",
            ok=False)
    assert why in one_error_line(r)
    assert not (tmp_path / "o" / "adapters.safetensors").exists()


def test_rank_larger_than_layer_is_one_clear_line(tiny, tmp_path):
    model_dir, data = tiny
    r = run("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "o",
            "--rank", 65, ok=False)
    assert "--rank 65 is larger than layer h.0.attn.c_attn (64 -> 192)" in one_error_line(r)


def test_adapter_for_another_model_shape_is_one_clear_line(tiny, tmp_path):
    model_dir, data = tiny
    run("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "ad",
        "--steps", 2)
    wider = make_model(tmp_path / "wide", n_embd=128)
    r = run("eval", "--model", wider, "--adapter", tmp_path / "ad", "--data",
            data / "valid.jsonl", ok=False)
    assert "does not fit this model: n_embd=64 (model has 128)" in one_error_line(r)
    r = run("fuse", "--model", wider, "--adapter", tmp_path / "ad", "--out", tmp_path / "f",
            ok=False)
    assert "does not fit this model" in one_error_line(r)
    assert not (tmp_path / "f").exists()


def test_out_holding_a_run_needs_resume_or_force(tiny, tmp_path):
    model_dir, data = tiny
    args = ["finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "o",
            "--steps", 1]
    run(*args)
    assert "--resume to continue it or --force" in one_error_line(run(*args, ok=False))
    run(*args, "--force")
    r = run("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "new",
            "--resume", ok=False)
    assert "cannot resume: no checkpoint" in one_error_line(r)


def test_grad_checkpoint_gives_the_same_gradients():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxgpt.finetune import grad_checkpoint
    from mlxgpt.lora import LoRAConfig, apply_lora, lora_modules
    from mlxgpt.sft import masked_loss

    x = mx.array(np.random.default_rng(0).integers(0, 97, (2, 17)), mx.int32)

    def grads(ckpt):
        mx.random.seed(0)
        m = GPT(GPTConfig(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=2))
        apply_lora(m, LoRAConfig(rank=4, targets="all"))
        for _, layer in lora_modules(m):
            layer.lora_b = mx.full(layer.lora_b.shape, 0.01)
        if ckpt:
            grad_checkpoint(m)
        m.train()
        (loss, _), g = nn.value_and_grad(m, masked_loss)(m, x[:, :-1], x[:, 1:],
                                                         mx.ones((2, 16)))
        return loss, dict(tree_flatten(g))

    (l1, g1), (l2, g2) = grads(False), grads(True)
    assert l1.item() == l2.item()
    assert all(np.allclose(g1[k], g2[k], atol=1e-6) for k in g1)


def test_eval_loss_on_text_and_jsonl(tiny, tmp_path):
    import math

    model_dir, data = tiny
    (tmp_path / "t.txt").write_text("the sky is blue and the grass is green\n" * 3)
    out = run("eval", "--model", model_dir, "--data", tmp_path / "t.txt").output
    values = dict(line.split(": ") for line in out.splitlines())
    # A random byte model: about ln(257) nats per token; perplexity is exp(loss).
    assert abs(float(values["loss"]) - math.log(257)) < 0.5
    assert abs(float(values["perplexity"]) - math.exp(float(values["loss"]))) < 0.01 * 257
    # 117 bytes + <|endoftext|> in two 64-token windows; each window's first token has no
    # context and is not scored.
    assert int(values["tokens"]) == 3 * 39 + 1 - 2
    masked = run("eval", "--model", model_dir, "--data", data / "valid.jsonl", "--mask-prompt")
    full = run("eval", "--model", model_dir, "--data", data / "valid.jsonl")
    count = dict(line.split(": ") for line in masked.output.splitlines())["tokens"]
    assert int(count) < int(dict(line.split(": ") for line in full.output.splitlines())["tokens"])
    r = run("eval", "--model", model_dir, "--data", tmp_path / "t.txt", "--task", "classify",
            ok=False)
    assert 'needs {"prompt", "completion"} lines' in one_error_line(r)
