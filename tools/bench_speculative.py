"""Speculative decoding on this CPU: what verifying k tokens in one forward costs, and the
acceptance rate and speed-up of a draft model.

    python tools/bench_speculative.py                      # english with english-draft
    python tools/bench_speculative.py --model english --draft english-draft --k 2,3,4,6 \\
        --tokens 128 --repeats 2 --json out.json

1. Verification cost: after a 128-token prefix the model reads T = 1..8 tokens in one forward
   (``Context.extend``); the median time of each and its ratio to one decoding step
   (``Context.step``), for the model and for the draft.
2. Generation: for each prompt, greedy and sampled (temperature 0.8, seed = the repeat's
   number, the same for every configuration), ``--tokens`` tokens without a draft and with it
   for each k, taking turns so a change in machine load hits them alike. (A sampled text
   differs between configurations: the draft changes which random numbers each token uses.)
   Speed is tokens after the first / their time (the draft reading the prompt included), summed
   over prompts and repeats; the speed-up is against no draft; the greedy text must be the same
   with and without the draft.

The JSON (stdout, or --json) names the CPU, the BLAS kernels, threads and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx

from mlxgpt.checkpoints.load import load
from mlxgpt.core.backend import prepare_for_inference
from mlxgpt.cpu import blas
from mlxgpt.generation.context import Context
from mlxgpt.generation.generate import stream_generate
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.generation.speculative import AUTO, check_draft

PROMPTS = [
    "The history of the city",
    "In the beginning God created",
    "The Linux kernel is",
    "Debian packages are installed with",
    "The president said that",
    "A hacker is a person who",
    "The war began in",
    "Water is a",
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, reps: int) -> float:
    fn()  # traced and warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def verify_costs(model, reps: int, prefix: int = 128, sizes=range(1, 9)) -> dict:
    """ms to read T tokens in one forward after ``prefix`` cached ones, and / one step."""
    ctx = Context(model)
    ctx.prefill(list(range(1, prefix + 1)))

    def step():
        mx.eval(ctx.step(mx.array([7], mx.int32)))
        ctx.trim(1)

    def extend(t):
        def run():
            mx.eval(ctx.extend(mx.array([list(range(3, 3 + t))], mx.int32)))
            ctx.trim(t)
        return run

    one = median_ms(step, reps)
    out = {"step_ms": round(one, 3)}
    for t in sizes:
        ms = median_ms(extend(t), reps)
        out[f"T={t}"] = {"ms": round(ms, 3), "x_step": round(ms / one, 2)}
    return out


def run(model, tok, prompt, sampling, n, draft=None, k=4):
    rs = list(stream_generate(model, tok, prompt, max_tokens=n, sampling=sampling,
                              stop_at_eos=False, draft_model=draft, draft_tokens=k))
    final = rs[-1]
    seconds = (final.generation_tokens - 1) / final.generation_tps
    return [r.token for r in rs[:-1]], seconds, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="english")
    ap.add_argument("--draft", default="english-draft")
    ap.add_argument("--k", default="2,3,4,5,6,auto",
                    help="Draft tokens per round to try ('auto': chosen per round).")
    ap.add_argument("--tokens", type=int, default=128, help="Tokens generated per prompt.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40, help="Timings per verification size.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ks = [x if x == AUTO else int(x) for x in args.k.split(",")]

    model, tok = load(args.model)
    draft, draft_tok = load(args.draft)
    check_draft(model, draft, tok, draft_tok)
    model, draft = prepare_for_inference(model), prepare_for_inference(draft)
    result = {
        "cpu": cpu_name(), "blas": blas.blas_in_use(), "kernels": blas.kernels_note(),
        "threads": os.cpu_count(), "mlx": mx.__version__,
        "model": args.model, "draft": args.draft,
        "params_model": model.n_params, "params_draft": draft.n_params,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    result["verify_model"] = verify_costs(model, args.reps)
    result["verify_draft"] = verify_costs(draft, args.reps)

    modes = {"greedy": SamplingSettings(temperature=0),
             "sampled": SamplingSettings(temperature=0.8, seed=0)}  # seed: the repeat's
    configs = [("none", 0)] + [(f"k={k}", k) for k in ks]
    for sampling in modes.values():  # warm: every shape traced before timing
        for _, k in configs:
            run(model, tok, PROMPTS[0], sampling, 24, draft if k else None, k or 1)
    table = {m: {c: {"seconds": [], "tokens": 0, "drafted": 0, "accepted": 0}
                 for c, _ in configs} for m in modes}
    same_greedy = True
    for rep in range(args.repeats):
        for i, prompt in enumerate(PROMPTS):
            for mode, sampling in modes.items():
                if sampling.seed is not None:
                    sampling = dataclasses.replace(sampling, seed=rep)
                order = configs[(i + rep) % len(configs):] + configs[:(i + rep) % len(configs)]
                plain_tokens = None
                texts = {}
                for name, k in order:
                    toks, secs, final = run(model, tok, prompt, sampling, args.tokens,
                                            draft if k else None, k or 1)
                    row = table[mode][name]
                    row["seconds"].append(secs)
                    row["tokens"] += final.generation_tokens - 1
                    row["drafted"] += final.drafted_tokens
                    row["accepted"] += final.accepted_tokens
                    texts[name] = toks
                    if name == "none":
                        plain_tokens = toks
                if mode == "greedy":
                    same_greedy &= all(t == plain_tokens for t in texts.values())
    summary = {}
    for mode, rows in table.items():
        base = rows["none"]["tokens"] / sum(rows["none"]["seconds"])
        summary[mode] = {}
        for name, row in rows.items():
            tps = row["tokens"] / sum(row["seconds"])
            summary[mode][name] = {
                "tokens_per_s": round(tps, 1),
                "speedup": round(tps / base, 3),
                "acceptance": (round(row["accepted"] / row["drafted"], 3)
                               if row["drafted"] else None),
            }
    result["generation"] = summary
    result["greedy_identical"] = same_greedy
    result["prompts"] = len(PROMPTS)
    result["tokens_per_prompt"] = args.tokens
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
