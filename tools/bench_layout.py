"""Decode speed of the CPU weight layouts: plain (nn.Linear), one transposed block, column blocks
(OpenBLAS's small-matrix path), on a GPT-2 124M-shape model (random weights), greedy, 64 tokens
after 16; best of 3.

    OPENBLAS_CORETYPE=SkylakeX OPENBLAS_NUM_THREADS=2 python tools/bench_layout.py

It also says which layout ``prepare_for_inference`` picks here (timed on one single-row matmul;
blocks only where the loaded kernels have the small-matrix path). Blocks on kernels without that
path run as one packed sgemm per block: slow, and measured here only for the comparison.
"""

from __future__ import annotations

import time

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx

from mlxgpt import GPT, GPTConfig
from mlxgpt.cpu import blas
from mlxgpt.cpu.layout import LAYOUTS, block_weights, choose_layout, layout_limit
from mlxgpt.generation.context import Context
from mlxgpt.generation.decode import generate_tokens
from mlxgpt.generation.sample import SamplingSettings, TokenSampler


def decode_tps(model: GPT, new: int = 64, repeats: int = 3) -> float:
    sampler = TokenSampler(SamplingSettings(temperature=0), model.config.vocab_size)
    best = 0.0
    for _ in range(repeats):
        start, n = None, 0
        for _tok, _ in generate_tokens(Context(model), list(range(16)), sampler,
                                       max_tokens=new + 1):
            start = start or time.perf_counter()  # from the first token: decode only
            n += 1
        best = max(best, (n - 1) / (time.perf_counter() - start))
    return best


def main() -> None:
    weights = GPT(GPTConfig()).parameters()
    mx.eval(weights)
    results = {}
    for layout in LAYOUTS:
        model = GPT(GPTConfig())
        model.update(weights)
        model.eval()
        if layout != "plain":
            block_weights(model, layout_limit(layout))
        results[layout] = decode_tps(model)
    cfg = GPTConfig()
    print(f"{blas.kernels_note()}: "
          + ", ".join(f"{k} {v:.1f} tok/s" for k, v in results.items())
          + f"; prepare_for_inference picks: {choose_layout(cfg.n_embd, cfg.hidden_dim)}")


if __name__ == "__main__":
    main()
