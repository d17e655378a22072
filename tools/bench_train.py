"""Training speed: mlxgpt's training step vs a PyTorch CPU implementation of the same model.

Both sides train the same GPT-2 architecture (biases, tied embeddings, tanh GELU, pre-LN) from
the same initial weights on the same batches: forward + backward + gradient clipping + AdamW
(no decay on biases/norms). The mlxgpt side is the exact step ``mlxgpt pretrain`` runs
(:class:`mlxgpt.training.step.Stepper` with :func:`mlxgpt.training.loss.lm_loss`: on the CPU the
native C pass, :mod:`mlxgpt.training.native_pass`), and the same step through MLX's graph
(``MLXGPT_NATIVE_TRAINING=0``) in the same run; the torch side
is plain eager PyTorch (``F.scaled_dot_product_attention``, ``torch.optim.AdamW``). Timings are
interleaved (MLX steps, torch steps, MLX steps, ...) so both see the same machine load; each
figure is the median over rounds.

MFU = model FLOPs/s (6 N + 12 L T C per token, as nanoGPT counts them) divided by the best
single-matmul FLOP/s measured in the same run (a 2048^3 sgemm, torch and MLX, best of both):
"share of what this machine's BLAS can do", not of a datasheet peak.

    python tools/bench_train.py                     # baby (4/4/128 T64 B12) and small (6/6/384)
    python tools/bench_train.py --only baby --rounds 5
    python tools/bench_train.py --profile           # where MLX's step time goes (baby config)

torch is an optional benchmark dependency: pip install 'mlxgpt[bench]'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import mlxgpt  # noqa: F401  (preloads the fast BLAS: must come before mlx)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxgpt import GPT, GPTConfig
from mlxgpt.core.backend import ARITHMETIC, FUSED, Kernels, backend
from mlxgpt.cpu import blas, parallel
from mlxgpt.training.config import TrainConfig
from mlxgpt.training.distributed import world
from mlxgpt.training.loss import lm_loss
from mlxgpt.training.native_pass import NATIVE_ENV
from mlxgpt.training.optim import make_optimizer
from mlxgpt.training.pretrain import init_weights
from mlxgpt.training.step import Stepper

CONFIGS = {
    # name: (n_layer, n_head, n_embd, block, batch)
    "baby": (4, 4, 128, 64, 12),
    "small": (6, 6, 384, 256, 64),
}
VOCAB = 257  # the byte tokenizer


# --------------------------------------------------------------------------- torch side


def torch_gpt(cfg: GPTConfig, weights: dict[str, np.ndarray], dropout: float):
    """A minimal eager PyTorch GPT-2 (nanoGPT-style) holding the MLX model's weights."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    C, H = cfg.n_embd, cfg.n_head

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(C), tnn.LayerNorm(C)
            self.c_attn, self.attn_proj = tnn.Linear(C, 3 * C), tnn.Linear(C, C)
            self.c_fc, self.mlp_proj = tnn.Linear(C, 4 * C), tnn.Linear(4 * C, C)
            self.drop = tnn.Dropout(dropout)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.drop(self.attn_proj(y.transpose(1, 2).reshape(B, T, C)))
            h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
            return x + self.drop(self.mlp_proj(h))

    class Model(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte = tnn.Embedding(cfg.vocab_size, C)
            self.wpe = tnn.Embedding(cfg.n_positions, C)
            self.h = tnn.ModuleList([Block() for _ in range(cfg.n_layer)])
            self.ln_f = tnn.LayerNorm(C)
            self.drop = tnn.Dropout(dropout)

        def forward(self, idx, targets):
            pos = torch.arange(idx.shape[1])
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = Model()
    rename = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_proj", "mlp.c_fc": "c_fc",
              "mlp.c_proj": "mlp_proj"}
    state = {}
    for k, v in weights.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = torch.from_numpy(np.array(v))
    model.load_state_dict(state, strict=True)
    return model


def torch_stepper(model, tcfg: TrainConfig):
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))

    def step(x, y) -> float:
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return loss.item()

    return step


# --------------------------------------------------------------------------- measuring


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    n = n_params - cfg.n_positions * cfg.n_embd  # position embeddings do no matmul work
    return 6 * n + 12 * cfg.n_layer * cfg.n_positions * cfg.n_embd


def peak_sgemm(framework: str) -> float:
    """FLOP/s of a 2048^3 float32 matmul in this process, best of 3."""
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    if framework == "mlx":
        ma = mx.array(a)

        def mm():
            mx.eval(ma @ ma)
    else:
        import torch

        ta = torch.from_numpy(a)

        def mm():
            ta @ ta
    mm()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def setup(name: str, dropout: float, kernels: Kernels | None = None):
    L, H, C, T, B = CONFIGS[name]
    cfg = GPTConfig(vocab_size=VOCAB, n_positions=T, n_embd=C, n_layer=L, n_head=H,
                    dropout=dropout)
    model = GPT(cfg, kernels or backend().kernels)
    init_weights(model, 0)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, VOCAB, size=(8, B, T + 1)).astype(np.int32)  # 8 distinct batches
    return cfg, model, rows


