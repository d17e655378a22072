"""LoRA and DoRA adapters for a model's linear layers: apply, count, save, load and fuse.

A LoRA layer adds a trainable low-rank update to a frozen linear layer::

    y = W x + b + scale * (dropout(x) @ A) @ B        A: (in, r), B: (r, out), scale = alpha / r

``B`` starts at zero, so a fresh adapter leaves the model's outputs unchanged. The frozen layer
may be an ``nn.Linear`` (fp32/fp16/bf16) or an ``nn.QuantizedLinear`` (QLoRA: the base stays
quantized, only ``A`` and ``B`` are float). Dividing by the rank keeps the update's size roughly
independent of ``r``, so one learning rate works across ranks (as in the LoRA paper).

A DoRA layer (Liu et al. 2024, as mlx-lm's ``DoRALinear`` and PEFT's ``use_dora``) also learns
the length ``m`` of each output row of the weight, starting at the base's row norms::

    y = m / |W + scale (A B)^T| * (W x + scale * (dropout(x) @ A) @ B) + b

with the row norms ``|.|`` a constant for the backward pass (as the paper, mlx-lm and PEFT do).

What is adapted (:data:`TARGETS`, by family): GPT-2's ``c_attn``, ``attn.c_proj``, ``c_fc``,
``mlp.c_proj``; Llama's ``q/k/v/o_proj`` and ``gate/up/down_proj``. By default every one of them
in the last :data:`DEFAULT_LAYERS` blocks (mlx-lm's default; every block of a smaller model).

On disk an adapter is a folder with ``adapters.safetensors`` (keys ``{weight_prefix}{path}.lora_a``
/ ``lora_b`` / DoRA's ``m``: ``model.h.0.attn.c_attn.lora_a`` for GPT-2,
``model.layers.0.self_attn.q_proj.lora_a`` for Llama, mlx-lm's layout) and
``adapter_config.json`` (kind, rank, alpha, targets, layers and the base model's identity,
checked on load). When the adapted layers are the last N, the config also carries mlx-lm's keys,
so ``mlx_lm`` can load the adapter on the same model (or its Hugging Face export).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...core.model import Model, ModelConfig
from ...errors import MlxgptError
from ...modules import get_module, set_module
from ..files import atomic_save_safetensors, atomic_write_text, read_json
from ..folder import read_weights
from ..quantize import dense_weight, dequantize, linear_dims, logical_sizes

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "mlxgpt-lora"

# Per family: target name -> module path inside a block (the path is mlx-lm's key for it).
TARGETS: dict[str, dict[str, str]] = {
    "gpt2": {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
             "mlp.c_proj": "mlp.c_proj"},
    "llama": {**{f"{x}_proj": f"self_attn.{x}_proj" for x in "qkvo"},
              **{f"{x}_proj": f"mlp.{x}_proj" for x in ("gate", "up", "down")}},
}
DEFAULT_LAYERS = 16  # mlx-lm's num_layers: the last 16 blocks


@dataclass
class LoRAConfig:
    """Where and how big the adapter is. ``targets`` and ``layers`` take what
    :func:`parse_targets` and :func:`parse_layers` take (None: every linear layer of a block; the
    last :data:`DEFAULT_LAYERS` blocks); :func:`apply_lora` resolves them for the model."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None
    layers: str | tuple[int, ...] | None = None
    dora: bool = False  # DoRA: also learn each output row's magnitude
    base: dict[str, Any] = field(default_factory=dict)  # identity of the base model (on disk)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear (plain or quantized) plus a trainable low-rank update."""

    TRAINED = ("lora_a", "lora_b")  # the parameters that train (and that an adapter stores)

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 key: mx.array | None = None):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        self.linear = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # Kaiming-uniform-like A (as mlx-lm and the reference implementation), zero B.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)  # (in, r)
        self.lora_b = mx.zeros((rank, out_dims))  # (r, out)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out)
        if self.dropout is not None:
            x = self.dropout(x)
        z = (x @ self.lora_a) @ self.lora_b  # (..., out), float32 when A, B are
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The update as a dense ``(out, in)`` matrix, in float32."""
        return self.scale * (self.lora_a.astype(mx.float32) @ self.lora_b.astype(mx.float32)).T

    def fused_weight(self) -> mx.array:
        """The weight of the equivalent ordinary layer, ``W + scale * (A B)^T``, in float32."""
        return dense_weight(self.linear).astype(mx.float32) + self.delta()

    def fused(self, requantize: bool = False) -> nn.Module:
        """An ordinary layer computing what this one computes; quantized again on request."""
        base = self.linear
        w = dense_weight(base)
        out_dims, in_dims = w.shape
        has_bias = "bias" in base
        layer = nn.Linear(in_dims, out_dims, bias=has_bias)
        layer.weight = self.fused_weight().astype(w.dtype)
        if has_bias:
            layer.bias = base.bias
        if requantize and isinstance(base, nn.QuantizedLinear):
            layer = nn.QuantizedLinear.from_linear(
                layer, base.group_size, base.bits, mode=getattr(base, "mode", "affine")
            )
        return layer


class DoRALinear(LoRALinear):
    """LoRA plus a trainable magnitude ``m`` per output row (see the module docstring)."""

    TRAINED = ("lora_a", "lora_b", "m")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 key: mx.array | None = None):
        super().__init__(base, rank, alpha, dropout, key)
        self.m = _row_norms(dense_weight(base).astype(mx.float32))  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        base = self.linear
        y = _without_bias(base, x)  # (..., out): the magnitude rescales W x, not the bias
        if self.dropout is not None:
            x = self.dropout(x)
        z = (x @ self.lora_a) @ self.lora_b
        y = y + (self.scale * z).astype(y.dtype)
        norm = mx.stop_gradient(_row_norms(super().fused_weight()))
        y = (self.m / norm).astype(y.dtype) * y
        return y + base.bias if "bias" in base else y

    def fused_weight(self) -> mx.array:
        w = super().fused_weight()
        return (self.m / _row_norms(w))[:, None] * w


def _row_norms(w: mx.array) -> mx.array:
    """The Euclidean norm of each row of an (out, in) weight: (out,)."""
    return mx.linalg.norm(w, axis=1)


def _without_bias(layer: nn.Module, x: mx.array) -> mx.array:
    """``W x`` of a plain or quantized linear layer, its bias left out."""
    if "bias" not in layer:
        return layer(x)
    if isinstance(layer, nn.QuantizedLinear):
        return mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                                   group_size=layer.group_size, bits=layer.bits,
                                   mode=getattr(layer, "mode", "affine"))
    return x @ layer.weight.T


# --------------------------------------------------------------------------- targets and layers


def parse_targets(spec: str | Iterable[str] | None, model_type: str = "gpt2") -> tuple[str, ...]:
    """``"c_attn,c_fc"``, ``"q,v"`` or ``"all"`` -> the family's target names, in a fixed order.

    A target may be named by its name, its path in the block (``self_attn.q_proj``) or, for
    the ``*_proj`` layers, without ``_proj``. None means all of them.
    """
    names = TARGETS[model_type]
    if spec is None:
        return tuple(names)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return tuple(names)
    aliases = {}
    for name, path in names.items():
        aliases[name] = aliases[path] = name
        if name.endswith("_proj"):
            aliases[name.removesuffix("_proj")] = name
    bad = [s for s in items if s not in aliases]
    if bad or not items:
        raise MlxgptError(
            f"unknown LoRA target {bad[0] if bad else spec!r} for a {model_type} model "
            f"(choose from {', '.join(names)}, or all)"
        )
    chosen = {aliases[s] for s in items}
    return tuple(t for t in names if t in chosen)


def parse_layers(spec: str | Sequence[int] | None, n_layer: int) -> tuple[int, ...]:
    """``"all"``, ``"0,1,5"``, ``"8-11"`` or ``"last:4"`` -> sorted block indices; None: the
    last :data:`DEFAULT_LAYERS` (every block of a smaller model).

    Negative indices count from the end (``-1`` is the last block).
    """
    if spec is None:
        return tuple(range(max(0, n_layer - DEFAULT_LAYERS), n_layer))
    if spec == "all":
        return tuple(range(n_layer))
    if isinstance(spec, str):
        spec = spec.strip()
        out: set[int] = set()
        if spec.startswith("last:"):
            n = _int(spec[5:], spec)
            if not 1 <= n <= n_layer:
                raise MlxgptError(f"--layers {spec}: the model has {n_layer} layers")
            return tuple(range(n_layer - n, n_layer))
        for part in spec.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            if sep:
                a, b = _int(lo, spec), _int(hi, spec)
                out.update(range(a, b + 1))
            else:
                out.add(_int(part, spec))
        idx = [i + n_layer if i < 0 else i for i in out]
    else:
        idx = [i + n_layer if i < 0 else i for i in spec]
    bad = [i for i in idx if not 0 <= i < n_layer]
    if bad or not idx:
        raise MlxgptError(
            f"--layers {spec}: layer indices must be in 0..{n_layer - 1} (the model has "
            f"{n_layer} layers)"
        )
    return tuple(sorted(set(idx)))


def _int(s: str, spec: Any) -> int:
    try:
        return int(s)
    except ValueError:
        msg = f"--layers {spec}: not a layer list (try all, 0,1,2, 8-11 or last:4)"
        raise MlxgptError(msg) from None


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRA layer, paths as in the model's parameter tree."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def block_paths(model: Model) -> list[str]:
    """The path of each block in the model's parameter tree (``h.0``, ``model.layers.0``)."""
    index = {id(b): i for i, b in enumerate(model.layers)}
    paths = [""] * len(index)
    for p, m in model.named_modules():
        if id(m) in index:
            paths[index[id(m)]] = p
    return paths


