"""The training step's matmuls one by one: GFLOP/s of MLX's BLAS against torch's, one thread.

For a ``tools/bench_train.py`` configuration, the matrix products one CPU stream runs in a step
(forward, input gradient, weight gradient of every linear layer, and the tied head), at the
stream's share of the batch's tokens, each timed alone; MLX and torch in separate processes (each
framework's BLAS loads on its own). Shows which shapes and operand orders a BLAS is slow on (BLIS:
products whose first operand is transposed, i.e. every weight gradient).

    python tools/bench_matmul.py --config baby
    OPENBLAS_CORETYPE=Prescott python tools/bench_matmul.py   # BLIS stands in (see README)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

# (name, M, K, N, first operand transposed, second operand transposed)
Shape = tuple[str, int, int, int, bool, bool]


def step_shapes(config: str, streams: int) -> list[Shape]:
    """The products of one stream's training step for ``config`` (tools/bench_train.py)."""
    from bench_train import CONFIGS, VOCAB  # beside this script (imports mlx: kept lazy)

    _, _, C, T, B = CONFIGS[config]
    M = B * T // streams  # tokens per stream
    out: list[Shape] = []
    for name, n_in, n_out in (("c_attn", C, 3 * C), ("attn c_proj", C, C), ("c_fc", C, 4 * C),
                              ("mlp c_proj", 4 * C, C)):
        out += [(f"{name} forward x @ W.T", M, n_in, n_out, False, True),
                (f"{name} input grad dY @ W", M, n_out, n_in, False, False),
                (f"{name} weight grad dY.T @ X", n_out, M, n_in, True, False)]
    out.append(("head forward x @ wte.T", M, C, VOCAB, False, True))
    return out


def time_shapes(framework: str, shapes: list[Shape], repeats: int) -> dict:
    """Seconds per product (the best of ``repeats`` batches of 50 calls), and the BLAS that ran
    them as this process loaded it."""
    import numpy as np

    if framework == "mlx":
        import mlxgpt  # noqa: F401  (preloads the BLAS: must come before mlx)

        # isort: split
        import mlx.core as mx

        from mlxgpt.cpu import blas

        library = blas.blas_in_use()
    else:
        import torch

        torch.set_num_threads(1)
        library = "its own (MKL)"
    rng = np.random.default_rng(0)
    out = []
    for _, M, K, N, ta, tb in shapes:
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        if framework == "mlx":
            A, B = mx.array(a), mx.array(b)
            A, B = (A.T if ta else A), (B.T if tb else B)

            def run(A=A, B=B):
                mx.eval(A @ B)
        else:
            A, B = torch.from_numpy(a), torch.from_numpy(b)
            A, B = (A.T if ta else A), (B.T if tb else B)

            def run(A=A, B=B):
                A @ B
        # as a training stream runs them: one BLAS thread, BLIS packing both operands
        with blas.threads(1) if framework == "mlx" else nullcontext():
            for _ in range(5):
                run()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(50):
                    run()
                best = min(best, (time.perf_counter() - t) / 50)
        out.append(best)
    return {"seconds": out, "blas": library}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="baby", help="a tools/bench_train.py configuration")
    ap.add_argument("--streams", type=int, default=2, help="streams the batch is split over")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    # the environment as given: importing mlxgpt (bench_train does) writes its BLAS choices into it
    one_thread = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1"}
    shapes = step_shapes(args.config, args.streams)
    if args.worker:
        print(json.dumps(time_shapes(args.worker, shapes, args.repeats)))
        return
    from mlxgpt.cpu import blas

    # torch's worker keeps mlxgpt's BLAS out (bench_train imports mlxgpt): torch brings its own
    envs = {"mlx": one_thread, "torch": {**one_thread, blas.DISABLE_ENV: "1"}}
    result = {}
    for fw, env in envs.items():
        cmd = [sys.executable, __file__, "--worker", fw, "--config", args.config,
               "--streams", str(args.streams), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{fw} worker failed:\n{out.stderr[-2000:]}")
        result[fw] = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = {fw: r["seconds"] for fw, r in result.items()}
    print(f"{args.config}, one stream of {args.streams}, one thread; MLX BLAS: "
          f"{result['mlx']['blas']}; torch: {result['torch']['blas']}")
    print("| product | M x K x N | MLX GFLOP/s | torch GFLOP/s |")
    print("|---|---|---|---|")
    flops = [2 * M * K * N for _, M, K, N, _, _ in shapes]
    for (name, M, K, N, _, _), f, tm, tt in zip(shapes, flops, seconds["mlx"], seconds["torch"],
                                                 strict=True):
        print(f"| {name} | {M} x {K} x {N} | {f / tm / 1e9:.1f} | {f / tt / 1e9:.1f} |")
    total = {fw: f"{sum(flops) / sum(t) / 1e9:.1f} ({sum(t) * 1e3:.2f} ms)"
             for fw, t in seconds.items()}
    print(f"| one layer's and the head's, together | | {total['mlx']} | {total['torch']} |")


if __name__ == "__main__":
    main()
