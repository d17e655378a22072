"""transformers + torch worker for tools/bench.py and tools/bench_llama.py, in its own process.

It imports neither mlx nor mlxgpt, so torch runs as a user would run it (its own threads,
nothing preloaded). Input: a JSON job on stdin; output: a JSON result on stdout.

    {"folder": HF_FOLDER, "dtype": "float32" | "bfloat16", "long": [ids], "short": [ids],
     "gen_tokens": 128, "repeats": 3}
"""

from __future__ import annotations

import json
import sys
import time

import torch
import transformers


def main() -> None:
    job = json.load(sys.stdin)
    transformers.logging.set_verbosity_error()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(job["folder"], dtype=dtype).eval()

    def run(ids, past=None):
        out = model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def first_token(ids) -> float:
        t = time.perf_counter()
        run(ids)
        return time.perf_counter() - t

    def decode(ids, n):
        y, past = run(ids)
        out, t0 = [y], time.perf_counter()
        for _ in range(n - 1):
            y, past = run([y], past)
            out.append(y)
        return (n - 1) / (time.perf_counter() - t0), out

    result = {"ttft_s": [], "decode_tps": [], "tokens": []}
    with torch.no_grad():
        first_token(job["long"])  # warm-up, with the measured sizes
        decode(job["short"], job["gen_tokens"])
        for _ in range(job["repeats"]):
            result["ttft_s"].append(first_token(job["long"]))
            tps, toks = decode(job["short"], job["gen_tokens"])
            result["decode_tps"].append(tps)
            result["tokens"] = toks
    result["threads"] = torch.get_num_threads()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
