"""Quantized weights: quantizing a model, and turning quantized layers back into float ones.

MLX quantizes Linear and Embedding weights in groups along their input dimension
(``nn.QuantizedLinear``/``nn.QuantizedEmbedding``: packed ``uint32`` weights plus per-group
scales and biases). Everything in mlxgpt that looks through a quantized layer goes through here.

A model's quantization is described as mlx-lm describes it in ``config.json``: ``{"group_size",
"bits"}`` for most quantized layers, plus an entry ``"<module path>": {"group_size", "bits"}`` for
each layer quantized otherwise (a GGUF file mixes Q8_0 and Q4_1, say); module paths are as
stored, with the family's ``weight_prefix``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checks import shown
from ..errors import MlxgptError, warn
from ..modules import set_module

QUANT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantize(model: nn.Module, bits: int,
             group_size: int = 64) -> tuple[dict[str, int] | None, int]:
    """Quantize Linear/Embedding layers in place; returns (config entry, layers quantized).

    A layer whose input width is not a multiple of ``group_size`` stays in floating point
    (MLX quantizes rows in groups); the config entry is None when no layer could be quantized.
    """
    check_quant_options(bits, group_size)
    done = []

    def predicate(path: str, module: nn.Module) -> bool:
        ok = hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
        if ok:
            done.append(path)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if not done:
        warn(f"no layer has an input width divisible by {group_size}; nothing was quantized")
        return None, 0
    mx.eval(model.parameters())
    return {"group_size": group_size, "bits": bits}, len(done)


def quantize_as_stored(model: nn.Module, weights: dict[str, mx.array],
                       quantization: dict[str, Any]) -> None:
    """Quantize (in place) the layers that ``weights`` holds quantized (those with scales), each
    as ``quantization`` says (see the module doc)."""
    if not isinstance(quantization, dict):
        raise MlxgptError(f"config: quantization must be an object, got {shown(quantization)}")
    default = _layer_quant(quantization, "quantization", {"group_size": 64, "bits": 4})
    prefix = getattr(model, "weight_prefix", "")

    def predicate(path: str, m: nn.Module) -> bool | dict[str, int]:
        if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights:
            return False
        own = quantization.get(prefix + path)
        return _layer_quant(own, f"quantization of {prefix + path}", default) if own else default

    nn.quantize(model, class_predicate=predicate)


def _layer_quant(d: Any, what: str, default: dict[str, int]) -> dict[str, int]:
    """``{group_size, bits}`` from a config entry (missing keys from ``default``), checked."""
    if not isinstance(d, dict):
        raise MlxgptError(f"config: {what} must be an object, got {shown(d)}")
    out = {k: d.get(k, default[k]) for k in ("group_size", "bits")}
    # type(v) is int: 4.0 or true would pass "in (4, 8)" and reach MLX as a float or a bool
    if (out["bits"] not in QUANT_BITS or out["group_size"] not in GROUP_SIZES
            or any(type(v) is not int for v in out.values())):
        raise MlxgptError(f"config: {what} has bits {shown(out['bits'])}, group size "
                          f"{shown(out['group_size'])} (bits {QUANT_BITS}, groups {GROUP_SIZES})")
    return out


def check_quant_options(bits: int, group_size: int) -> None:
    if bits not in QUANT_BITS:
        raise MlxgptError(f"--quantize must be one of {', '.join(map(str, QUANT_BITS))}")
    if group_size not in GROUP_SIZES:
        raise MlxgptError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}")


def dequantized_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's parameters with quantized layers turned back into floating-point weights."""
    flat = dict(tree_flatten(model.parameters()))
    q = {path: m for path, m in model.named_modules() if isinstance(m, QUANTIZED)}
    out = {}
    for key, value in flat.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in q and leaf in ("scales", "biases"):
            continue
        out[key] = dense_weight(q[prefix]) if prefix in q and leaf == "weight" else value
    return out


def dense_weight(layer: nn.Module) -> mx.array:
    """The float weight of a plain or quantized linear/embedding layer."""
    if isinstance(layer, QUANTIZED):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a plain or quantized linear layer."""
    out_dims, cols = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        cols = cols * 32 // layer.bits  # packed: 32 / bits values per uint32
    return out_dims, cols


def dequantize(model: nn.Module) -> nn.Module:
    """Replace quantized linear and embedding layers with float ones (in place)."""
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            w = dense_weight(m)
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            layer.weight = w
            if "bias" in m:
                layer.bias = m.bias
        elif isinstance(m, nn.QuantizedEmbedding):
            w = dense_weight(m)
            layer = nn.Embedding(*w.shape)
            layer.weight = w
        else:
            continue
        set_module(model, path, layer)
    return model


def model_quantization(model: nn.Module) -> dict[str, Any] | None:
    """The model's quantization as ``config.json`` records it (the module doc), or None for a
    float model: the most common ``{group_size, bits}``, and each layer that differs."""
    layers = {p: (m.group_size, m.bits) for p, m in model.named_modules()
              if isinstance(m, QUANTIZED)}
    if not layers:
        return None
    (group, bits), _ = Counter(layers.values()).most_common(1)[0]
    out: dict[str, Any] = {"group_size": group, "bits": bits}
    prefix = getattr(model, "weight_prefix", "")
    for path, (g, b) in sorted(layers.items()):
        if (g, b) != (group, bits):
            out[prefix + path] = {"group_size": g, "bits": b}
    return out


def logical_sizes(model: nn.Module) -> int:
    """Parameter count with quantized weights counted as the values they stand for (their
    scales and biases are bookkeeping, not parameters)."""
    bits = {p: m.bits for p, m in model.named_modules() if isinstance(m, QUANTIZED)}
    total = 0
    for key, v in tree_flatten(model.parameters()):
        owner, _, name = key.rpartition(".")
        if owner in bits and name in ("scales", "biases"):
            continue
        total += v.size * 32 // bits[owner] if owner in bits and name == "weight" else v.size
    return total


def float_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the model's floating-point parameters (scales, for quantized layers)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32
