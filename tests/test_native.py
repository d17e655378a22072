"""The native training pass (mlxgpt/cpu/gpt_train.c): gradients against the reference, where it
applies, and what happens where it cannot be built.

Tolerances (float32 throughout): loss 1e-5 relative; every gradient 2e-5 x that tensor's
largest gradient (as tests/test_train.py's MLX step against PyTorch). The C code's exp and tanh
are polynomial (~1e-7 relative); the rest is float32 rounding in another order.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_tiny_model
from mlx.utils import tree_flatten

from mlxgpt.cpu import native
from mlxgpt.errors import MlxgptError
from mlxgpt.training.config import TrainConfig
from mlxgpt.training.distributed import world
from mlxgpt.training.loss import lm_loss
from mlxgpt.training.native_pass import NATIVE_ENV, native_unsupported
from mlxgpt.training.optim import make_optimizer
from mlxgpt.training.step import Stepper


def host_params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("config", [
    {},
    {"tie_word_embeddings": False},
    {"activation_function": "gelu", "n_inner": 40},
], ids=["tied-tanh", "untied", "erf-gelu-n_inner"])
@pytest.mark.parametrize("workers", [1, 2])
def test_gradients_match_transformers(tmp_path, config, workers):
    """Loss and every gradient of the native pass against transformers' GPT2LMHeadModel on the
    same weights and batch (odd sizes: 3 heads of 16, 5 rows split over the workers)."""
    torch = pytest.importorskip("torch")
    from _hf_helpers import hf_name, is_conv1d, random_hf_model, save_hf_checkpoint

    from mlxgpt.checkpoints.hf import load_hf

    V = 101
    hf = random_hf_model({"n_layer": 2, "n_embd": 48, "n_head": 3, "vocab_size": V,
                          "n_positions": 32, **config})
    model, _ = load_hf(save_hf_checkpoint(hf, tmp_path / "hf"))
    rows = np.random.default_rng(0).integers(0, V, size=(5, 30))
    x, y = rows[:, :-1].astype(np.int32), rows[:, 1:].astype(np.int32)

    out = hf(torch.from_numpy(x.astype(np.int64)))
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V),
                                                 torch.from_numpy(y.astype(np.int64)).reshape(-1))
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().numpy() for n, p in hf.named_parameters()}

    net = native.NativeGPT(model.config, workers)
    loss_sum, count, flat = net.run(host_params(model), [(x, y)])
    assert count == x.size
    assert loss_sum / count == pytest.approx(ref_loss.item(), rel=1e-5)
    grads = net.unflatten(flat)
    assert set(grads) == {k for k, _ in tree_flatten(model.parameters())}
    for k, g in grads.items():
        ref = ref_grads[hf_name(k)]
        g = g / count
        if is_conv1d(k):
            g = g.T
        scale = max(np.abs(ref).max(), 1e-8)
        np.testing.assert_allclose(g, ref, rtol=0, atol=2e-5 * scale, err_msg=k)


def test_weighted_positions_and_accumulation_match_mlx():
    """A mask (positions counted or not) and two micro-batches accumulated in one call give
    MLX's token-weighted loss and gradient sums; the forward-only call gives the same loss."""
    model = make_tiny_model(3)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(2):
        rows = rng.integers(0, 257, size=(3, 17)).astype(np.int32)
        mask = (rng.random((3, 16)) < 0.7).astype(np.float32)
        batches.append((rows[:, :-1], rows[:, 1:], mask))

    def summed(m, x, y, w):
        loss, n = lm_loss(m, x, y, w)
        return loss * n

    ref_loss, ref = 0.0, None
    for b in batches:
        loss, g = nn.value_and_grad(model, summed)(model, *map(mx.array, b))
        ref_loss += loss.item()
        g = {k: np.array(v) for k, v in tree_flatten(g)}
        ref = g if ref is None else {k: ref[k] + g[k] for k in g}
    net = native.NativeGPT(model.config, 2)
    loss_sum, count, flat = net.run(host_params(model), batches)
    assert count == sum(b[2].sum() for b in batches)
    assert loss_sum == pytest.approx(ref_loss, rel=1e-5)
    for k, g in net.unflatten(flat).items():
        np.testing.assert_allclose(g, ref[k], rtol=0, atol=2e-5 * np.abs(ref[k]).max(),
                                   err_msg=k)
    fwd_loss, fwd_count, none = net.run(host_params(model), batches, grads=False)
    assert none is None and fwd_count == count
    assert fwd_loss == pytest.approx(loss_sum, rel=1e-6)


