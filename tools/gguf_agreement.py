"""GGUF agreement: greedy continuations from llama.cpp (through llama-cpp-python) against
mlxgpt's, token for token, on the same prompt ids.

Each model is exported with ``mlxgpt export --format gguf`` at each type and run by llama.cpp;
mlxgpt runs the model as ``mlxgpt.load`` gives it (float32 on the CPU) with the weights at the
file's precision for f32 and f16 (f16: rounded to float16, exactly what the file holds) and the
unquantized weights for q8_0, so q8_0's figure is the cost of llama.cpp's quantization. A prompt
agrees to the first token that differs; after that the two continuations read different text.

    python tools/gguf_agreement.py                       # the shipped models, 8 prompts x 32
    python tools/gguf_agreement.py --models english --dtypes q8_0 --tokens 64
    python tools/gguf_agreement.py --models gpt2-shape   # a random GPT-2 124M-shape model

Needs ``pip install llama-cpp-python gguf``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

import mlxgpt  # noqa: E402
from mlxgpt.checkpoints.gguf import write_gguf  # noqa: E402
from mlxgpt.core.backend import prepare_for_inference  # noqa: E402
from mlxgpt.core.inference import InferenceModel  # noqa: E402
from mlxgpt.generation.context import common_prefix  # noqa: E402
from mlxgpt.generation.generate import stream_generate  # noqa: E402
from mlxgpt.generation.sample import SamplingSettings  # noqa: E402
from mlxgpt.tokenizers import gpt2_tokenizer  # noqa: E402

PROMPTS = [
    "The king said",
    "Once upon a time, there was",
    "The history of the city begins",
    "User: How are you today?\nAssistant:",
    "In the beginning God created",
    "To be, or not to be, that is",
    "The computer program reads the file and",
    "She opened the door and saw",
]
SHIPPED = ("shakespeare", "english", "english-chat")
GPT2_SHAPE = "gpt2-shape"  # a random GPT with GPT-2 124M's configuration and tokenizer


def randomize_norms(model: mlxgpt.GPT) -> mlxgpt.GPT:
    """Random LayerNorm gains and biases (a fresh model has ones and zeros, which would hide a
    swapped gain or a dropped bias)."""
    for _, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.weight = mx.random.uniform(0.5, 1.5, m.weight.shape)
            m.bias = mx.random.normal(m.bias.shape) * 0.1
    mx.eval(model.parameters())
    return model


def random_gpt2_shape(seed: int = 0) -> tuple[mlxgpt.GPT, object]:
    """A random-init GPT with GPT-2 124M's hyper-parameters and GPT-2's tokenizer."""
    mx.random.seed(seed)
    model = mlxgpt.GPT(mlxgpt.GPTConfig())
    model.eval()
    return randomize_norms(model), gpt2_tokenizer()


def at_precision(model: mlxgpt.GPT, dtype: str) -> InferenceModel:
    """The model mlxgpt runs against a file of ``dtype``, prepared as ``mlxgpt generate``
    prepares it: f16 weights rounded to float16 (then computed in float32, as on the CPU), the
    unquantized model otherwise. Rounds ``model``'s weights in place."""
    if dtype == "f16":
        model.set_dtype(mx.float16)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    return prepare_for_inference(model)


def mlxgpt_greedy(model: mlxgpt.GPT, tokenizer, ids: list[int], n: int) -> list[int]:
    """mlxgpt's greedy continuation (temperature 0), ``n`` token ids, through generation."""
    out = stream_generate(model, tokenizer, ids, max_tokens=n, stop_at_eos=False,
                          sampling=SamplingSettings(temperature=0))
    return [r.token for r in out if r.token is not None]


def load_llama(path: Path, n_ctx: int):
    """llama.cpp on the CPU, quiet, one thread: its threads spin at barriers, which costs
    seconds per token when another process holds a core (the figures do not depend on it)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                           n_threads_batch=1, verbose=False)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation: its sampler at temperature 0, no penalties."""
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


@dataclass
class Agreement:
    model: str
    dtype: str
    prompts: int
    prompts_equal: int
    tokens: int
    tokens_agreed: int
    mb: float

    def row(self) -> str:
        return (f"| {self.model} | {self.dtype} | {self.mb:.1f} | {self.prompts_equal}/"
                f"{self.prompts} | {self.tokens_agreed}/{self.tokens} "
                f"({100 * self.tokens_agreed / self.tokens:.1f}%) |")


def measure(name: str, model: mlxgpt.GPT, tokenizer, dtype: str, prompts: list[str], n: int,
            tmp: Path) -> Agreement:
    """Export ``model`` at ``dtype``, decode every prompt greedily on both sides, compare."""
    path = tmp / f"{name}-{dtype}.gguf"
    info = write_gguf(model, tokenizer, path, dtype, force=True)
    ours_model = at_precision(model, dtype)
    ctx = model.config.n_positions
    llm = load_llama(path, ctx)
    equal = tokens = total = 0
    for text in prompts:
        ids = tokenizer.encode(text)[: ctx - n]
        ours = mlxgpt_greedy(ours_model, tokenizer, ids, n)
        theirs = llama_greedy(llm, ids, n)
        k = common_prefix(ours, theirs)  # tokens agreed before the first difference
        equal += k == n
        tokens += k
        total += n
    llm.close()
    path.unlink()
    return Agreement(name, dtype, len(prompts), equal, total, tokens, info.size_bytes / 1e6)


def load_named(name: str) -> tuple[mlxgpt.GPT, object]:
    return random_gpt2_shape() if name == GPT2_SHAPE else mlxgpt.load(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(SHIPPED),
                   help=f"model references, or {GPT2_SHAPE}")
    p.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    args = p.parse_args()
    print("| model | GGUF | MB | prompts identical | tokens agreed |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for dtype in args.dtypes:
                t0 = time.perf_counter()
                model, tok = load_named(name)  # fresh: at_precision changes the weights
                a = measure(name, model, tok, dtype, PROMPTS[: args.prompts], args.tokens,
                            Path(tmp))
                print(a.row(), f"<!-- {time.perf_counter() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
