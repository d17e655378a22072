"""The training loop: learning, exact resume, gradient accumulation, parity with PyTorch."""

from __future__ import annotations

import json
import math

import conftest
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxgpt import GPT
from mlxgpt.checkpoints import folder as ckpt
from mlxgpt.cpu import parallel
from mlxgpt.data.corpus import TokenBatches
from mlxgpt.errors import MlxgptError
from mlxgpt.training.config import TrainConfig
from mlxgpt.training.distributed import all_sum_tree, world
from mlxgpt.training.loop import train
from mlxgpt.training.loss import lm_loss
from mlxgpt.training.native_pass import NATIVE_ENV
from mlxgpt.training.optim import OPTIMIZER_FILE, lr_schedule, make_optimizer
from mlxgpt.training.pretrain import init_weights
from mlxgpt.training.state import STATE_FILE
from mlxgpt.training.step import Stepper

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        * 40).encode()
TOKENS = np.frombuffer(TEXT, dtype=np.uint8).astype(np.uint16)


def fresh_model(dropout: float = 0.0, seed: int = 0) -> GPT:
    """Conftest's tiny model at 32 positions, initialised as pretraining does."""
    model = conftest.make_tiny_model(n_positions=32, dropout=dropout)
    init_weights(model, seed)
    return model


def save_weights(model: nn.Module, folder) -> None:
    ckpt.write_model_files(model, folder)


def load_weights(model: nn.Module, folder) -> None:
    w = ckpt.load_safetensors(folder / ckpt.WEIGHTS_FILE)
    model.load_weights([(k.removeprefix(ckpt.KEY_PREFIX), v) for k, v in w.items()])


def run(tmp_path, name, cfg, *, dropout=0.0, resume=False, should_stop=None, batch_size=8,
        val=True):
    model = fresh_model(dropout)
    data = TokenBatches(TOKENS[:3000], batch_size, 32, seed=1)
    val_data = TokenBatches(TOKENS[3000:], batch_size, 32, seed=2) if val else None
    result = train(model, lm_loss, data, cfg, tmp_path / name, save_weights=save_weights,
                   load_weights=load_weights, val_data=val_data, resume=resume,
                   should_stop=should_stop, progress=False, echo=lambda m: None)
    return model, result


def test_loss_decreases_in_a_few_dozen_steps(tmp_path):
    cfg = TrainConfig(steps=40, lr=3e-3, min_lr=3e-4, warmup=5, eval_every=20, eval_batches=4,
                      log_every=1)
    _, result = run(tmp_path, "run", cfg)
    first = np.mean([v for _, v in result.losses[:3]])
    last = np.mean([v for _, v in result.losses[-3:]])
    assert first > 5.0  # about ln(257) at the start
    assert last < first - 2.0, (first, last)
    assert result.val_losses[-1][1] < result.val_losses[0][1]
    # log, plot and both checkpoints are there
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert any("val_loss" in r for r in records)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    state = json.loads((tmp_path / "run" / "last" / STATE_FILE).read_text())
    assert state["step"] == 40
    assert (tmp_path / "run" / "last" / OPTIMIZER_FILE).is_file()
    assert (tmp_path / "run" / "best" / ckpt.WEIGHTS_FILE).is_file()