def run_worker(framework: str, name: str, steps: int, dropout: float, threads: int = 0) -> dict:
    """Warm up (compile) then time ``steps`` training steps in this process."""
    cfg, model, rows = setup(name, dropout)
    tcfg = TrainConfig(steps=10**6, warmup=0, lr=1e-3, min_lr=1e-3)
    n_batches = len(rows)
    if framework == "mlx":
        opt = make_optimizer(tcfg)
        opt.init(model.trainable_parameters())
        model.train()
        stepper = Stepper(model, lm_loss, opt, tcfg, world())
        batches = [(mx.array(r[:, :-1]), mx.array(r[:, 1:])) for r in rows]

        def one(i: int) -> float:
            mx.random.seed(i)
            loss, _, _ = stepper.step([batches[i % n_batches]])
            mx.eval(loss, stepper.state)
            return loss.item()
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
        tmodel = torch_gpt(cfg, weights, dropout)
        tmodel.train()
        tstep = torch_stepper(tmodel, tcfg)
        batches = [(torch.from_numpy(r[:, :-1].astype(np.int64)),
                    torch.from_numpy(r[:, 1:].astype(np.int64))) for r in rows]

        def one(i: int) -> float:
            return tstep(*batches[i % n_batches])

    sgemm = peak_sgemm(framework)
    first = one(0)  # compiles on the MLX side
    one(1)
    t = time.perf_counter()
    for i in range(steps):
        one(2 + i)
    return {"step_s": (time.perf_counter() - t) / steps, "first_loss": first, "sgemm": sgemm,
            "tokens": rows.shape[1] * (rows.shape[2] - 1), "n_params": model.n_params}


# name: (framework, torch threads, environment). "mlx-1stream": the batch not split over the
# cores (one native worker or CPU stream; the BLAS's threads as training sets them: BLIS one,
# OpenBLAS all), as before mlxgpt split batches (mlxgpt/cpu/parallel.py); "mlx-graph": the
# step through MLX's graph, without the native C pass (mlxgpt/training/native_pass.py); both
# in the same run.
VARIANTS = {"mlx": ("mlx", 0, {}), "mlx-1stream": ("mlx", 0, {parallel.STREAMS_ENV: "1"}),
            "mlx-graph": ("mlx", 0, {NATIVE_ENV: "0"}),
            "torch-1t": ("torch", 1, {}), "torch-2t": ("torch", 2, {})}


