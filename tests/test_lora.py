"""LoRA and DoRA layers on GPT-2: identity at init, fusing, QLoRA, adapter files, parameter
counts, the default targets, refusals. (Llama, and DoRA against PEFT: test_llama_finetune.py.)"""

import json

import conftest
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxgpt import GPT, GPTConfig
from mlxgpt.checkpoints.adapters.lora import (
    ADAPTER_CONFIG,
    DoRALinear,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    base_identity,
    count_parameters,
    fuse,
    load_adapter,
    lora_modules,
    parse_layers,
    parse_targets,
    save_adapter,
)
from mlxgpt.checkpoints.quantize import dense_weight
from mlxgpt.errors import MlxgptError

SHAPE = {"vocab_size": 97, "n_positions": 32, "n_embd": 64}
TINY = GPTConfig(**{**conftest.TINY, **SHAPE})
ALL = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


@pytest.fixture
def base(tiny_model):
    """A LoRA base: conftest's tiny model at SHAPE, optionally cast or 4-bit quantized."""

    def make(seed=0, quantized=False, dtype=None, **config):
        model = tiny_model(seed, **{**SHAPE, **config})
        if dtype is not None:
            model.set_dtype(dtype)
        if quantized:
            nn.quantize(model, group_size=32, bits=4)
        mx.eval(model.parameters())
        return model

    return make


def tokens(seed=1, b=2, t=16):
    return mx.array(np.random.default_rng(seed).integers(0, TINY.vocab_size, (b, t)), mx.int32)


def randomize_b(model, seed=2):
    """Give every LoRA B non-zero values, as training would."""
    rng = np.random.default_rng(seed)
    for _, m in lora_modules(model):
        m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
    mx.eval(model.parameters())


@pytest.mark.parametrize("quantized", [False, True])
def test_fresh_adapter_leaves_logits_unchanged(quantized, base):
    model, x = base(quantized=quantized), tokens()
    before = model(x)
    apply_lora(model, LoRAConfig(rank=4, targets=ALL))
    assert len(lora_modules(model)) == 4 * TINY.n_layer
    after = model(x)
    # B = 0, so the update is exactly zero and the logits are bit-identical.
    assert mx.array_equal(before, after)


def test_only_lora_matrices_train_and_base_stays_quantized(base):
    model = base(quantized=True)
    apply_lora(model, LoRAConfig(rank=4, targets=("c_attn", "c_fc")))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith((".lora_a", ".lora_b")) for k in names)
    assert len(names) == 2 * 2 * TINY.n_layer
    for _, m in lora_modules(model):
        assert isinstance(m.linear, nn.QuantizedLinear)
    x = tokens()

    def loss(model):
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    g = dict(tree_flatten(grads))
    assert set(g) == set(names)
    # B starts at zero, so only B gets a gradient at the first step; it must be non-zero.
    assert all(float(mx.abs(v).max()) > 0 for k, v in g.items() if k.endswith("lora_b"))


def test_scale_is_alpha_over_rank():
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=5.0)
    assert layer.scale == 2.5
    layer.lora_b = mx.ones((2, 6))
    x = mx.ones((1, 8))
    want = layer.linear(x) + 2.5 * (x @ layer.lora_a) @ layer.lora_b
    assert mx.allclose(layer(x), want, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, mx.float16, mx.bfloat16])
def test_fused_equals_base_plus_adapter_fp(dtype, base):
    model, x = base(dtype=dtype), tokens()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    randomize_b(model)
    with_adapter = model(x).astype(mx.float32)
    # The fused weight is W + (alpha / r) * (A B)^T, checked independently in numpy.
    layer = dict(lora_modules(model))["h.0.attn.c_attn"]
    want_w = np.array(layer.linear.weight.astype(mx.float32)) + 2.0 * (
        np.array(layer.lora_a) @ np.array(layer.lora_b)
    ).T
    fuse(model)
    assert not lora_modules(model)
    fused_w = np.array(model.h[0].attn.c_attn.weight.astype(mx.float32))
    tol = 1e-6 if dtype is None else 1e-2
    np.testing.assert_allclose(fused_w, want_w, atol=tol)
    # Logits: fp32 agrees to 1e-4; half precision to the rounding of one fused weight.
    tol = 1e-4 if dtype is None else 0.1
    np.testing.assert_allclose(np.array(model(x).astype(mx.float32)),
                               np.array(with_adapter), atol=tol)


