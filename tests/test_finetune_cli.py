"""``mlxgpt finetune`` / ``fuse`` / ``eval`` end to end on a tiny byte-level model."""

import json
import os
import random
import signal

import mlx.core as mx
import numpy as np
import pytest

from mlxgpt.checkpoints.adapters.lora import load_adapter
from mlxgpt.checkpoints.folder import load_model
from mlxgpt.data.examples import Batches, read_jsonl
from mlxgpt.tokenizers import byte_tokenizer
from mlxgpt.training.evaluate import generated_labels

COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green",
           "coal": "black", "snow": "white"}


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
def tiny(tmp_path_factory, model_folder):
    root = tmp_path_factory.mktemp("ft")
    return model_folder(root, name="model", n_embd=64), make_data(root / "data")


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").open())
            if "loss" in r]


FAST = ["--lr", "1e-2", "--batch-size", "8", "--rank", "8", "--targets", "all",
        "--warmup", "5", "--log-every", "1"]


@pytest.mark.slow
def test_lora_learns_a_simple_mapping(tiny, tmp_path, cli_ok):
    model_dir, data = tiny
    base, tok = load_model(model_dir), byte_tokenizer()
    records = read_jsonl(data / "valid.jsonl")
    before = generated_labels(base, tok, records).accuracy
    out = tmp_path / "ad"
    r = cli_ok("finetune", "--model", model_dir, "--data", data, "--out", out, "--mask-prompt",
               "--steps", 120, "--eval-every", 60, *FAST)
    assert "trainable parameters: 16,384 of " in r.output
    curve = [v for _, v in losses(out)]
    # Start: about ln(257) = 5.5 nats (random model); the mapping is learnt far below that.
    assert curve[0] > 4.0 and np.mean(curve[-10:]) < 0.3 * curve[0]
    tuned = load_adapter(load_model(model_dir), out)
    after = generated_labels(tuned, tok, records)
    assert before < 0.2 and after.accuracy >= 0.9, (before, after.report())
    # The published adapter is the best checkpoint; eval reports the same accuracy.
    r = cli_ok("eval", "--model", model_dir, "--adapter", out, "--data", data / "valid.jsonl",
               "--task", "classify")
    assert f"accuracy: {after.accuracy:.4f}" in r.output
    assert "confusion" in r.output