def test_checkpoints_record_the_compute_setup_and_resume_names_a_change(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-3, warmup=0, eval_every=0, log_every=1)
    run(tmp_path, "c", cfg, val=False, should_stop=lambda step: step == 2)
    state_path = tmp_path / "c" / "last" / STATE_FILE
    state = json.loads(state_path.read_text())
    setup = state["compute"]
    assert setup["device"] == str(mx.default_device())
    assert setup["model_ops"] in ("fused", "arithmetic")
    if mx.default_device() == mx.cpu:
        assert setup["blas"] and "blas_kernels" in setup
    said = []

    def resume() -> None:
        train(fresh_model(), lm_loss, TokenBatches(TOKENS[:3000], 8, 32, seed=1), cfg,
              tmp_path / "c", save_weights=save_weights, load_weights=load_weights,
              resume=True, progress=False, echo=said.append)

    resume()  # same machine, same setup: nothing to say
    assert not [m for m in said if m.startswith("note:")]
    state["step"] = 2
    state["compute"] = {**setup, "blas_kernels": "Prescott"}
    state_path.write_text(json.dumps(state))
    said.clear()
    resume()
    notes = [m for m in said if m.startswith("note:")]
    assert len(notes) == 1 and f"blas_kernels Prescott -> {setup.get('blas_kernels')}" in notes[0]
    # a key this setup does not have (a CPU checkpoint resumed on a GPU, say) is named too
    state["compute"] = {**setup, "accelerator": "none"}
    state_path.write_text(json.dumps(state))
    said.clear()
    resume()
    assert any("accelerator none -> None" in m for m in said)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    # Dropout on: the per-step RNG must be restored too, not only weights and data position.
    cfg = TrainConfig(steps=16, lr=3e-3, warmup=3, eval_every=5, eval_batches=2, log_every=1)
    straight, r_straight = run(tmp_path, "a", cfg, dropout=0.1)
    _, r_first = run(tmp_path, "b", cfg, dropout=0.1, should_stop=lambda step: step == 7)
    assert r_first.interrupted and r_first.step == 7
    resumed, r_rest = run(tmp_path, "b", cfg, dropout=0.1, resume=True)
    losses = r_first.losses + r_rest.losses
    assert [s for s, _ in losses] == list(range(1, 17))
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in r_straight.losses],
                               rtol=0, atol=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(straight.parameters()),
                              tree_flatten(resumed.parameters()), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-6, err_msg=k)
    # the log of the resumed run reads like one run
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text()
             .splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 17))