class _MaskedDropout:
    """Dropout with given masks, one per call in turn (not a module: the masks are no
    parameters)."""

    def __init__(self, masks: list, rate: float):
        self.masks, self.rate = masks, rate

    def __call__(self, x):
        return x * mx.array(self.masks.pop(0)) / (1.0 - self.rate)


def test_dropout_matches_mlx_with_the_same_masks():
    """With dropout, the native pass's loss and gradients equal MLX's autodiff through the same
    masks (dropout_mask gives them: embeddings, then each layer's attention and MLP outputs),
    whichever way the rows are split over workers; the masks drop about the rate asked for."""
    rate, seed, shape = 0.3, 1234, (5, 16, 32)
    model = make_tiny_model(7, dropout=rate)
    model.train()
    rows = np.random.default_rng(3).integers(0, 257, size=(5, 17)).astype(np.int32)
    x, y = rows[:, :-1], rows[:, 1:]
    masks = [native.dropout_mask(shape, seed, site, rate)
             for site in range(1 + 2 * model.config.n_layer)]
    assert abs(1 - np.mean(masks) - rate) < 0.02
    assert not np.array_equal(masks[0], native.dropout_mask(shape, seed + 1, 0, rate))
    order = list(masks)
    model.drop = _MaskedDropout(order, rate)
    for block in model.h:
        block.drop = model.drop

    def summed(m, x, y):
        loss, n = lm_loss(m, x, y)
        return loss * n

    loss, g = nn.value_and_grad(model, summed)(model, mx.array(x), mx.array(y))
    assert not order  # every mask used, in the native pass's site order
    ref = {k: np.array(v) for k, v in tree_flatten(g)}
    for workers in (1, 2):
        net = native.NativeGPT(model.config, workers)
        loss_sum, _, flat = net.run(host_params(model), [(x, y)], dropout=rate, seed=seed)
        assert loss_sum == pytest.approx(loss.item(), rel=1e-5)
        for k, v in net.unflatten(flat).items():
            np.testing.assert_allclose(v, ref[k], rtol=0, atol=2e-5 * np.abs(ref[k]).max(),
                                       err_msg=k)
    no_drop = native.NativeGPT(model.config, 1).run(host_params(model), [(x, y)])[0]
    assert abs(no_drop - loss_sum) > 1e-3 * abs(no_drop)  # the masks did something


def test_one_buffer_per_worker_whatever_the_batch_shapes():
    """Batches of varying length (fine-tuning pads each to its longest example) reuse each
    worker's buffer, grown to the largest piece: memory does not pile up, and the results are
    those of a fresh pass."""
    model = make_tiny_model(8)
    rng = np.random.default_rng(4)
    net = native.NativeGPT(model.config, 2)
    shapes = [(4, 40), (4, 12), (6, 30), (2, 50), (4, 12)]
    for b, t in shapes:
        rows = rng.integers(0, 257, size=(b, t + 1)).astype(np.int32)
        loss, _, flat = net.run(host_params(model), [(rows[:, :-1], rows[:, 1:])])
        fresh = native.NativeGPT(model.config, 2)
        loss2, _, flat2 = fresh.run(host_params(model), [(rows[:, :-1], rows[:, 1:])])
        assert loss == loss2
        np.testing.assert_array_equal(flat, flat2)
    assert len(net._work) == 2
    biggest = max(native.NativeGPT(model.config, 1).lib.gpt_workspace_floats(
        native.ctypes.byref(net.dims), (b + 1) // 2, t) for b, t in shapes)
    assert max(a.size for a in net._work.values()) == biggest


def test_token_ids_out_of_range_are_refused():
    model = make_tiny_model()
    net = native.NativeGPT(model.config, 1)
    x = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match="token ids"):
        net.run(host_params(model), [(x, x + 257)])


def _stepper(model, **cfg):
    cfg = TrainConfig(steps=10, lr=1e-3, min_lr=1e-3, warmup=0, **cfg)
    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    return Stepper(model, lm_loss, opt, cfg, world())


def test_training_steps_match_mlx_graph(monkeypatch):
    """Optimizer updates (two micro-batches each, clipping on) through the native pass and
    through MLX's graph from the same weights: the same losses and gradient norms over five
    steps (2e-5 relative), the same weights after the first (5e-6 absolute at lr 1e-3; later
    steps drift further as Adam's m / sqrt(v) magnifies rounding in near-zero gradients), and
    the same optimizer state (step count, learning rate, moments) after it. The
    key biases are left out of the weights: their gradient is zero but for rounding (softmax
    ignores a score added to every key), which Adam's first step turns into +-lr."""
    rng = np.random.default_rng(2)
    data = [[tuple(mx.array(a) for a in (r[:, :-1], r[:, 1:]))
             for r in rng.integers(0, 257, size=(2, 4, 33)).astype(np.int32)]
            for _ in range(5)]
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(NATIVE_ENV, setting)
        model = make_tiny_model(4)
        model.train()
        stepper = _stepper(model, grad_accum=2, grad_clip=0.5)
        assert (stepper.native is not None) == (setting == "1")
        losses, first = [], None
        for batches in data:
            loss, n, norm = stepper.step(batches)
            losses.append((loss.item(), n.item(), norm.item()))
            if first is None:
                first = {**host_params(model), **{f"opt.{k}": np.array(v) for k, v in
                                                  tree_flatten(stepper.opt.state)}}
        # the pass's buffers count in the peak memory a run reports (none without it)
        assert (stepper.host_bytes() > 0) == (setting == "1")
        runs[setting] = (losses, first)
    (native_losses, native_w), (graph_losses, graph_w) = runs["1"], runs["0"]
    np.testing.assert_allclose(native_losses, graph_losses, rtol=2e-5)
    assert set(native_w) == set(graph_w)  # the optimizer state (step, lr, m, v) as MLX keeps it
    C = 32
    for k in graph_w:
        a, b = native_w[k], graph_w[k]
        if k.endswith("c_attn.bias"):
            a, b = np.delete(a, np.s_[C:2 * C]), np.delete(b, np.s_[C:2 * C])
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-6, err_msg=k)


