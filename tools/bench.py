"""Generation speed: mlxgpt against mlx-lm (and transformers + torch) in the same run.

    python tools/bench.py                                  # GPT-2 124M shape, random weights
    python tools/bench.py --model DIR --dtypes float32,q4 --compare mlx-lm,torch --json out.json

For each precision (float32, float16, bfloat16, q8, q4) a model folder is written once and every
implementation runs on that same folder: prefill tokens/s and time to first token for a
512-token prompt, decode tokens/s over 128 generated tokens after a 16-token prompt (greedy),
peak memory. Implementations take turns within each repeat, so a change in machine load hits
them alike; each figure is the median of the repeats. The JSON (stdout, or --json) names the
BLAS MLX uses, the load average and the ratios. ``--profile`` adds where a decode step's time
goes and how many operations one token dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx
import numpy as np

from mlxgpt import GPT, GPTConfig
from mlxgpt.checkpoints.folder import load_model, save_model
from mlxgpt.core.backend import prepare_for_inference
from mlxgpt.cpu import blas
from mlxgpt.generation.cache import KVCache
from mlxgpt.generation.context import Context, compiled_forward
from mlxgpt.generation.decode import generate_tokens
from mlxgpt.generation.sample import SamplingSettings, TokenSampler

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "q8": 8, "q4": 4}


# --------------------------------------------------------------------------- model folders


def make_folders(src: Path | None, names: list[str], work: Path) -> dict[str, Path]:
    """One folder per precision, all from the same float32 weights."""
    if src is None:
        mx.random.seed(0)
        base = GPT(GPTConfig())  # GPT-2 124M shape; random weights time the same as trained
        mx.eval(base.parameters())
    else:
        base = load_model(src, mx.float32)
    folders = {}
    for name in names:
        model = GPT(base.config)
        model.update(base.parameters())  # shares the arrays; the changes below make new ones
        quant = None
        if isinstance(DTYPES[name], int):
            from mlxgpt.checkpoints.quantize import quantize

            quant, _ = quantize(model, DTYPES[name])
        else:
            model.set_dtype(DTYPES[name])
        folders[name] = save_model(model, work / name, None, quantization=quant)
    return folders


# --------------------------------------------------------------------------- implementations


class Impl:
    """An implementation under test: ``first_token(ids)`` -> seconds; ``decode(ids, n)`` ->
    (tokens/s after the first, ids)."""

    name = ""

    def peak_gb(self) -> float | None:
        return mx.get_peak_memory() / 1e9


class MlxgptModel(Impl):
    """mlxgpt's generation on a model already loaded (greedy, through its KV cache)."""

    def __init__(self, name: str, model):
        self.name, self.model = name, model
        self.sampler = TokenSampler(SamplingSettings(temperature=0), model.config.vocab_size)

    def first_token(self, ids: list[int]) -> float:
        t = time.perf_counter()
        next(generate_tokens(Context(self.model), ids, self.sampler, max_tokens=1))
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        stamps, out = [], []
        for tok, _ in generate_tokens(Context(self.model), ids, self.sampler, max_tokens=n):
            stamps.append(time.perf_counter())
            out.append(tok)
        return (n - 1) / (stamps[-1] - stamps[0]), out


class MlxgptImpl(MlxgptModel):
    """mlxgpt on a model folder, prepared for inference as the commands prepare it."""

    def __init__(self, folder: Path, dtype):
        model = load_model(folder, dtype if not isinstance(dtype, int) else None)
        super().__init__("mlxgpt", prepare_for_inference(model))


class MlxLmImpl(Impl):
    name = "mlx-lm"

    def __init__(self, folder: Path, dtype):
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load_model as lm_load

        self.model, _ = lm_load(folder)
        self.step = generate_step

    def first_token(self, ids: list[int]) -> float:
        t = time.perf_counter()
        next(self.step(mx.array(ids), self.model, max_tokens=1))
        return time.perf_counter() - t

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        stamps, out = [], []
        for tok, _ in self.step(mx.array(ids), self.model, max_tokens=n):
            stamps.append(time.perf_counter())
            out.append(int(tok))
        return (n - 1) / (stamps[-1] - stamps[0]), out


