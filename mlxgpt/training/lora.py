"""LoRA adapters for GPT's linear layers: apply, count, save, load and fuse.

A LoRA layer adds a trainable low-rank update to a frozen linear layer::

    y = W x + b + scale * (dropout(x) @ A) @ B        A: (in, r), B: (r, out), scale = alpha / r

``B`` starts at zero, so a fresh adapter leaves the model's outputs unchanged. The frozen layer
may be an ``nn.Linear`` (fp32/fp16/bf16) or an ``nn.QuantizedLinear`` (QLoRA: the base stays
quantized, only ``A`` and ``B`` are float). Dividing by the rank keeps the update's size roughly
independent of ``r``, so one learning rate works across ranks (as in the LoRA paper).

On disk an adapter is a folder with ``adapters.safetensors`` (keys ``model.h.{i}.{target}.lora_a``
/ ``lora_b``, mlx-lm's layout) and ``adapter_config.json`` (rank, alpha, targets, layers and the
base model's identity, checked on load). When the adapted layers are the last N, the config also
carries mlx-lm's keys, so ``mlx_lm`` can load the adapter on the same model folder.
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

from ..checkpoints.files import atomic_save_safetensors, atomic_write_text, read_json
from ..checkpoints.folder import KEY_PREFIX, read_weights
from ..checkpoints.quantize import dense_weight, dequantize, linear_dims, logical_sizes
from ..core.config import GPTConfig
from ..core.model import Model
from ..core.modules import get_module, set_module
from ..errors import MlxgptError

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "mlxgpt-lora"

# Target name -> module path inside a block. Short names are accepted where unambiguous.
TARGETS = {
    "c_attn": "attn.c_attn",
    "attn.c_proj": "attn.c_proj",
    "c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}
DEFAULT_TARGETS = ("c_attn",)  # attention-only, as in the LoRA paper: small and effective
# Base-config fields that fix every tensor shape; an adapter fits a model iff these match.
_SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")


@dataclass
class LoRAConfig:
    """Where and how big the adapter is. ``layers=None`` means every block."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None
    base: dict[str, Any] = field(default_factory=dict)  # identity of the base model (on disk)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear (plain or quantized) plus a trainable low-rank update."""

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

    def fused(self, requantize: bool = False) -> nn.Module:
        """An ordinary layer computing ``W + scale * (A B)^T``; quantized again on request."""
        base = self.linear
        w = dense_weight(base)
        out_dims, in_dims = w.shape
        has_bias = "bias" in base
        layer = nn.Linear(in_dims, out_dims, bias=has_bias)
        layer.weight = (w.astype(mx.float32) + self.delta()).astype(w.dtype)
        if has_bias:
            layer.bias = base.bias
        if requantize and isinstance(base, nn.QuantizedLinear):
            layer = nn.QuantizedLinear.from_linear(
                layer, base.group_size, base.bits, mode=getattr(base, "mode", "affine")
            )
        return layer


# --------------------------------------------------------------------------- targets and layers