def bench_config(name: str, steps: int, rounds: int, dropout: float) -> dict:
    """Alternate worker processes: MLX, torch on 1 thread, torch on 2 threads, MLX, ...

    Separate processes keep each framework's thread pools (OpenBLAS, OpenMP) from spinning
    while the other works; alternating them spreads the machine's load evenly. torch runs with
    1 and with 2 threads because on a busy machine its 2-thread OpenMP barriers can lose to
    1 thread; the comparison is against the faster of the two.
    """
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    info: dict[str, dict] = {}
    sgemm: dict[str, float] = {"mlx": 0.0, "torch": 0.0}
    for _ in range(rounds):
        for variant, (fw, threads, extra) in VARIANTS.items():
            env = {**os.environ, **extra}
            if fw == "torch":  # MLX only initialises weights there: keep its BLAS out of the way
                env[blas.DISABLE_ENV] = "1"
            cmd = [sys.executable, __file__, "--worker", fw, "--only", name, "--steps",
                   str(steps), "--dropout", str(dropout), "--threads", str(threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"{variant} worker failed:\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[variant].append(res["step_s"])
            sgemm[fw] = max(sgemm[fw], res["sgemm"])
            info[variant] = res
    return {"name": name, "cfg": setup(name, dropout)[0], "tokens": info["mlx"]["tokens"],
            "step_s": {v: statistics.median(t) for v, t in times.items()},
            "n_params": info["mlx"]["n_params"], "sgemm": sgemm,
            "first_loss": {v: r["first_loss"] for v, r in info.items()}}


def profile(name: str, steps: int) -> None:
    """Time the pieces of MLX's graph step with each set of model kernels (arithmetic-only and
    fused), and of the native pass's step, all with the BLAS set as training sets it (one
    thread per stream or worker; BLIS packing)."""
    for kernels in (FUSED, ARITHMETIC):
        for dropout in (0.0, 0.2):
            for label, ms in _profile_parts(name, dropout, steps, kernels):
                print(f"{name} kernels={kernels.name:10} dropout={dropout}: {label:34s} "
                      f"{ms:8.2f} ms")


def _profile_parts(name: str, dropout: float, steps: int,
                   kernels: Kernels) -> list[tuple[str, float]]:
    cfg, model, rows = setup(name, dropout, kernels)
    model.train()
    x, y = mx.array(rows[0, :, :-1]), mx.array(rows[0, :, 1:])
    tcfg = TrainConfig(steps=10**6, warmup=0)
    opt = make_optimizer(tcfg)
    opt.init(model.trainable_parameters())
    state = [model.state, opt.state, mx.random.state]
    vg = nn.value_and_grad(model, lm_loss)
    fwd = mx.compile(lambda x, y: lm_loss(model, x, y)[0], inputs=state, outputs=state)
    fwd_bwd = mx.compile(lambda x, y: vg(model, x, y), inputs=state, outputs=state)
    grads = vg(model, x, y)[1]
    mx.eval(grads)
    upd = mx.compile(lambda g: opt.update(model, g), inputs=state, outputs=state)
    stepper = Stepper(model, lm_loss, opt, tcfg, world())  # the native pass where it applies
    saved = os.environ.get(NATIVE_ENV)
    os.environ[NATIVE_ENV] = "0"
    graph = Stepper(model, lm_loss, opt, tcfg, world())
    os.environ.pop(NATIVE_ENV) if saved is None else os.environ.update({NATIVE_ENV: saved})

    def gradients_only() -> None:  # MLX's step as it runs (every stream), without the update
        mx.eval(graph.accumulators([(x, y)]))

    parts = {
        "graph: forward (one stream)": lambda: mx.eval(fwd(x, y)),
        "graph: forward+backward (1 stream)": lambda: mx.eval(fwd_bwd(x, y)),
        "graph: AdamW update (one stream)": lambda: (upd(grads), mx.eval(state)),
        "graph: step without the update": gradients_only,
        "graph: whole step": lambda: mx.eval(graph.step([(x, y)]), graph.state),
    }
    if stepper.native is not None:
        sums = stepper.native.sums([(x, y)])
        parts["native: forward+backward"] = lambda: stepper.native.sums([(x, y)])
        if stepper.native_update is not None:
            parts["native: AdamW update"] = lambda: mx.eval(stepper.native_update(*sums),
                                                            stepper.state)
        parts["native: whole step"] = lambda: mx.eval(stepper.step([(x, y)]), stepper.state)
    out = []
    with blas.training_threads(stepper.split):  # the BLAS as training sets it, for every part
        for label, f in parts.items():
            f()
            f()
            best = math.inf
            for _ in range(steps):  # the fastest call: the one least disturbed by other processes
                t = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t)
            out.append((label, best * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(CONFIGS), help="one configuration")
    ap.add_argument("--steps", type=int, default=0, help="steps per round (default per config)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--profile", action="store_true", help="break MLX's step down instead")
    ap.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = run_worker(args.worker, args.only, args.steps, args.dropout, args.threads)
        print(json.dumps(res))
        return
    import torch

    print(f"mlx {mx.__version__}, device {mx.default_device()}; BLAS: {blas.blas_in_use()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}")
    if args.profile:
        profile(args.only or "baby", args.steps or 10)
        return
    names = [args.only] if args.only else list(CONFIGS)
    rows = []
    for name in names:
        steps = args.steps or (20 if name == "baby" else 2)
        rows.append(bench_config(name, steps, args.rounds, args.dropout))
    peak_m = max(r["sgemm"]["mlx"] for r in rows)
    peak_t = max(r["sgemm"]["torch"] for r in rows)
    peak = max(peak_m, peak_t)
    print(f"sgemm 2048^3: mlx {peak_m / 1e9:.0f} GFLOP/s, torch {peak_t / 1e9:.0f} GFLOP/s "
          f"(MFU is against the best)")
    print("| config | tokens/step | mlxgpt tok/s | mlxgpt 1 worker | MLX graph | torch 1 thread | "
          "torch 2 threads | mlxgpt / best torch | MLX graph / best torch | mlxgpt MFU | "
          "best torch MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = r["cfg"]
        fpt = flops_per_token(cfg, r["n_params"])
        tok_s = {v: r["tokens"] / t for v, t in r["step_s"].items()}
        best = max(tok_s["torch-1t"], tok_s["torch-2t"])
        label = (f"{r['name']} {cfg.n_layer}/{cfg.n_head}/{cfg.n_embd} T{cfg.n_positions} "
                 f"B{r['tokens'] // cfg.n_positions}")
        print(f"| {label} | {r['tokens']} | {tok_s['mlx']:,.0f} | {tok_s['mlx-1stream']:,.0f} | "
              f"{tok_s['mlx-graph']:,.0f} | {tok_s['torch-1t']:,.0f} | "
              f"{tok_s['torch-2t']:,.0f} | {tok_s['mlx'] / best:.2f}x | "
              f"{tok_s['mlx-graph'] / best:.2f}x | "
              f"{tok_s['mlx'] * fpt / peak:.1%} | {best * fpt / peak:.1%} |")
    for r in rows:
        losses = ", ".join(f"{v} {x:.5f}" for v, x in r["first_loss"].items())
        print(f"first-step loss on the same weights and batch, {r['name']}: {losses}")


if __name__ == "__main__":
    main()
