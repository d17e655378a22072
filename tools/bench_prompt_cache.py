"""Time to first token after a long prefix, read with the prompt or taken from a prompt cache.

    python tools/bench_prompt_cache.py                     # GPT-2 124M shape, random, float32
    python tools/bench_prompt_cache.py --prefix 900 --repeats 5 --json out.json

A random GPT-2 124M-shape model (1024 positions, float32) is saved as a model folder with GPT-2's
tokenizer; the prefix is ``--prefix`` tokens of English (this repository's README), written to a
text file and cached with ``mlxgpt cache-prompt``. Then, taking turns, the time to first token of
a 7-token question after the prefix: reading prefix + question, and reading the question after
the cache (the file read and the model check included). Twice: in fresh ``mlxgpt generate``
processes (what a user sees, tracing the compiled forward included) and in one process after a
warm-up (medians of ``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx

from mlxgpt import GPT, GPTConfig
from mlxgpt.checkpoints.folder import save_model
from mlxgpt.checkpoints.load import load
from mlxgpt.core.backend import prepare_for_inference
from mlxgpt.cpu import blas
from mlxgpt.generation.generate import stream_generate
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers import gpt2_tokenizer

QUESTION = " What does this project do?"
ROOT = Path(__file__).resolve().parent.parent


def prefix_text(n_tokens: int) -> str:
    tok = gpt2_tokenizer()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    ids = tok.encode(text)
    while len(ids) < n_tokens:
        ids = ids + ids
    # cut where re-encoding gives the same count (a cut inside a word may merge differently)
    for n in range(n_tokens, n_tokens + 20):
        cut = tok.decode(ids[:n])
        if len(tok.encode(cut)) == n_tokens:
            return cut
    raise SystemExit("could not cut the prefix at a token boundary")


def cli_ttft(*args: str) -> float:
    out = subprocess.run([sys.executable, "-m", "mlxgpt", "generate", *args], text=True,
                         capture_output=True, check=True)
    return float(re.search(r"first token (\d+) ms", out.stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=900, help="Prefix length in tokens.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prompt-cache-"))
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text_out = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text_out + "\n")
    print(text_out)


def measure(args: argparse.Namespace, work: Path) -> dict:
    mx.random.seed(0)
    model = GPT(GPTConfig())  # 124M shape: 12 layers, 768 wide, 1024 positions
    mx.eval(model.parameters())
    folder = save_model(model, work / "gpt2-random", gpt2_tokenizer())
    text = prefix_text(args.prefix)
    (work / "prefix.txt").write_text(text, encoding="utf-8")
    cache = work / "prefix.safetensors"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlxgpt", "cache-prompt", "--model", str(folder),
                    "--prompt", str(work / "prefix.txt"), "--out", str(cache)], check=True)
    make_s = time.perf_counter() - t

    common = ["--model", str(folder), "-n", "1", "--temp", "0"]
    cold = {"prefix": [], "cache": []}
    for _ in range(2):
        cold["prefix"].append(cli_ttft(*common, "--prompt", text + QUESTION))
        cold["cache"].append(cli_ttft(*common, "--prompt", QUESTION, "--prompt-cache",
                                      str(cache)))

    model, tok = load(folder)
    model = prepare_for_inference(model)
    greedy = SamplingSettings(temperature=0)

    def ttft(prompt: str, **kw) -> float:
        rs = stream_generate(model, tok, prompt, max_tokens=1, sampling=greedy, **kw)
        return list(rs)[-1].ttft * 1e3

    ttft(text + QUESTION)
    ttft(QUESTION, prompt_cache=cache)  # warm: every shape traced
    warm = {"prefix": [], "cache": []}
    for _ in range(args.repeats):
        warm["prefix"].append(ttft(text + QUESTION))
        warm["cache"].append(ttft(QUESTION, prompt_cache=cache))
    result = {
        "blas": blas.blas_in_use(), "kernels": blas.kernels_note(), "threads": os.cpu_count(),
        "model": "random GPT-2 124M shape, float32, 1024 positions",
        "prefix_tokens": len(tok.encode(text)), "question_tokens": len(tok.encode(QUESTION)),
        "cache_file_mb": round(cache.stat().st_size / 1e6, 1),
        "cache_prompt_seconds": round(make_s, 2),
        "cold_process_ttft_ms": {k: statistics.median(v) for k, v in cold.items()},
        "warm_ttft_ms": {k: round(statistics.median(v), 1) for k, v in warm.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    for kind in ("cold_process_ttft_ms", "warm_ttft_ms"):
        r = result[kind]
        r["speedup"] = round(r["prefix"] / r["cache"], 2)
    return result


if __name__ == "__main__":
    main()