class Halves:
    """Global batch i of ``full`` split in two micro-batches (2i, 2i+1)."""

    def __init__(self, full: TokenBatches):
        self.full = full

    def batch(self, index: int):
        x, y = self.full.batch(index // 2)
        h = x.shape[0] // 2
        part = slice(0, h) if index % 2 == 0 else slice(h, None)
        return x[part], y[part]


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    data = TokenBatches(TOKENS, 8, 32, seed=3)
    results = {}
    for accum, source in ((1, data), (2, Halves(data))):
        model = fresh_model()
        cfg = TrainConfig(steps=3, lr=1e-3, warmup=0, grad_accum=accum, eval_every=0,
                          log_every=1)
        r = train(model, lm_loss, source, cfg, tmp_path / f"acc{accum}",
                  save_weights=save_weights, load_weights=load_weights, progress=False,
                  echo=lambda m: None)
        results[accum] = (r, dict(tree_flatten(model.parameters())))
    (r1, p1), (r2, p2) = results[1], results[2]
    np.testing.assert_allclose([v for _, v in r1.losses], [v for _, v in r2.losses],
                               rtol=0, atol=1e-5)
    assert r1.tokens == r2.tokens == 3 * 8 * 32
    for k in p1:
        np.testing.assert_allclose(np.array(p1[k]), np.array(p2[k]), rtol=0, atol=1e-5,
                                   err_msg=k)


@pytest.mark.parametrize("native", ["0", "1"], ids=["mlx-streams", "native-workers"])
@pytest.mark.parametrize("streams,accum", [(2, 1), (3, 2)])
def test_rows_split_over_cpu_streams_train_like_one_stream(tmp_path, monkeypatch, streams, accum,
                                                          native):
    """mlxgpt/cpu/parallel.py: the batch's rows split over CPU streams (3 streams: rows of 3, 3
    and 2) reach the losses, weights and validation loss of one stream, within 1e-5; the same
    for the native pass's worker threads."""
    monkeypatch.setenv(NATIVE_ENV, native)
    results = {}
    for n in (1, streams):
        monkeypatch.setenv(parallel.STREAMS_ENV, str(n))
        model = fresh_model()
        data = TokenBatches(TOKENS, 8, 32, seed=3)
        cfg = TrainConfig(steps=3, lr=1e-3, warmup=0, grad_accum=accum, eval_every=3,
                          log_every=1)
        r = train(model, lm_loss, data, cfg, tmp_path / f"s{n}", save_weights=save_weights,
                  load_weights=load_weights, val_data=TokenBatches(TOKENS[3000:], 8, 32, seed=2),
                  progress=False, echo=lambda m: None)
        results[n] = (r, dict(tree_flatten(model.parameters())))
    (r1, p1), (rn, pn) = results[1], results[streams]
    np.testing.assert_allclose([v for _, v in r1.losses], [v for _, v in rn.losses],
                               rtol=0, atol=1e-5)
    assert r1.best_val_loss == pytest.approx(rn.best_val_loss, abs=1e-5)
    for k in p1:
        np.testing.assert_allclose(np.array(p1[k]), np.array(pn[k]), rtol=0, atol=1e-5,
                                   err_msg=k)


@pytest.mark.parametrize("native", ["0", "1"], ids=["mlx-streams", "native-workers"])
def test_masked_loss_split_over_streams_weights_rows_by_their_tokens(monkeypatch, native):
    """Rows with different numbers of counted tokens: the streams' (or native workers') parts
    are token-weighted, so the loss, gradient norm and gradients are the whole batch's. Plain
    SGD with lr 1 makes the update the (clipped) gradient itself: compared within 1e-6
    (gradients are ~3e-2). AdamW would magnify rounding in gradients near its eps to
    differences up to lr."""
    monkeypatch.setenv(NATIVE_ENV, native)
    rng = np.random.default_rng(0)
    x, y = mx.array(rng.integers(0, 64, size=(4, 32))), mx.array(rng.integers(0, 64, size=(4, 32)))
    mask = mx.array((np.arange(32)[None, :] < np.array([[32], [3], [20], [1]])).astype(np.float32))
    out = {}
    for n in (1, 2):
        monkeypatch.setenv(parallel.STREAMS_ENV, str(n))
        model = fresh_model()
        before = dict(tree_flatten(model.parameters()))
        cfg = TrainConfig(steps=10, warmup=0)
        stepper = Stepper(model, lm_loss, optim.SGD(learning_rate=1.0), cfg, world())
        if native == "1":
            assert stepper.native.net.workers == n and not stepper.streams
        else:
            assert len(stepper.streams) == (n if n > 1 else 0)
        loss, count, norm = stepper.step([(x, y, mask)])
        after = dict(tree_flatten(model.parameters()))
        out[n] = (loss.item(), count.item(), norm.item(),
                  {k: np.array(before[k] - after[k]) for k in after})
    assert out[1][1] == out[2][1] == 32 + 3 + 20 + 1
    assert out[1][0] == pytest.approx(out[2][0], abs=1e-6)
    assert out[1][2] == pytest.approx(out[2][2], rel=1e-5)
    assert max(np.abs(g).max() for g in out[1][3].values()) > 1e-3  # the update is not empty
    for k, g in out[1][3].items():
        np.testing.assert_allclose(g, out[2][3][k], rtol=0, atol=1e-6, err_msg=k)


def test_split_rows_cuts_near_equal_parts():
    batch = (mx.arange(7 * 2).reshape(7, 2), mx.arange(7))
    parts = parallel.split_rows(batch, 3)
    assert [p[0].shape[0] for p in parts] == [2, 2, 3]
    assert mx.array_equal(mx.concatenate([p[1] for p in parts]), batch[1])
    assert len(parallel.split_rows(batch, 10)) == 7  # never an empty part


def test_lr_schedule_warmup_then_cosine_to_min():
    sched = lr_schedule(TrainConfig(steps=110, lr=1e-3, min_lr=1e-4, warmup=10))
    lrs = [sched(mx.array(s)).item() for s in range(110)]
    assert lrs[0] == pytest.approx(1e-3 / 11)  # warmup ramps linearly
    assert lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # peak, then cosine down
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_no_weight_decay_on_biases_and_norms():
    model = fresh_model()
    opt = make_optimizer(TrainConfig(weight_decay=0.5))
    no_decay, decay = opt.optimizers
    assert no_decay.weight_decay == 0.0 and decay.weight_decay == 0.5
    names = [k for k, v in tree_flatten(model.parameters())]
    routed = {k: opt.filters[0](k, v) for k, v in tree_flatten(model.parameters())}
    assert routed["h.0.ln_1.weight"] and routed["h.0.attn.c_attn.bias"]
    assert not routed["h.0.attn.c_attn.weight"] and not routed["wte.weight"]
    assert len(names) == len(routed)


def test_resume_refuses_a_missing_or_corrupt_checkpoint(tmp_path):
    cfg = TrainConfig(steps=4, eval_every=0, log_every=1)
    with pytest.raises(MlxgptError, match="no checkpoint"):
        run(tmp_path, "none", cfg, resume=True)
    run(tmp_path, "ok", cfg, val=False)
    (tmp_path / "ok" / "last" / STATE_FILE).write_text("{not json")
    with pytest.raises(MlxgptError, match="corrupt"):
        run(tmp_path, "ok", TrainConfig(steps=8, eval_every=0), resume=True, val=False)


def test_all_sum_tree_packs_the_tree_into_one_sum(monkeypatch):
    """Several ranks' trees go through ONE all_sum of a flat float32 buffer and come back with
    every shape, dtype and position as they were (two ranks simulated: the sum doubles)."""

    class TwoRanks:
        def size(self):
            return 2

    calls = []

    def all_sum(x, group=None):
        calls.append(x.shape)
        return x * 2

    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    tree = {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3),
            "b": [mx.array([1.5, -2.0], mx.float16), mx.array(7.0)]}
    out = all_sum_tree(tree, TwoRanks())
    assert calls == [(6 + 2 + 1,)]  # one call, one buffer
    assert out["a"].shape == (2, 3) and out["b"][0].dtype == mx.float16 and out["b"][1].ndim == 0
    assert out["a"].tolist() == [[0, 2, 4], [6, 8, 10]] and out["b"][0].tolist() == [3, -4]
    assert out["b"][1].item() == 14
    assert all_sum_tree(tree, world()) is tree  # one process: nothing to sum