def base_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The config values that fix every tensor's shape: an adapter fits a model iff they match.
    GPT-2's keep the names (and so the hash) adapters have recorded since the first version."""
    if cfg.model_type == "gpt2":
        shape = {k: getattr(cfg, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer",
                                              "n_head")}
        return {**shape, "n_inner": cfg.hidden_dim}
    keys = ("model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", "head_dim")
    return {**{k: getattr(cfg, k) for k in keys}, "n_inner": cfg.intermediate_size}


def base_identity(cfg: ModelConfig, path: str | os.PathLike | None = None,
                  quantization: dict | None = None) -> dict[str, Any]:
    """What an adapter records about its base: the shape-defining config and a hash of it."""
    shape = base_shape(cfg)
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    ident: dict[str, Any] = {"config": shape, "config_sha256": digest}
    if path is not None:
        ident["path"] = str(Path(path).resolve()) if Path(path).exists() else str(path)
    if quantization:
        ident["quantization"] = dict(quantization)
    return ident


# --------------------------------------------------------------------------- apply / count


def apply_lora(model: Model, cfg: LoRAConfig, seed: int = 0) -> Model:
    """Wrap the chosen linear layers in LoRA (or DoRA) layers and freeze everything else (in
    place); ``cfg.targets`` and ``cfg.layers`` are resolved (to names and indices) in place.

    The ``A`` matrices are drawn from ``seed`` alone, so the same call gives the same adapter.
    """
    if not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise MlxgptError(f"--rank must be a positive integer, got {cfg.rank!r}")
    if not cfg.alpha > 0:
        raise MlxgptError(f"--alpha must be positive, got {cfg.alpha!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise MlxgptError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    family = model.config.model_type
    targets = parse_targets(cfg.targets, family)
    layers = parse_layers(cfg.layers, len(model.layers))
    if lora_modules(model):
        raise MlxgptError("the model already has LoRA layers (fuse them first)")
    make = DoRALinear if cfg.dora else LoRALinear
    blocks = block_paths(model)
    key = mx.random.key(seed)
    for i in layers:
        for t in targets:
            path = f"{blocks[i]}.{TARGETS[family][t]}"
            base = get_module(model, path)
            out_dims, in_dims = linear_dims(base)
            if cfg.rank > min(out_dims, in_dims):
                raise MlxgptError(
                    f"--rank {cfg.rank} is larger than layer {path} "
                    f"({in_dims} -> {out_dims}) allows; use a rank <= {min(out_dims, in_dims)}"
                )
            key, sub = mx.random.split(key)
            set_module(model, path, make(base, cfg.rank, cfg.alpha, cfg.dropout, sub))
    cfg.targets, cfg.layers = targets, layers
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Make the adapters' parameters the only trainable ones."""
    model.freeze()
    for _, m in lora_modules(model):
        m.unfreeze(keys=list(m.TRAINED), recurse=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights count as the values they stand for."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, logical_sizes(model)


# --------------------------------------------------------------------------- save / load


def adapter_weights(model: Model) -> dict[str, mx.array]:
    """The adapters' parameters, keyed as on disk (``model.h.0.attn.c_attn.lora_a``)."""
    return {f"{model.weight_prefix}{path}.{name}": getattr(m, name)
            for path, m in lora_modules(model) for name in m.TRAINED}


def adapter_config_dict(cfg: LoRAConfig, n_layer: int, model_type: str = "gpt2") -> dict[str, Any]:
    """``adapter_config.json``'s content for an applied ``cfg`` (see the module docstring)."""
    targets = parse_targets(cfg.targets, model_type)
    d: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "fine_tune_type": "dora" if cfg.dora else "lora",
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.scale,
        "dropout": cfg.dropout,
        "targets": list(targets),
        "layers": list(parse_layers(cfg.layers, n_layer)),
        "base_model": cfg.base,
    }
    layers = d["layers"]
    if layers == list(range(n_layer - len(layers), n_layer)):
        # mlx-lm applies LoRA to the last ``num_layers`` blocks with these keys.
        d.update(
            num_layers=len(layers),
            lora_parameters={
                "rank": cfg.rank,
                "scale": cfg.scale,
                "dropout": cfg.dropout,
                "keys": [TARGETS[model_type][t] for t in targets],
            },
        )
    return d


def save_adapter(model: Model, adapter_dir: str | os.PathLike, cfg: LoRAConfig) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` (each atomically)."""
    out = Path(adapter_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MlxgptError(f"cannot write to {out}: {e.strerror or e}") from None
    weights = adapter_weights(model)
    if not weights:
        raise MlxgptError("the model has no LoRA layers to save")
    atomic_save_safetensors(out / ADAPTER_WEIGHTS, weights, metadata={"format": "mlx"})
    d = adapter_config_dict(cfg, len(model.layers), model.config.model_type)
    text = json.dumps(d, indent=2) + "\n"
    atomic_write_text(out / ADAPTER_CONFIG, text)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike, n_layer: int | None = None) -> LoRAConfig:
    """Read an mlxgpt (or mlx-lm LoRA/DoRA) ``adapter_config.json``. Targets stay as written
    (their names depend on the model's family): :func:`apply_lora` resolves them. ``n_layer``
    (the model's) reads mlx-lm's ``num_layers`` as mlx-lm does: more than the model has is all."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise MlxgptError(f"{folder}: adapter folder not found")
    if not (folder / ADAPTER_CONFIG).is_file():
        if (folder / "config.json").is_file():
            raise MlxgptError(
                f"{folder}: is a model folder (a full fine-tune?), not an adapter; "
                "pass it as --model"
            )
        raise MlxgptError(f"{folder}: no {ADAPTER_CONFIG} (not an adapter folder)")
    d = read_json(folder / ADAPTER_CONFIG)
    src = folder / ADAPTER_CONFIG
    try:
        if d.get("format") == ADAPTER_FORMAT:
            return LoRAConfig(
                rank=int(d["rank"]),
                alpha=float(d["alpha"]),
                dropout=float(d.get("dropout", 0.0)),
                targets=d["targets"] if isinstance(d["targets"], str)
                else tuple(str(t) for t in d["targets"]),
                layers=tuple(int(i) for i in d["layers"]),
                dora=d.get("fine_tune_type", "lora") == "dora",
                base=dict(d.get("base_model") or {}),
            )
        kind = d.get("fine_tune_type", "lora")
        if kind == "full":
            raise MlxgptError(f"{src}: mlx-lm's full fine-tune (fine_tune_type full) holds "
                              "weights, not an adapter; mlxgpt reads LoRA and DoRA adapters")
        if kind in ("lora", "dora") and "lora_parameters" in d:
            p = d["lora_parameters"]  # written by mlx_lm.lora
            rank = int(p["rank"])
            n = int(d["num_layers"])
            keys = p.get("keys")  # None: every linear layer of a block, as here
            return LoRAConfig(
                rank=rank,
                alpha=float(p["scale"]) * rank,
                dropout=float(p.get("dropout", 0.0)),
                targets=tuple(keys) if keys else None,
                # mlx-lm adapts model.layers[-num_layers:]: -1 (or too many) is every block
                layers="all" if n <= 0 or n >= (n_layer or n + 1) else f"last:{n}",
                dora=kind == "dora",
            )
    except (KeyError, TypeError, ValueError) as e:
        raise MlxgptError(f"{src}: bad adapter config ({type(e).__name__}: {e})") from None
    raise MlxgptError(f"{src}: not a LoRA adapter config (format {d.get('format')!r})")


def check_fits(cfg: LoRAConfig, model: Model, source: str) -> None:
    """Refuse an adapter whose recorded base has other shapes than ``model``."""
    want = (cfg.base or {}).get("config")
    if not want:
        return
    have = base_shape(model.config)
    kind = want.get("model_type", "gpt2")  # GPT-2 adapters record no model_type
    if kind != model.config.model_type:
        raise MlxgptError(f"{source}: adapter for a {kind} model does not fit this "
                          f"{model.config.model_type} model")
    diff = [k for k in want if k in have and want[k] != have[k]]
    if diff:
        detail = ", ".join(f"{k}={want[k]} (model has {have[k]})" for k in diff)
        base_path = (cfg.base or {}).get("path")
        hint = f" (trained on {base_path})" if base_path else ""
        raise MlxgptError(f"{source}: adapter{hint} does not fit this model: {detail}")


def load_adapter(model: Model, adapter_dir: str | os.PathLike) -> Model:
    """Add the adapter in ``adapter_dir`` to ``model`` (in place; also returned), in eval mode."""
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder, len(model.layers))
    check_fits(cfg, model, str(folder))
    try:
        apply_lora(model, cfg)
    except MlxgptError as e:
        raise MlxgptError(f"{folder}: adapter does not fit this model: {e}") from None
    weights = read_weights(folder / ADAPTER_WEIGHTS, model.weight_prefix)
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise MlxgptError(f"{folder / ADAPTER_WEIGHTS}: does not match its config ({what})")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k]):
            raise MlxgptError(
                f"{folder}: adapter does not fit this model: {k} has shape {tuple(v.shape)}, "
                f"the model needs {tuple(expected[k])}"
            )
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- fuse


def fuse(model: Model, requantize: bool = False) -> Model:
    """Fold every LoRA (or DoRA) update into its base layer (in place; also returned).

    By default the result is a plain float model: quantized layers (adapted or not) are
    dequantized, so nothing is lost. ``requantize`` quantizes the fused layers again with their
    base's settings and keeps the other quantized layers; that adds quantization error on top
    of the adapter's update.
    """
    for path, m in lora_modules(model):
        set_module(model, path, m.fused(requantize=requantize))
    if not requantize:
        dequantize(model)
    model.unfreeze()
    return model
