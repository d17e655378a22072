"""``mlxgpt convert``: a Hugging Face GPT-2 checkpoint (folder or hub id) or a GPT-2 GGUF file
-> an mlxgpt model folder, optionally cast to another dtype or quantized. A
``GPT2ForSequenceClassification`` checkpoint becomes a classifier folder (its GPT cast or
quantized; the head stays float)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..core.classifier import GPTClassifier
from ..core.model import Model
from ..errors import MlxgptError
from ..tokenizers import Tokenizer
from . import folder as mlx_folder
from .files import check_output
from .gguf import read_gguf
from .hf import is_hf_classifier, load_hf, load_hf_classifier
from .hub import is_gguf, resolve_source
from .quantize import check_quant_options, float_dtype, quantize


@dataclass
class Summary:
    out_dir: Path
    n_params: int
    dtype: str
    size_bytes: int
    seconds: float
    quantization: dict[str, int] | None = None
    quantized_layers: int = 0
    tokenizer: str | None = None
    labels: int = 0  # a classifier's label count

    def line(self) -> str:
        q = ""
        if self.quantization:
            q = (f", {self.quantization['bits']}-bit (group {self.quantization['group_size']}, "
                 f"{self.quantized_layers} layers)")
        tok = self.tokenizer or "none (token ids only)"
        n = f"{self.n_params / 1e6:.1f}M" if self.n_params >= 100_000 else f"{self.n_params:,}"
        head = f", classifier with {self.labels} labels" if self.labels else ""
        return (f"wrote {self.out_dir}: {n} parameters, {self.dtype}{q}{head}, "
                f"tokenizer {tok}, {self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s")


def _read_source(source: str | os.PathLike, revision: str | None,
                 dtype: mx.Dtype | None) -> tuple[Model, Tokenizer, GPTClassifier | None]:
    """(model, tokenizer, classifier or None) from a GGUF file or a Hugging Face source."""
    if is_gguf(source) or (str(source).endswith(".gguf") and not Path(source).is_dir()):
        if revision is not None:
            raise MlxgptError(f"{source}: --revision applies to hub ids, not GGUF files")
        return *read_gguf(source, dtype), None
    folder = resolve_source(source, revision)
    if folder.is_file():  # a known model fetched as GGUF
        return *read_gguf(folder, dtype), None
    if mlx_folder.is_model_folder(folder):
        raise MlxgptError(f"{source}: already an mlxgpt model folder (load it as it is)")
    if is_hf_classifier(folder):
        clf, tok = load_hf_classifier(folder, dtype)
        return clf.transformer, tok, clf
    return *load_hf(folder, dtype), None


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
) -> Summary:
    """Convert a Hugging Face GPT-2 checkpoint (folder or hub id) or a GGUF file into an mlxgpt
    model folder."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    # before any download or reading
    check_output(out, force=force, inputs={"SOURCE": source}, out_label="OUT_DIR")
    target = mlx_folder.parse_dtype(dtype)
    if quantize_bits is not None:
        check_quant_options(quantize_bits, group_size)  # before any download or reading
    model, tok, clf = _read_source(source, revision, target)
    n_params = model.n_params  # before quantization packs the weights
    quant, n_quant = None, 0
    if quantize_bits is not None:
        quant, n_quant = quantize(model, quantize_bits, group_size)
    source_name = str(source) if revision is None else f"{source}@{revision}"
    if clf is None:
        mlx_folder.save_model(model, out, tok, force=force, quantization=quant,
                              extra={"source": source_name})
    else:
        mlx_folder.save_classifier(clf, out, tok, force=force, quantization=quant,
                                   extra={"source": source_name})
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    dtype_name = str(float_dtype(model)).removeprefix("mlx.core.")
    return Summary(out, n_params, dtype_name, size, time.perf_counter() - t0, quant, n_quant,
                   getattr(tok, "name", None), 0 if clf is None else len(clf.labels))