# --------------------------------------------------------------------------- parity


def test_one_step_matches_pytorch(tmp_path):
    """llm.c-style check: loss, every gradient and the AdamW update against transformers'
    GPT2LMHeadModel + torch.optim.AdamW on the same weights and batch.

    Tolerances: loss 1e-5, gradients 2e-5 x the tensor's largest gradient, updated weights
    5e-6 absolute (an update is up to lr = 1e-3; Adam's m / sqrt(v) magnifies rounding in
    near-zero gradients). MLX's CPU path uses arithmetic-only exp and tanh (mlxgpt/ops.py,
    ~1e-6 relative); the rest is float32 rounding.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from _hf_helpers import hf_name, is_conv1d, random_hf_model, save_hf_checkpoint

    from mlxgpt.checkpoints.hf import load_hf

    hf = random_hf_model({"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": 101,
                          "n_positions": 32})
    folder = save_hf_checkpoint(hf, tmp_path / "hf")
    model, _ = load_hf(folder)
    model.train()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 101, size=(4, 33))
    x, y = rows[:, :-1], rows[:, 1:]

    # PyTorch reference
    hf.train()
    out = hf(torch.from_numpy(x), labels=None)
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 101),
                                                 torch.from_numpy(y).reshape(-1))
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().numpy().copy() for n, p in hf.named_parameters()}

    # MLX
    (loss, n), grads = nn.value_and_grad(model, lm_loss)(model, mx.array(x), mx.array(y))
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
    assert n.item() == 4 * 32
    for k, g in tree_flatten(grads):
        ref = ref_grads[hf_name(k)]
        g = np.array(g)
        if is_conv1d(k):
            g = g.T
        scale = max(np.abs(ref).max(), 1e-8)
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * scale, err_msg=k)

    # one AdamW update with clipping and decay on 2-D weights only
    cfg = TrainConfig(steps=10, lr=1e-3, min_lr=1e-3, warmup=0, weight_decay=0.1, beta2=0.99,
                      grad_clip=0.5)
    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, lm_loss, opt, cfg, world())
    mx.eval(stepper.step([(mx.array(x), mx.array(y))]), stepper.state)
    params = list(hf.parameters())
    topt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                               "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2],
                               "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    topt.step()
    hf_params = dict(hf.named_parameters())
    for k, v in tree_flatten(model.parameters()):
        v = np.array(v)
        if is_conv1d(k):
            v = v.T
        ref = hf_params[hf_name(k)].detach().numpy()
        np.testing.assert_allclose(v, ref, rtol=0, atol=5e-6, err_msg=k)


def test_fast_cpu_math_matches_exact_functions():
    from mlxgpt.cpu import fastmath as ops

    x = mx.random.normal((64, 300), key=mx.random.key(0)) * 4
    exp_err = (mx.abs(ops.exp(x) - mx.exp(x)) / mx.exp(x)).max().item()
    assert exp_err < 2e-6
    assert mx.abs(ops.tanh(x) - mx.tanh(x)).max().item() < 5e-7
    assert mx.abs(ops.softmax(x) - mx.softmax(x, axis=-1)).max().item() < 1e-6
    g = mx.random.normal(x.shape, key=mx.random.key(2))
    for fast, exact in ((ops.softmax, lambda a: mx.softmax(a, axis=-1)),
                        (ops.gelu_tanh, lambda a: 0.5 * a * (1 + mx.tanh(
                            math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))))):
        ga = mx.grad(lambda a, f=fast: (f(a) * g).sum())(x)
        gb = mx.grad(lambda a, f=exact: (f(a) * g).sum())(x)
        assert mx.abs(ga - gb).max().item() < 2e-5 * max(1.0, mx.abs(gb).max().item())


@pytest.mark.parametrize("kernels", ["arithmetic", "fused"])
def test_chunked_cross_entropy_matches_the_full_logits(kernels, monkeypatch):
    """The loss's cross-entropy, made a few rows of logits at a time with either backend's exp,
    equals MLX's cross-entropy of the full logits: values 1e-5, gradients of h and w 2e-5."""
    from mlxgpt.core.backend import ARITHMETIC, FUSED
    from mlxgpt.training import loss

    exp = (ARITHMETIC if kernels == "arithmetic" else FUSED).exp
    monkeypatch.setattr(loss, "CE_ELEMENTS", 300 * 7)  # 7 rows a chunk: 10 chunks, one ragged
    ce = loss.linear_cross_entropy.__wrapped__(exp)  # a fresh function (the cache is per exp)
    h = mx.random.normal((64, 16), key=mx.random.key(3))
    w = mx.random.normal((300, 16), key=mx.random.key(4))
    y = mx.random.randint(0, 300, (64,), key=mx.random.key(5))
    c = mx.random.normal((64,), key=mx.random.key(6))

    def full(h, w):
        return (nn.losses.cross_entropy(h @ w.T, y) * c).sum()

    def chunked(h, w):
        return (ce(h, w, y) * c).sum()

    assert abs(chunked(h, w).item() - full(h, w).item()) < 1e-5 * 64
    for got, want in zip(mx.grad(chunked, argnums=(0, 1))(h, w),
                         mx.grad(full, argnums=(0, 1))(h, w), strict=True):
        assert mx.abs(got - want).max().item() < 2e-5 * max(1.0, mx.abs(want).max().item())