def test_fused_equals_base_plus_adapter_quantized(base):
    model, x = base(quantized=True), tokens()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    randomize_b(model)
    with_adapter = model(x)
    fused = fuse(model)  # default: dequantize, so the fused model is exact
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                   for _, m in fused.named_modules())
    # Same function, computed as one dense matmul instead of quantized matmul + low rank.
    np.testing.assert_allclose(np.array(fused(x)), np.array(with_adapter), atol=1e-4)


def test_fuse_requantize_keeps_quantization(base):
    model, x = base(quantized=True), tokens()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("c_attn",)))
    randomize_b(model)
    with_adapter = model(x)
    # What the re-quantized layer should hold: quantize(dequantize(W) + delta).
    layer = dict(lora_modules(model))["h.0.attn.c_attn"]
    expect = nn.QuantizedLinear.from_linear(layer.fused(), 32, 4)
    fuse(model, requantize=True)
    got = model.h[0].attn.c_attn
    assert isinstance(got, nn.QuantizedLinear) and got.bits == 4 and got.group_size == 32
    assert mx.array_equal(got.weight, expect.weight)
    assert isinstance(model.h[0].mlp.c_fc, nn.QuantizedLinear)  # untouched layers stay
    # Re-quantizing adds 4-bit rounding of the update: close, not equal.
    err = float(mx.abs(model(x) - with_adapter).max())
    assert 0 < err < 0.5


def test_adapter_save_load_round_trip(tmp_path, base):
    model, x = base(), tokens()
    cfg = LoRAConfig(rank=4, alpha=4, targets=("c_attn", "mlp.c_proj"), layers=(1,),
                     base=base_identity(TINY, "base-model"))
    apply_lora(model, cfg)
    randomize_b(model)
    want = model(x)
    save_adapter(model, tmp_path / "ad", cfg)
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 4 and meta["layers"] == [1]
    assert meta["targets"] == ["c_attn", "mlp.c_proj"]
    assert meta["base_model"]["config"]["n_embd"] == 64
    # Layer 1 is the last of 2, so mlx-lm's keys are written too.
    assert meta["num_layers"] == 1
    assert meta["lora_parameters"]["keys"] == ["attn.c_attn", "mlp.c_proj"]

    fresh = base()
    load_adapter(fresh, tmp_path / "ad")
    assert len(lora_modules(fresh)) == 2
    assert mx.array_equal(fresh(x), want)


def test_adapter_for_another_model_shape_is_refused(tmp_path, base):
    model = base()
    cfg = LoRAConfig(rank=4, base=base_identity(TINY))
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "ad", cfg)
    with pytest.raises(MlxgptError, match=r"does not fit this model: n_embd=64 \(model has 128\)"):
        load_adapter(base(n_embd=128), tmp_path / "ad")
    # Without a recorded identity the tensor shapes still catch it.
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    meta["base_model"] = {}
    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(MlxgptError, match="does not fit this model"):
        load_adapter(base(n_embd=128), tmp_path / "ad")


