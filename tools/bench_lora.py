"""LoRA fine-tuning benchmark: trainable share, peak memory vs full fine-tuning, speed vs mlx-lm.

On the GPT-2 124M shape (random weights: speed and memory do not depend on the values), with
batch 4 x 512 tokens of Shakespeare, three short runs, each in its own process so each peak is
its own:

- ``mlxgpt-lora``: ``mlxgpt finetune`` (rank 8, alpha 16, c_attn, all 12 layers)
- ``mlx_lm-lora``: mlx-lm's own LoRA trainer (``mlx_lm.lora``'s ``train_model``) on the SAME model
  folder and data files, same rank, scale 2 (= alpha / rank), keys, layers, batch and length
- ``mlxgpt-full``: ``mlxgpt finetune --full``
- ``mlxgpt-lora-ckpt``, ``mlxgpt-full-ckpt``: both again with ``--grad-checkpoint`` (a couple of
  steps: peak memory only)

Tokens/s counts the loss tokens (padding excluded), as mlx-lm does, over the steps after the
first report window (compilation excluded). On a shared machine wall-clock speed swings with
other load, so the speed runs alternate and the ratio is also given from each process's CPU time
per step (``time.process_time``, all its threads). Both trainers run with the same BLAS (this
process and each worker import mlxgpt first, which preloads OpenBLAS); it is printed with the
results.

    python tools/bench_lora.py                 # ~5 minutes on 2 CPU cores
    python tools/bench_lora.py --steps 20 --window 10
    python tools/bench_lora.py --smollm2 --seq 128 --speed-only   # the real model (fetched)

``--smollm2``: SmolLM2-135M-Instruct (its float32 weights, converted once) instead, both trainers
with LoRA on every linear layer of the last 16 blocks (mlxgpt's and mlx-lm's default), and a
third peer in the speed runs: ``peft-lora``, transformers' ``LlamaForCausalLM`` on the same folder
with PEFT's LoRA on the same layers (rank, alpha, no dropout), torch's AdamW at the same learning
rate, on the same token rows (tokenized once, by mlxgpt), in float32 with torch's own threads.
Every worker also reports its process's peak resident memory (``ru_maxrss``: weights, optimizer
and activations, whatever allocates them), the one figure all three measure alike; MLX's peak is
its allocator's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import mlxgpt  # noqa: F401  (preloads OpenBLAS before mlx)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "shakespeare.txt"
SEQ = 512  # tokens per example, end-of-text included
BATCH = 4
RANK, ALPHA = 8, 16.0
KINDS = ["mlxgpt-lora", "mlx_lm-lora", "mlxgpt-full", "mlxgpt-lora-ckpt", "mlxgpt-full-ckpt",
         "peft-lora"]
# What each family's LoRA adapts: GPT-2's c_attn in every block, or (SmolLM2) every linear layer
# of the last 16 blocks.
LLAMA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def make_inputs(work: Path, corpus: Path, n_lines: int = 64,
                smollm2: bool = False) -> tuple[Path, Path]:
    """A model folder (GPT-2 124M shape, random; or SmolLM2 in float32) and JSONL files of texts
    that tokenize to SEQ - 1 tokens."""
    import mlx.core as mx

    from mlxgpt import GPT, GPTConfig
    from mlxgpt.checkpoints.folder import save_model
    from mlxgpt.tokenizers import gpt2_tokenizer

    model_dir, data_dir = work / "model", work / "data"
    if smollm2:
        model, tok = mlxgpt.load("smollm2", dtype="float32")
        if not model_dir.exists():
            save_model(model, model_dir, tok)
    else:
        tok = gpt2_tokenizer()
    if not model_dir.exists():
        mx.random.seed(0)
        save_model(GPT(GPTConfig()), model_dir, tok)
    data_dir.mkdir(exist_ok=True)
    ids = tok.encode(corpus.read_text(encoding="utf-8")[: 400 * n_lines * 5])
    lines, k = [], 0
    while len(lines) < n_lines and k + SEQ < len(ids):
        text = tok.decode(ids[k : k + SEQ - 1])
        k += SEQ - 1
        if len(tok.encode(text)) == SEQ - 1:  # + end-of-text = SEQ in both trainers
            lines.append(json.dumps({"text": text}))
    for name, part in (("train", lines), ("valid", lines[:BATCH])):
        (data_dir / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return model_dir, data_dir


def worker_mlxgpt(model: str, data: str, out: str, steps: int, window: int, full: bool,
                  ckpt: bool, llama: bool = False) -> dict:
    import mlx.core as mx

    from mlxgpt.checkpoints.adapters.lora import LoRAConfig
    from mlxgpt.training.config import TrainConfig
    from mlxgpt.training.finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        model=model, data=data, out=out, batch_size=BATCH, max_seq_len=SEQ, force=True,
        grad_checkpoint=ckpt,
        lora=None if full else LoRAConfig(rank=RANK, alpha=ALPHA, targets=(
            tuple(LLAMA_KEYS) if llama else ("c_attn",)), layers="last:16" if llama else "all"),
        train=lambda n: TrainConfig(steps=steps, lr=2e-5 if full else 1e-4, min_lr=0.0,
                                    warmup=0, weight_decay=0.0, eval_every=0,
                                    log_every=window, save_every=10**9),
    )
    # CPU seconds of this process at the start of every step (the loop asks for the batch).
    from mlxgpt.data import examples as sft

    cpu_at: dict[int, float] = {}
    real_batch = sft.Batches.batch

    def timed_batch(self, index):
        if len(self.examples) > BATCH:  # the train set
            cpu_at.setdefault(index, time.process_time())
        return real_batch(self, index)

    sft.Batches.batch = timed_batch
    lines: list[str] = []
    finetune(opts, echo=lines.append)
    log = [json.loads(s) for s in (Path(out) / "log.jsonl").read_text().splitlines()]
    windows = [r for r in log if "tok_per_s" in r]
    # Steps window+1 .. steps-1 (the last step is followed by evaluation and saving).
    cpu = (cpu_at[steps - 1] - cpu_at[window]) / max(1, steps - 1 - window)
    return {"tok_per_s": windows[-1]["tok_per_s"], "peak_bytes": mx.get_peak_memory(),
            "cpu_s_per_step": cpu,
            "trainable": next(s for s in lines if s.startswith("trainable"))}


def worker_mlx_lm(model: str, data: str, out: str, steps: int, window: int,
                  llama: bool = False) -> dict:
    import mlx.core as mx
    from mlx_lm import lora as mlx_lm_lora
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.utils import load

    reports: list[dict] = []

    class Capture(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            reports.append({**info, "cpu": time.process_time()})

    args = dict(mlx_lm_lora.CONFIG_DEFAULTS)
    args.update(model=model, data=data, train=True, adapter_path=out, iters=steps,
                batch_size=BATCH, max_seq_length=SEQ, num_layers=16 if llama else 12,
                learning_rate=1e-4,
                steps_per_report=window, steps_per_eval=10**9, val_batches=1,
                save_every=10**9,
                lora_parameters={"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                 "keys": LLAMA_KEYS if llama else ["attn.c_attn"]})
    args = types.SimpleNamespace(**args)
    m, tokenizer = load(model)
    train_set, valid_set, _ = mlx_lm_lora.load_dataset(args, tokenizer)
    mx.reset_peak_memory()
    mlx_lm_lora.train_model(args, m, train_set, valid_set, Capture())
    cpu = (reports[-1]["cpu"] - reports[-2]["cpu"]) / window  # steps window+1 .. 2*window
    return {"tok_per_s": reports[-1]["tokens_per_second"], "peak_bytes": mx.get_peak_memory(),
            "cpu_s_per_step": cpu}


def worker_peft(model: str, data: str, steps: int, window: int) -> dict:
    """transformers + PEFT LoRA on the same folder and token rows (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlxgpt.checkpoints.folder import read_folder_meta
    from mlxgpt.tokenizers.load import load_tokenizer

    tok = load_tokenizer(Path(model), read_folder_meta(model).get("tokenizer"))
    rows = [tok.encode(json.loads(line)["text"]) + [tok.eot_id]
            for line in (Path(data) / "train.jsonl").read_text().splitlines() if line.strip()]
    assert all(len(r) == SEQ for r in rows), "rows must be SEQ tokens, as the others train on"
    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    n_layer = base.config.num_hidden_layers
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                     target_modules=[k.split(".")[-1] for k in LLAMA_KEYS],
                     layers_to_transform=list(range(max(0, n_layer - 16), n_layer)))
    m = get_peft_model(base, cfg)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.0)
    batch_tokens = BATCH * (SEQ - 1)  # loss tokens per step, as the MLX trainers count them
    marks: list[tuple[float, float]] = []  # (wall, CPU) at the start of every step
    for step in range(steps + 1):
        marks.append((time.perf_counter(), time.process_time()))
        if step == steps:
            break
        batch = torch.tensor([rows[(step * BATCH + i) % len(rows)] for i in range(BATCH)])
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # The steps after the first window, as for the MLX trainers.
    wall = marks[steps][0] - marks[window][0]
    cpu = (marks[steps][1] - marks[window][1]) / (steps - window)
    return {"tok_per_s": batch_tokens * (steps - window) / wall, "peak_bytes": None,
            "cpu_s_per_step": cpu}