def run_torch(folder: Path, dtype: str, long: list[int], short: list[int], n_gen: int,
              repeats: int, work: Path) -> tuple[dict, list[int]]:
    """transformers + torch on the same weights, in a clean process (tools/bench_torch.py)."""
    from mlxgpt.checkpoints.hf import export

    hf = work / "hf-float32"
    if not hf.exists():
        export(folder, hf)
    job = {"folder": str(hf), "dtype": dtype, "long": long, "short": short,
           "gen_tokens": n_gen, "repeats": repeats}
    worker = Path(__file__).with_name("bench_torch.py")
    p = subprocess.run([sys.executable, str(worker)], input=json.dumps(job), text=True,
                       capture_output=True)
    if p.returncode:
        raise SystemExit(f"Error: the torch worker failed:\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout)
    raw = {"ttft_s": r["ttft_s"], "decode_tps": r["decode_tps"], "peak_gb": [None]}
    return raw, r["tokens"]


# --------------------------------------------------------------------------- measuring


def measure(impls: list[Impl], long: list[int], short: list[int], n_gen: int, repeats: int,
            log) -> tuple[dict, dict]:
    """Median over ``repeats`` rounds; in each round every implementation runs once.

    A first, unrecorded round warms up each implementation with the same sizes (traced and
    compiled graphs, kernels, the allocator)."""
    raw = {i.name: {"ttft_s": [], "decode_tps": [], "peak_gb": []} for i in impls}
    tokens = {}
    for impl in impls:
        impl.first_token(long)
        impl.decode(short, n_gen)
    for r in range(repeats):
        for impl in impls:
            mx.reset_peak_memory()
            ttft = impl.first_token(long)
            tps, toks = impl.decode(short, n_gen)
            peak = impl.peak_gb()
            rec = raw[impl.name]
            rec["ttft_s"].append(ttft)
            rec["decode_tps"].append(tps)
            rec["peak_gb"].append(peak)
            tokens[impl.name] = toks
            log(f"  round {r + 1} {impl.name:14s} prefill {len(long) / ttft:7.1f} tok/s  "
                f"decode {tps:6.1f} tok/s")
    return raw, tokens


def summarize(raw: dict[str, dict], tokens: dict[str, list[int]], n_prompt: int) -> dict:
    """Medians per implementation, and whether each produced mlxgpt's greedy tokens."""
    out = {}
    ref = tokens.get("mlxgpt")
    for name, rec in raw.items():
        ttft = statistics.median(rec["ttft_s"])
        peaks = [p for p in rec["peak_gb"] if p is not None]
        out[name] = {
            "prefill_tps": round(n_prompt / ttft, 1),
            "ttft_ms": round(ttft * 1000, 1),
            "decode_tps": round(statistics.median(rec["decode_tps"]), 1),
            "peak_memory_gb": round(max(peaks), 3) if peaks else None,
            "runs": {"ttft_s": [round(x, 4) for x in rec["ttft_s"]],
                     "decode_tps": [round(x, 2) for x in rec["decode_tps"]]},
            # Low precision may legitimately pick other tokens; float32 should not.
            "same_tokens_as_mlxgpt": None if ref is None else tokens[name] == ref,
        }
    return out


def profile_decode(folder: Path, short: list[int]) -> dict:
    """Where a float32 decode step's time goes, and how many operations one token runs."""
    model = prepare_for_inference(load_model(folder, mx.float32))
    ctx = Context(model)
    ctx.prefill(short)
    tok = mx.array([short[-1]], mx.int32)

    def step_time(fn, n=20) -> float:
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1000

    def compiled_step():
        mx.eval(ctx.step(tok))
        ctx.trim(1)

    total = step_time(compiled_step)
    x = {d: mx.random.normal((1, 1, d)) for d in {model.config.n_embd, model.config.hidden_dim}}
    mx.eval(x)
    c, hidden = model.config.n_embd, model.config.hidden_dim
    linears = [(m, x[d]) for b in model.h for m, d in ((b.attn.c_attn, c), (b.attn.c_proj, c),
                                                         (b.mlp.c_fc, c), (b.mlp.c_proj, hidden))]
    mm = step_time(lambda: mx.eval([lin(v) for lin, v in linears]))
    h = x[model.config.n_embd]
    head = step_time(lambda: mx.eval(model.logits(h)))
    with tempfile.TemporaryDirectory() as tmp:
        # Operations one token dispatches, eager vs the compiled step (fused kernels count 1).
        buffers = [a for c in ctx.cache for a in (c.keys, c.values)]
        out = compiled_forward(model)(tok.reshape(1, 1), mx.array(ctx.offset, mx.int32),
                                      mx.array(0), *buffers)
        mx.export_to_dot(os.path.join(tmp, "compiled.dot"), *out)
        del out
        layers = [KVCache(c.keys, c.values, ctx.offset) for c in ctx.cache]
        eager = model.logits(model.hidden(tok[None], layers)[:, -1])
        mx.export_to_dot(os.path.join(tmp, "eager.dot"), eager)
        counts = {k: _dot_ops(os.path.join(tmp, f"{k}.dot")) for k in ("eager", "compiled")}
    return {
        "decode_step_ms": round(total, 2),
        "block_matmuls_ms": round(mm, 2),
        "vocab_projection_ms": round(head, 2),
        "everything_else_ms": round(total - mm - head, 2),
        "ops_per_token_eager": counts["eager"],
        "ops_per_token_compiled": counts["compiled"],
    }


def _dot_ops(path: str) -> int:
    """Primitive nodes in an ``mx.export_to_dot`` graph (arrays are drawn as boxes)."""
    text = Path(path).read_text()
    return sum(1 for line in text.splitlines() if "shape=rectangle" in line)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help="float model folder (default: GPT-2 124M shape, random weights)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16,q8,q4")
    ap.add_argument("--compare", default="mlx-lm",
                    help="comma list of: mlx-lm, torch ('' for mlxgpt alone)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="per-part decode time, ops/token")
    ap.add_argument("--json", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()
    names = [d for d in args.dtypes.split(",") if d]
    for d in names:
        if d not in DTYPES:
            sys.exit(f"Error: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    compare = [c for c in args.compare.split(",") if c]
    for c in compare:
        if c not in ("mlx-lm", "torch"):
            sys.exit(f"Error: unknown --compare {c!r} (mlx-lm, torch)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    result = {
        "command": " ".join(["python", "tools/bench.py", *sys.argv[1:]]),
        "blas": blas.blas_in_use(),
        "kernels": blas.kernels_note(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": [round(x, 2) for x in load_before],
        "prompt_tokens": args.prompt_tokens,
        "decode": f"{args.gen_tokens} tokens after a {args.decode_prompt}-token prompt, greedy",
        "repeats": args.repeats,
        "results": {},
    }
    log(f"BLAS: {result['blas']}; kernels: {result['kernels']}")
    with tempfile.TemporaryDirectory(prefix="mlxgpt-bench-") as tmp:
        folders = make_folders(args.model, names, Path(tmp))
        vocab = load_model(folders[names[0]]).config.vocab_size
        long = rng.integers(0, vocab, args.prompt_tokens).tolist()
        short = rng.integers(0, vocab, args.decode_prompt).tolist()
        for name in names:
            log(f"{name}:")
            impls: list[Impl] = [MlxgptImpl(folders[name], DTYPES[name])]
            if "mlx-lm" in compare:
                impls.append(MlxLmImpl(folders[name], DTYPES[name]))
            raw, tokens = measure(impls, long, short, args.gen_tokens, args.repeats, log)
            del impls
            mx.clear_cache()
            if "torch" in compare and name in ("float32", "bfloat16"):
                log(f"  torch-{name} (own process)")
                key = f"torch-{name}"
                raw[key], tokens[key] = run_torch(folders["float32"] if "float32" in folders
                                                  else folders[name], name, long, short,
                                                  args.gen_tokens, args.repeats, Path(tmp))
            res = summarize(raw, tokens, len(long))
            for other in [k for k in res if k != "mlxgpt"]:
                res[f"mlxgpt/{other}"] = {
                    "prefill": round(res["mlxgpt"]["prefill_tps"] / res[other]["prefill_tps"], 2),
                    "decode": round(res["mlxgpt"]["decode_tps"] / res[other]["decode_tps"], 2),
                }
            result["results"][name] = res
        if "torch" in compare and "float32" in result["results"]:
            ours = result["results"]["float32"]["mlxgpt"]
            for key in ("torch-float32", "torch-bfloat16"):
                theirs = next((r[key] for r in result["results"].values() if key in r), None)
                if theirs:
                    result[f"mlxgpt_float32/{key}"] = {
                        "prefill": round(ours["prefill_tps"] / theirs["prefill_tps"], 2),
                        "decode": round(ours["decode_tps"] / theirs["decode_tps"], 2),
                    }
        if args.profile:
            result["profile_float32"] = profile_decode(folders[names[0]], short)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
