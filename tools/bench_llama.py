"""Speed on the real pretrained model (SmolLM2-135M-Instruct), side by side in one run:
mlxgpt, llama.cpp (``llama-cpp-python``) on the same GGUF file (the Q4_1 original and an F16
export), mlx-lm on the converted folder and transformers + torch, all on this machine's CPU.

    python tools/bench_llama.py                        # fetches smollm2 on first use
    python tools/bench_llama.py --repeats 5 --json out.json --skip torch

For each: prefill tokens/s and time to the first token for a 512-token prompt, decode tokens/s
over 64 greedy tokens after a 16-token prompt. Implementations take turns within each repeat
(machine load hits them alike); figures are medians. mlxgpt and mlx-lm run float32 (the
dequantized Q4_1 weights; on a CPU mlxgpt dequantizes because float32 matmuls are faster there,
see the backend record's ``keep_quantized``); ``mlxgpt-q4`` keeps MLX's 4-bit layers, to show
what the quantized path costs on this CPU. llama.cpp gets as many threads as the machine has cores.
The JSON names the CPU, the BLAS MLX uses and its kernel set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from bench import Impl, MlxgptModel, MlxLmImpl, measure, run_torch, summarize  # noqa: E402

from mlxgpt.checkpoints.fetch import fetch  # noqa: E402
from mlxgpt.checkpoints.folder import save_model  # noqa: E402
from mlxgpt.checkpoints.gguf import write_gguf  # noqa: E402
from mlxgpt.checkpoints.gguf_llama import read_llama_gguf  # noqa: E402
from mlxgpt.core.backend import Backend, backend, quantized_seconds  # noqa: E402
from mlxgpt.cpu import blas  # noqa: E402


class LlamaCpp(Impl):
    def __init__(self, name: str, path: Path):
        import llama_cpp

        self.name = name
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, verbose=False,
                                   n_threads=os.cpu_count(), n_threads_batch=os.cpu_count())

    def peak_gb(self) -> float | None:
        return None

    def first_token(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        self.llm.sample(temp=0.0)
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(ids)
        out, stamps = [], []
        for _ in range(n):
            out.append(self.llm.sample(temp=0.0))
            stamps.append(time.perf_counter())
            if len(out) < n:
                self.llm.eval([out[-1]])
        return (n - 1) / (stamps[-1] - stamps[0]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma-separated: llama.cpp, mlx-lm, torch, q4")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    gguf_path = fetch("smollm2", progress=log)
    work = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    dense, tok = read_llama_gguf(gguf_path, mx.float32)
    text = (Path(__file__).parents[1] / "tests" / "data" / "english_sample.txt").read_text()
    ids = tok.encode(text)
    long, short = ids[: args.prompt_tokens], ids[1000:1016]
    impls: list[Impl] = [MlxgptModel("mlxgpt", dense)]
    if "q4" not in skip:
        kept = Backend(mx.cpu, force_quantized=True)  # MLX's own 4-bit layers
        impls.append(MlxgptModel("mlxgpt-q4",
                                 read_llama_gguf(gguf_path, mx.float32, backend=kept)[0]))
    folder = save_model(dense, work / "float32", tok)  # mlx-lm and transformers read it as is
    if "mlx-lm" not in skip:
        impls.append(MlxLmImpl(folder, None))
    if "llama.cpp" not in skip:
        f16 = work / "f16.gguf"
        write_gguf(dense, tok, f16, "f16")
        impls += [LlamaCpp("llama.cpp-q4_1", gguf_path), LlamaCpp("llama.cpp-f16", f16)]
    log(f"BLAS: {blas.blas_in_use()}; kernels: {blas.kernels_note()}; "
        f"keep_quantized here: {backend().keep_quantized} {quantized_seconds()}")
    raw, tokens = measure(impls, long, short, args.gen_tokens, args.repeats, log)
    if "torch" not in skip:
        raw["torch"], tokens["torch"] = run_torch(folder, "float32", long, short,
                                                  args.gen_tokens, args.repeats, work)
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF; float32 = its dequantized weights)",
        "cpu": blas.cpu_model() or platform.processor(),
        "cores": os.cpu_count(),
        "blas": blas.blas_in_use(),
        "kernels": blas.kernels_note(),
        "mlx": mx.__version__,
        "prompt_tokens": len(long),
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "results": summarize(raw, tokens, len(long)),
    }
    ref = result["results"]["mlxgpt"]
    for r in result["results"].values():
        r["prefill_vs_mlxgpt"] = round(r["prefill_tps"] / ref["prefill_tps"], 2)
        r["decode_vs_mlxgpt"] = round(r["decode_tps"] / ref["decode_tps"], 2)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