def test_where_the_native_pass_applies(monkeypatch, tiny_model):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    assert native_unsupported(tiny_model(), lm_loss) is None
    assert native_unsupported(tiny_model(dropout=0.1), lm_loss) is None
    assert "language-model loss" in native_unsupported(tiny_model(), lambda m, x, y: None)
    frozen = tiny_model()
    frozen.ln_f.freeze()
    assert "frozen" in native_unsupported(frozen, lm_loss)
    from mlxgpt.training.finetune import grad_checkpoint

    assert "grad-checkpoint" in native_unsupported(grad_checkpoint(tiny_model()), lm_loss)
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert native_unsupported(tiny_model(), lm_loss) == f"{NATIVE_ENV}=0"
    monkeypatch.setenv(NATIVE_ENV, "1")
    with pytest.raises(MlxgptError, match="frozen"):
        native_unsupported(frozen, lm_loss)
    monkeypatch.setenv(NATIVE_ENV, "yes")
    with pytest.raises(MlxgptError, match="must be 0 or 1"):
        native_unsupported(tiny_model(), lm_loss)


def test_no_compiler_falls_back_to_mlx(monkeypatch, tmp_path, tiny_model):
    """Without a working C compiler the native pass reports why, and training takes MLX's
    graph (nothing half-built is left in the cache)."""
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    monkeypatch.setenv("MLXGPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native.library_path.cache_clear()
    native._loaded.cache_clear()
    try:
        assert "could not build" in native.build_error()
        assert "could not build" in native_unsupported(tiny_model(), lm_loss)
        model = tiny_model()
        assert _stepper(model).native is None
        assert not [p for p in (tmp_path / "native").iterdir() if p.suffix == ".so"]
    finally:
        native.library_path.cache_clear()
        native._loaded.cache_clear()


def test_evaluation_through_the_native_forward_matches_mlx(monkeypatch):
    """Evaluator (validation, ``mlxgpt eval``) takes the native forward where it applies, a
    dropout model included (evaluation has none): the same mean loss and count as MLX's."""
    from mlxgpt.training.step import Evaluator

    rng = np.random.default_rng(5)
    batches = [tuple(mx.array(a) for a in (r[:, :-1], r[:, 1:]))
               for r in rng.integers(0, 257, size=(3, 5, 21)).astype(np.int32)]
    for config in ({}, {"dropout": 0.2}):
        model = make_tiny_model(6, **config)
        out = {}
        for setting in ("1", "0"):
            monkeypatch.setenv(NATIVE_ENV, setting)
            ev = Evaluator(model, lm_loss)
            assert (ev.native is not None) == (setting == "1")
            out[setting] = ev(batches)
        assert out["1"][1] == out["0"][1] == 3 * 5 * 20
        assert out["1"][0] == pytest.approx(out["0"][0], rel=1e-5)


def test_info_names_the_training_pass(cli_ok, monkeypatch):
    monkeypatch.delenv(NATIVE_ENV, raising=False)
    line = next(x for x in cli_ok("info").output.splitlines() if x.startswith("train pass"))
    assert "native C pass" in line and str(native.library_path()) in line
    monkeypatch.setenv(NATIVE_ENV, "0")
    line = next(x for x in cli_ok("info").output.splitlines() if x.startswith("train pass"))
    assert line.endswith(f"MLX's graph ({NATIVE_ENV}=0)")