def test_adapter_folder_errors(tmp_path, base):
    with pytest.raises(MlxgptError, match="adapter folder not found"):
        load_adapter(base(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlxgptError, match="not an adapter folder"):
        load_adapter(base(), tmp_path / "empty")


def test_rank_larger_than_layer_is_refused(base):
    with pytest.raises(MlxgptError, match=r"--rank 65 is larger than layer h.0.attn.c_attn "
                                          r"\(64 -> 192\) allows; use a rank <= 64"):
        apply_lora(base(), LoRAConfig(rank=65))


def test_target_and_layer_parsing():
    assert parse_targets("c_fc,attn.c_attn") == ("c_attn", "c_fc")
    assert parse_targets("all") == ALL
    with pytest.raises(MlxgptError, match="unknown LoRA target 'q_proj'"):
        parse_targets("q_proj")
    assert parse_layers("all", 12) == tuple(range(12))
    assert parse_layers(None, 12) == tuple(range(12))  # the default: the last 16 blocks
    assert parse_layers(None, 20) == tuple(range(4, 20))
    assert parse_layers("0,2,8-10", 12) == (0, 2, 8, 9, 10)
    assert parse_layers("last:3", 12) == (9, 10, 11)
    assert parse_layers("-1", 12) == (11,)
    with pytest.raises(MlxgptError, match="must be in 0..11"):
        parse_layers("12", 12)
    with pytest.raises(MlxgptError, match="not a layer list"):
        parse_layers("x", 12)


def test_default_adapts_every_linear_layer_of_the_last_16_blocks():
    """mlx-lm's default: with c_attn alone (the old default) a two-label task stayed at 50 %."""
    model = GPT(GPTConfig(vocab_size=97, n_positions=16, n_embd=32, n_layer=20, n_head=2))
    cfg = LoRAConfig()
    apply_lora(model, cfg)
    assert cfg.targets == ALL and cfg.layers == tuple(range(4, 20))
    assert {p for p, _ in lora_modules(model)} == {
        f"h.{i}.{path}" for i in range(4, 20)
        for path in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize("quantized", [False, True])
def test_dora_starts_as_the_base_and_fuses_exactly(quantized, base):
    model, x = base(quantized=quantized), tokens()
    before = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dora=True))
    layers = lora_modules(model)
    assert layers and all(isinstance(m, DoRALinear) for _, m in layers)
    # m starts at the base's row norms and B at zero: the same function (up to rounding).
    np.testing.assert_allclose(np.array(model(x)), np.array(before), atol=1e-5)
    names = {k.rsplit(".", 1)[1] for k, _ in tree_flatten(model.trainable_parameters())}
    assert names == {"lora_a", "lora_b", "m"}
    randomize_b(model)
    for _, m in layers:
        m.m = m.m * 1.1
    with_adapter = model(x)
    # GPT-2's biases are added after the magnitude scaling, as mlx-lm and PEFT do.
    layer = dict(layers)["h.0.attn.c_attn"]
    w = np.array(dense_weight(layer.linear).astype(mx.float32))
    adapted = w + 2.0 * (np.array(layer.lora_a) @ np.array(layer.lora_b)).T
    h = np.array(mx.random.normal((3, 64), key=mx.random.key(5)))
    want = (np.array(layer.m) / np.linalg.norm(adapted, axis=1)) * (h @ adapted.T) + np.array(
        layer.linear.bias)
    np.testing.assert_allclose(np.array(layer(mx.array(h))), want, atol=1e-4)
    fuse(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(np.array(model(x)), np.array(with_adapter), atol=1e-4)


def test_gpt2_124m_rank8_c_attn_trainable_count():
    # Parameters are lazy: nothing of the 124M model is materialized here.
    model = GPT(GPTConfig())
    _, base_total = count_parameters(model)
    assert base_total == 124_439_808
    apply_lora(model, LoRAConfig(rank=8, targets=("c_attn",)))
    trainable, total = count_parameters(model)
    assert trainable == 12 * 8 * (768 + 3 * 768) == 294_912  # about 0.3M
    assert trainable / total < 0.003


def test_quantized_count_uses_logical_sizes(base):
    fp, q = base(), base(quantized=True)
    assert count_parameters(fp)[1] == count_parameters(q)[1]


def test_dense_weight_of_quantized_layer_is_close():
    lin = nn.Linear(64, 32)
    q = nn.QuantizedLinear.from_linear(lin, 32, 8)
    assert float(mx.abs(dense_weight(q) - lin.weight).max()) < 0.01


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_lm_loads_the_adapter_with_the_same_logits(tmp_path, base, dora):
    """Adapters are written in mlx-lm's layout: mlx_lm.load(model, adapter_path=...) agrees."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    pytest.importorskip("transformers")
    from mlxgpt.checkpoints.folder import save_model
    from mlxgpt.tokenizers import gpt2_tokenizer

    model = base(vocab_size=50257)  # GPT-2's vocabulary
    cfg = model.config
    save_model(model, tmp_path / "base", gpt2_tokenizer())
    lcfg = LoRAConfig(rank=4, alpha=8, targets=("c_attn", "c_fc"), layers=(1,),
                      base=base_identity(cfg), dora=dora)
    apply_lora(model, lcfg)
    randomize_b(model)
    for _, m in lora_modules(model) if dora else ():
        m.m = m.m * 1.1
    save_adapter(model, tmp_path / "ad", lcfg)
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert meta["fine_tune_type"] == ("dora" if dora else "lora")
    theirs, _ = mlx_lm_utils.load(str(tmp_path / "base"), adapter_path=str(tmp_path / "ad"))
    x = tokens()
    np.testing.assert_allclose(np.array(theirs(x)), np.array(model(x)), atol=1e-4)


def test_reads_adapters_written_by_mlx_lm(tmp_path, base):
    model, x = base(), tokens()
    cfg = LoRAConfig(rank=4, alpha=8, targets=("c_attn",), layers=(1,))
    apply_lora(model, cfg)
    randomize_b(model)
    save_adapter(model, tmp_path / "ad", cfg)
    # The config mlx_lm.lora writes: no mlxgpt keys, scale instead of alpha, last-N layers.
    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 1, "model": "somewhere",
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["attn.c_attn"]},
    }))
    fresh = load_adapter(base(), tmp_path / "ad")
    assert mx.array_equal(fresh(x), model(x))


@pytest.mark.parametrize("kind, num_layers, keys", [
    ("lora", 1, None),  # mlx-lm's default keys: every linear layer of the last block
    ("dora", 2, ["attn.c_attn", "mlp.c_proj"]),
])
def test_reads_an_adapter_trained_by_mlx_lm(tmp_path, base, kind, num_layers, keys):
    """An adapter made entirely by mlx-lm's own code (``mlx_lm lora --train``: its loader,
    ``linear_to_lora_layers``, trainer and files) on a folder mlxgpt wrote: mlxgpt's logits
    with it equal mlx-lm's."""
    import types

    mlx_lm_lora = pytest.importorskip("mlx_lm.lora")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    pytest.importorskip("transformers")
    import mlxgpt
    from mlxgpt.checkpoints.folder import save_model
    from mlxgpt.tokenizers import gpt2_tokenizer

    save_model(base(vocab_size=50257), tmp_path / "base", gpt2_tokenizer())
    data = tmp_path / "data"
    data.mkdir()
    lines = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today",
             "we like to read books", "rain falls on the roof", "birds sing in the tree"]
    for name, texts in (("train", lines), ("valid", lines[:2])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                    for t in texts))
    params = {"rank": 4, "dropout": 0.0, "scale": 2.0}
    if keys is not None:
        params["keys"] = keys
    args = types.SimpleNamespace(**{
        **mlx_lm_lora.CONFIG_DEFAULTS, "model": str(tmp_path / "base"), "train": True,
        "data": str(data), "fine_tune_type": kind, "num_layers": num_layers, "batch_size": 2,
        "iters": 6, "val_batches": 1, "learning_rate": 1e-2, "steps_per_report": 3,
        "adapter_path": str(tmp_path / "ad"), "lora_parameters": params})
    mlx_lm_lora.run(args)
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert meta["fine_tune_type"] == kind and "rank" not in meta  # mlx-lm's config, not ours

    theirs, _ = mlx_lm_utils.load(str(tmp_path / "base"), adapter_path=str(tmp_path / "ad"))
    ours, _ = mlxgpt.load(tmp_path / "base", adapter=tmp_path / "ad")
    plain, _ = mlxgpt.load(tmp_path / "base")
    x = mx.array(np.random.default_rng(3).integers(0, 50257, (2, 16)), mx.int32)
    expect = np.array(theirs(x))
    np.testing.assert_allclose(np.array(ours(x)), expect, atol=1e-4)
    assert np.abs(np.array(plain(x)) - expect).max() > 1e-3  # training moved the adapter
    adapted = {path for path, _ in lora_modules(ours)}
    layers = [f"h.{i}" for i in range(2 - num_layers, 2)]
    names = keys or ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert adapted == {f"{layer}.{n}" for layer in layers for n in names}