def test_resume_restores_optimizer_state_and_step(tiny, tmp_path, monkeypatch, cli, cli_ok):
    model_dir, data = tiny
    args = ["finetune", "--model", model_dir, "--data", data, "--mask-prompt",
            "--steps", 8, "--eval-every", 0, "--save-every", 0, "--dropout", 0.1, *FAST]
    cli_ok(*args, "--out", tmp_path / "straight")

    # Ctrl-C during step 4 (micro-batch 3): the loop finishes the step, checkpoints, stops.
    real_batch = Batches.batch

    def interrupting(self, index):
        if index == 3 and len(self.examples) > 100:  # the train set, not validation
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, index)

    monkeypatch.setattr(Batches, "batch", interrupting)
    r = cli(*args, "--out", tmp_path / "resumed")
    assert r.exit_code == 130 and "stopped at step 4" in r.output
    state = json.loads((tmp_path / "resumed" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 4  # Ctrl-C keeps a checkpoint to resume from ...
    assert not (tmp_path / "resumed" / "adapters.safetensors").exists()  # ... not a result
    monkeypatch.setattr(Batches, "batch", real_batch)

    r = cli_ok(*args, "--out", tmp_path / "resumed", "--resume")
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


def test_fuse_and_qlora_cli(tiny, tmp_path, cli, cli_ok, refused):
    model_dir, data = tiny
    out = tmp_path / "q"
    r = cli_ok("finetune", "--model", model_dir, "--data", data, "--out", out, "--mask-prompt",
               "--steps", 10, "--quantize", "4", *FAST)
    assert "base quantized to 4 bits" in r.output
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"] == {"group_size": 64, "bits": 4}
    # Fusing onto the float base: eval loss equals the adapter's on that base.
    cli_ok("fuse", "--model", model_dir, "--adapter", out, "--out", tmp_path / "fused")
    with_adapter = cli_ok("eval", "--model", model_dir, "--adapter", out, "--data",
                          data / "valid.jsonl").output
    fused = cli_ok("eval", "--model", tmp_path / "fused", "--data", data / "valid.jsonl").output
    assert with_adapter.splitlines()[0] == fused.splitlines()[0]  # "loss: x.xxxx"
    exists = cli("fuse", "--model", model_dir, "--adapter", out, "--out", tmp_path / "fused")
    refused(exists, "already exists")  # no --force


def test_full_finetune_writes_a_model_folder(tiny, tmp_path, cli, cli_ok):
    model_dir, data = tiny
    out = tmp_path / "full"
    r = cli_ok("finetune", "--model", model_dir, "--data", data, "--out", out, "--full",
               "--steps", 5, "--lr", "1e-3", "--batch-size", "8")
    assert "(100.000%)" in r.output
    tuned = load_model(out)  # OUT is itself a model folder
    base = load_model(model_dir)
    assert not mx.array_equal(tuned.h[0].attn.c_attn.weight, base.h[0].attn.c_attn.weight)
    r = cli("eval", "--model", model_dir, "--adapter", out, "--data", data / "valid.jsonl")
    assert r.exit_code == 1 and "is a model folder" in r.output


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
def test_bad_data_is_one_clear_line(tiny, tmp_path, content, why, cli, refused):
    model_dir, _ = tiny
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(content)
    r = cli("finetune", "--model", model_dir, "--data", tmp_path / "d", "--out", tmp_path / "o")
    assert why in refused(r)
    assert not (tmp_path / "o" / "adapters.safetensors").exists()


def test_rank_larger_than_layer_is_one_clear_line(tiny, tmp_path, cli, refused):
    model_dir, data = tiny
    r = cli("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "o",
            "--rank", 65)
    assert "--rank 65 is larger than layer h.0.attn.c_attn (64 -> 192)" in refused(r)


def test_adapter_for_another_model_shape_is_one_clear_line(tiny, tmp_path, cli, cli_ok, refused,
                                                           model_folder):
    model_dir, data = tiny
    cli_ok("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "ad",
           "--steps", 2)
    wider = model_folder(tmp_path, name="wide", n_embd=128)
    r = cli("eval", "--model", wider, "--adapter", tmp_path / "ad", "--data",
            data / "valid.jsonl")
    assert "does not fit this model: n_embd=64 (model has 128)" in refused(r)
    r = cli("fuse", "--model", wider, "--adapter", tmp_path / "ad", "--out", tmp_path / "f")
    assert "does not fit this model" in refused(r)
    assert not (tmp_path / "f").exists()


def test_out_holding_a_run_needs_resume_or_force(tiny, tmp_path, cli, cli_ok, refused):
    model_dir, data = tiny
    args = ["finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "o",
            "--steps", 1]
    cli_ok(*args)
    assert "--resume to continue it or --force" in refused(cli(*args))
    cli_ok(*args, "--force")
    r = cli("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "new",
            "--resume")
    assert "cannot resume: no checkpoint" in refused(r)


def test_grad_checkpoint_gives_the_same_gradients(tiny_model):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxgpt.checkpoints.adapters.lora import LoRAConfig, apply_lora, lora_modules
    from mlxgpt.training.finetune import grad_checkpoint
    from mlxgpt.training.loss import lm_loss

    x = mx.array(np.random.default_rng(0).integers(0, 97, (2, 17)), mx.int32)

    def grads(ckpt):
        m = tiny_model(vocab_size=97, n_positions=32, n_embd=64)
        apply_lora(m, LoRAConfig(rank=4, targets="all"))
        for _, layer in lora_modules(m):
            layer.lora_b = mx.full(layer.lora_b.shape, 0.01)
        if ckpt:
            grad_checkpoint(m)
        m.train()
        (loss, _), g = nn.value_and_grad(m, lm_loss)(m, x[:, :-1], x[:, 1:],
                                                         mx.ones((2, 16)))
        return loss, dict(tree_flatten(g))

    (l1, g1), (l2, g2) = grads(False), grads(True)
    assert l1.item() == l2.item()
    assert all(np.allclose(g1[k], g2[k], atol=1e-6) for k in g1)


def test_eval_loss_on_text_and_jsonl(tiny, tmp_path, cli, cli_ok, refused):
    import math

    model_dir, data = tiny
    (tmp_path / "t.txt").write_text("the sky is blue and the grass is green\n" * 3)
    out = cli_ok("eval", "--model", model_dir, "--data", tmp_path / "t.txt").output
    values = dict(line.split(": ") for line in out.splitlines())
    # A random byte model: about ln(257) nats per token; perplexity is exp(loss).
    assert abs(float(values["loss"]) - math.log(257)) < 0.5
    assert abs(float(values["perplexity"]) - math.exp(float(values["loss"]))) < 0.01 * 257
    # 117 bytes + <|endoftext|> in two 64-token windows; each window's first token has no
    # context and is not scored.
    assert int(values["tokens"]) == 3 * 39 + 1 - 2
    # bits per byte: the loss in bits times tokens per byte (118 byte tokens for 117 bytes)
    bpb = float(values["loss"]) / math.log(2) * 118 / 117
    assert float(values["bits per byte"]) == pytest.approx(bpb, abs=1e-3)
    masked = cli_ok("eval", "--model", model_dir, "--data", data / "valid.jsonl", "--mask-prompt")
    full = cli_ok("eval", "--model", model_dir, "--data", data / "valid.jsonl")
    count = dict(line.split(": ") for line in masked.output.splitlines())["tokens"]
    assert int(count) < int(dict(line.split(": ") for line in full.output.splitlines())["tokens"])
    r = cli("eval", "--model", model_dir, "--data", tmp_path / "t.txt", "--task", "classify")
    assert 'needs {"prompt", "completion"} lines' in refused(r)