def parse_targets(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"c_attn,c_fc"`` or ``"all"`` -> canonical target names, in a fixed order."""
    if spec is None:
        return DEFAULT_TARGETS
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return tuple(TARGETS)
    aliases = {**{k: k for k in TARGETS}, **{v: k for k, v in TARGETS.items()}}
    bad = [s for s in items if s not in aliases]
    if bad or not items:
        raise MlxgptError(
            f"unknown LoRA target {bad[0] if bad else spec!r} "
            f"(choose from {', '.join(TARGETS)}, or all)"
        )
    chosen = {aliases[s] for s in items}
    return tuple(t for t in TARGETS if t in chosen)


def parse_layers(spec: str | Sequence[int] | None, n_layer: int) -> tuple[int, ...]:
    """``"all"``, ``"0,1,5"``, ``"8-11"`` or ``"last:4"`` -> sorted block indices.

    Negative indices count from the end (``-1`` is the last block).
    """
    if spec is None or spec == "all":
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


def base_identity(cfg: GPTConfig, path: str | os.PathLike | None = None,
                  quantization: dict | None = None) -> dict[str, Any]:
    """What an adapter records about its base: the shape-defining config and a hash of it."""
    shape = {k: getattr(cfg, k) for k in _SHAPE_KEYS}
    shape["n_inner"] = cfg.hidden_dim
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    ident: dict[str, Any] = {"config": shape, "config_sha256": digest}
    if path is not None:
        ident["path"] = str(Path(path).resolve()) if Path(path).exists() else str(path)
    if quantization:
        ident["quantization"] = dict(quantization)
    return ident


# --------------------------------------------------------------------------- apply / count


def apply_lora(model: Model, cfg: LoRAConfig, seed: int = 0) -> Model:
    """Wrap the chosen linear layers in LoRA layers and freeze everything else (in place).

    The ``A`` matrices are drawn from ``seed`` alone, so the same call gives the same adapter.
    """
    if not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise MlxgptError(f"--rank must be a positive integer, got {cfg.rank!r}")
    if not cfg.alpha > 0:
        raise MlxgptError(f"--alpha must be positive, got {cfg.alpha!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise MlxgptError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    targets = parse_targets(cfg.targets)
    layers = parse_layers(cfg.layers, len(model.h))
    if lora_modules(model):
        raise MlxgptError("the model already has LoRA layers (fuse them first)")
    key = mx.random.key(seed)
    for i in layers:
        for t in targets:
            path = f"h.{i}.{TARGETS[t]}"
            base = get_module(model, path)
            out_dims, in_dims = linear_dims(base)
            if cfg.rank > min(out_dims, in_dims):
                raise MlxgptError(
                    f"--rank {cfg.rank} is larger than layer h.{i}.{TARGETS[t]} "
                    f"({in_dims} -> {out_dims}) allows; use a rank <= {min(out_dims, in_dims)}"
                )
            key, sub = mx.random.split(key)
            set_module(model, path, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, sub))
    cfg.targets, cfg.layers = targets, layers
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Make the LoRA matrices the only trainable parameters."""
    model.freeze()
    for _, m in lora_modules(model):
        m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights count as the values they stand for."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, logical_sizes(model)


# --------------------------------------------------------------------------- save / load


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA matrices, keyed as on disk (``model.h.0.attn.c_attn.lora_a``)."""
    out = {}
    for path, m in lora_modules(model):
        out[f"{KEY_PREFIX}{path}.lora_a"] = m.lora_a
        out[f"{KEY_PREFIX}{path}.lora_b"] = m.lora_b
    return out


def adapter_config_dict(cfg: LoRAConfig, n_layer: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.scale,
        "dropout": cfg.dropout,
        "targets": list(cfg.targets),
        "layers": list(cfg.layers if cfg.layers is not None else range(n_layer)),
        "base_model": cfg.base,
    }
    layers = d["layers"]
    if layers == list(range(n_layer - len(layers), n_layer)):
        # mlx-lm applies LoRA to the last ``num_layers`` blocks with these keys.
        d.update(
            fine_tune_type="lora",
            num_layers=len(layers),
            lora_parameters={
                "rank": cfg.rank,
                "scale": cfg.scale,
                "dropout": cfg.dropout,
                "keys": [TARGETS[t] for t in cfg.targets],
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
    text = json.dumps(adapter_config_dict(cfg, len(model.h)), indent=2) + "\n"
    atomic_write_text(out / ADAPTER_CONFIG, text)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
    """Read an mlxgpt (or mlx-lm LoRA) ``adapter_config.json``."""
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
                targets=parse_targets(d["targets"]),
                layers=tuple(int(i) for i in d["layers"]),
                base=dict(d.get("base_model") or {}),
            )
        if d.get("fine_tune_type", "lora") == "lora" and "lora_parameters" in d:
            p = d["lora_parameters"]  # written by mlx_lm.lora
            rank = int(p["rank"])
            n = int(d["num_layers"])
            return LoRAConfig(
                rank=rank,
                alpha=float(p["scale"]) * rank,
                dropout=float(p.get("dropout", 0.0)),
                targets=parse_targets(p.get("keys") or list(TARGETS.values())),
                layers=("last:" + str(n)) if n > 0 else None,  # type: ignore[arg-type]
            )
    except (KeyError, TypeError, ValueError) as e:
        raise MlxgptError(f"{src}: bad adapter config ({type(e).__name__}: {e})") from None
    raise MlxgptError(f"{src}: not a LoRA adapter config (format {d.get('format')!r})")


def check_fits(cfg: LoRAConfig, model: Model, source: str) -> None:
    """Refuse an adapter whose recorded base has other shapes than ``model``."""
    want = (cfg.base or {}).get("config")
    if not want:
        return
    have = base_identity(model.config)["config"]
    diff = [k for k in _SHAPE_KEYS if k in want and want[k] != have[k]]
    if diff:
        detail = ", ".join(f"{k}={want[k]} (model has {have[k]})" for k in diff)
        base_path = (cfg.base or {}).get("path")
        hint = f" (trained on {base_path})" if base_path else ""
        raise MlxgptError(f"{source}: adapter{hint} does not fit this model: {detail}")


def load_adapter(model: Model, adapter_dir: str | os.PathLike) -> Model:
    """Add the adapter in ``adapter_dir`` to ``model`` (in place; also returned), in eval mode."""
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    check_fits(cfg, model, str(folder))
    try:
        apply_lora(model, cfg)
    except MlxgptError as e:
        raise MlxgptError(f"{folder}: adapter does not fit this model: {e}") from None
    weights = read_weights(folder / ADAPTER_WEIGHTS)
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
    """Fold every LoRA update into its base layer (in place; also returned).

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