def run_worker(kind: str, model: Path, data: Path, work: Path, steps: int, window: int,
               llama: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--data", str(data),
           "--out", str(work / f"out-{kind}"), "--steps", str(steps), "--window", str(window),
           "--seq", str(SEQ), *(["--smollm2"] if llama else [])]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if r.returncode != 0:
        sys.exit(f"worker {kind} failed (exit {r.returncode}):\n{r.stdout[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    global SEQ  # --seq sets it for this process and its workers
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--window", type=int, default=5, help="steps per timing window")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--repeats", type=int, default=2,
                    help="alternating mlxgpt / mlx_lm speed runs")
    ap.add_argument("--speed-only", action="store_true", help="skip the memory-only runs")
    ap.add_argument("--memory-only", action="store_true",
                    help="only peak memory: every run for --ckpt-steps steps, no mlx-lm")
    ap.add_argument("--ckpt-steps", type=int, default=2,
                    help="steps of the --grad-checkpoint runs (memory only)")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (see above)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per example")
    ap.add_argument("--worker", choices=KINDS)
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    SEQ = args.seq
    if args.steps < 2 * args.window and not args.memory_only:
        ap.error("--steps must be at least twice --window (the first window is warm-up)")

    if args.worker:
        if args.worker == "mlx_lm-lora":
            res = worker_mlx_lm(args.model, args.data, args.out, args.steps, args.window,
                                args.smollm2)
        elif args.worker == "peft-lora":
            res = worker_peft(args.model, args.data, args.steps, args.window)
        else:
            res = worker_mlxgpt(args.model, args.data, args.out, args.steps, args.window,
                                full="full" in args.worker, ckpt="ckpt" in args.worker,
                                llama=args.smollm2)
        res["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
        print(json.dumps(res))
        return

    from mlxgpt.cpu import blas

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = make_inputs(work, args.corpus, smollm2=args.smollm2)
    res: dict[str, dict] = {}
    ratios, cpu_ratios = [], []
    # Speed: mlxgpt and mlx-lm alternate, so a change in the machine's load hits both alike.
    speed_kinds = ("mlxgpt-lora", "mlx_lm-lora", *(["peft-lora"] if args.smollm2 else []))
    peer_ratios: list[float] = []
    for rep in range(0 if args.memory_only else args.repeats):
        for k in speed_kinds:
            r = run_worker(k, model, data, work, args.steps, args.window, args.smollm2)
            res.setdefault(k, r)
            res[k]["runs"] = [*res[k].get("runs", []), r["tok_per_s"]]
            res[k]["cpu"] = [*res[k].get("cpu", []), r["cpu_s_per_step"]]
            print(f"{k} (run {rep + 1}): {r['tok_per_s']:,.0f} tokens/s wall, "
                  f"{r['cpu_s_per_step']:.1f} CPU-s/step, peak RSS "
                  f"{r['peak_rss'] / 2**30:.2f} GiB", flush=True)
        ratios.append(res["mlxgpt-lora"]["runs"][-1] / res["mlx_lm-lora"]["runs"][-1])
        cpu_ratios.append(res["mlx_lm-lora"]["cpu"][-1] / res["mlxgpt-lora"]["cpu"][-1])
        if "peft-lora" in res:
            peer_ratios.append(res["mlxgpt-lora"]["runs"][-1] / res["peft-lora"]["runs"][-1])
    memory_kinds = ["mlxgpt-lora", *KINDS[2:]] if args.memory_only else KINDS[2:]
    for k in memory_kinds if not args.speed_only else []:
        steps, window = (args.ckpt_steps, 1) if "ckpt" in k or args.memory_only else (
            args.steps, args.window)
        res[k] = run_worker(k, model, data, work, steps, window, args.smollm2)
        print(f"{k}: {res[k]['tok_per_s']:,.0f} tokens/s, peak "
              f"{res[k]['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    gib = 2**30
    what = ("SmolLM2-135M-Instruct (float32), every linear layer of the last 16 blocks"
            if args.smollm2 else "GPT-2 124M shape, c_attn x 12 layers")
    print(f"{what}, batch {BATCH} x {SEQ} tokens, rank {RANK} alpha {ALPHA:g}, {args.steps} "
          f"steps (timing: last {args.window})")
    print(f"BLAS: {blas.blas_in_use()}")
    print(res["mlxgpt-lora"]["trainable"])
    print(f"{'run':<18}{'tokens/s':>16}{'MLX peak GiB':>14}{'peak RSS GiB':>14}")
    for k, r in res.items():
        speed = "/".join(f"{v:,.0f}" for v in r.get("runs", [r["tok_per_s"]]))
        mlx_peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] else "-"
        print(f"{k:<18}{speed:>16}{mlx_peak:>14}{r['peak_rss'] / gib:>14.2f}")
    if not args.speed_only:
        lora, full = res["mlxgpt-lora"], res["mlxgpt-full"]
        both = res["mlxgpt-lora-ckpt"]["peak_bytes"] / res["mlxgpt-full-ckpt"]["peak_bytes"]
        print(f"LoRA peak / full fine-tuning peak: {lora['peak_bytes'] / full['peak_bytes']:.0%};"
              f" both with --grad-checkpoint: {both:.0%} (target <= 60%)")
    if ratios:
        print(f"mlxgpt LoRA tokens/s / mlx_lm.lora, per alternating pair: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}x (target >= 1.2x)")
        print(f"same, from CPU time per step (robust to other load on the machine): "
              f"{', '.join(f'{r:.2f}x' for r in cpu_ratios)}; "
              f"median {statistics.median(cpu_ratios):.2f}x")
    if peer_ratios:
        print(f"mlxgpt LoRA tokens/s / transformers + peft, per run: "
              f"{', '.join(f'{r:.2f}x' for r in peer_ratios)}; "
              f"median {statistics.median(peer_ratios):.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
