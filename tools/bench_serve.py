"""Serving throughput: ``mlxgpt serve`` against ``mlx_lm.server`` on the same model folder.

    python tools/bench_serve.py                      # GPT-2 124M shape, random, float32
    python tools/bench_serve.py --model DIR --levels 1,4,16 --tokens 64 --rounds 2

At each concurrency level N, N clients start together, each streaming a completion of
``--tokens`` tokens (greedy, from a short prompt of its own) with the OpenAI client. Reported per
server and level: aggregate generated tokens/s (all tokens / time from the first request to the
last token) and the median time to first token. Servers take turns within each round, so load
changes hit both; figures are medians over rounds. Both servers use the same OpenBLAS (mlx-lm's
through LD_PRELOAD) with the same kernel set and thread settings. JSON on stdout (or --json):
the CPU, the BLAS and its kernel set, the ratios mlxgpt / mlx-lm and 16-client / 1-client.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import httpx
import mlx.core as mx
import openai

from mlxgpt import GPT, GPTConfig
from mlxgpt.checkpoints.folder import save_model
from mlxgpt.cpu import blas
from mlxgpt.tokenizers import gpt2_tokenizer

EOT = 50256


def make_folder(work: Path) -> Path:
    """A random GPT-2 124M-shape model (float32) with GPT-2's tokenizer files."""
    mx.random.seed(0)
    model = GPT(GPTConfig())
    mx.eval(model.parameters())
    return save_model(model, work / "gpt2-124m-random", gpt2_tokenizer())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, folder: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "mlxgpt":
        cmd = [sys.executable, "-m", "mlxgpt", "serve", "--model", str(folder), "--port",
               str(port), "--max-batch", str(max_batch), "--log-level", "warning"]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--port",
               str(port), "--decode-concurrency", str(max_batch), "--log-level", "WARNING"]
    env = dict(os.environ)  # OPENBLAS_CORETYPE etc. as mlxgpt set them in this process
    if kind != "mlxgpt" and blas.preloaded_path:
        # mlx-lm does not preload a BLAS: give it the same library with the same threads, or
        # it runs MLX's reference BLAS (~5 GFLOP/s) and batching buys it nothing
        env["LD_PRELOAD"] = blas.preloaded_path
        if blas.preloaded_library == "BLIS":
            env.setdefault("BLIS_NUM_THREADS", str(blas.blas_threads()))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited: {proc.stderr.read()[-2000:]}")
        try:
            httpx.get(f"{base}/v1/models", timeout=2)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{kind} server did not start in 180 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def one_client(base: str, prompt: str, tokens: int, t0: float) -> tuple[float, float, int]:
    """(time to first token, time of the last token, both from t0; tokens received)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model="default_model", prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        logit_bias={str(EOT): -100})
    first = last = None
    n = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        now = time.perf_counter() - t0
        if chunk.choices[0].text or chunk.choices[0].finish_reason is None:
            n += 1
            first = now if first is None else first
        last = now
    return first, last, n


def level(base: str, clients: int, tokens: int) -> dict[str, float]:
    prompts = [f"Client {i} asks: tell me about the number {i * 7}." for i in range(clients)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_client(base, p, tokens, t0), prompts))
    wall = max(r[1] for r in results)
    total = sum(r[2] for r in results)
    return {"tok_s": total / wall, "ttft_s": statistics.median(r[0] for r in results),
            "tokens": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: random GPT-2 124M)")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", default="mlxgpt,mlx-lm")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    servers = args.servers.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or make_folder(Path(tmp))
        raw: dict[str, dict[int, list[dict]]] = {s: {n: [] for n in levels} for s in servers}
        for r in range(args.rounds):
            for kind in servers if r % 2 == 0 else servers[::-1]:
                proc, base = start(kind, folder, max(levels))
                try:
                    level(base, 1, 8)  # warm up: compile, first allocations
                    for n in levels:
                        res = level(base, n, args.tokens)
                        raw[kind][n].append(res)
                        print(f"round {r} {kind:7s} clients {n:3d}: {res['tok_s']:7.1f} tok/s, "
                              f"ttft {res['ttft_s'] * 1000:6.0f} ms", file=sys.stderr)
                finally:
                    stop(proc)

    table = {kind: {n: {k: statistics.median(x[k] for x in runs) for k in ("tok_s", "ttft_s")}
                    for n, runs in per.items()} for kind, per in raw.items()}
    out = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "blas": blas.blas_in_use(),
        "kernels": blas.kernels_note(),
        "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE"),
        "loadavg": os.getloadavg(),
        "tokens_per_client": args.tokens,
        "table": table,
    }
    if "mlxgpt" in table:
        out["scaling_mlxgpt"] = table["mlxgpt"][max(levels)]["tok_s"] / \
            table["mlxgpt"][min(levels)]["tok_s"]
    if "mlxgpt" in table and "mlx-lm" in table:
        out["ratio_vs_mlx_lm"] = {n: table["mlxgpt"][n]["tok_s"] / table["mlx-lm"][n]["tok_s"]
                                  for n in levels}
    text = json.dumps(out, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
