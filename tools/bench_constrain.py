"""Mask time of JSON-constrained decoding on GPT-2's vocabulary (50,257 tokens).

    flock /tmp/bench.lock python tools/bench_constrain.py [--requests 6] [--max-tokens 128]
                                                          [--no-baseline] [--json out.json]

One-time costs: the vocabulary's byte trie and per-token string tables (once per tokenizer),
compiling each schema. Per generated token: ``allowed()`` (the mask) and ``advance()``, while
random tokens are picked among the allowed ones (a third of the time among single bytes, so
that structure gets written), seeded. The first request on a schema starts with empty caches
(cold); the later ones reuse the masks cached by state (warm), as repeated requests on a server
do. The baseline, measured in the same run: one decode step of a GPT-2 124M-shape model (random
float32 weights, mlxgpt's Context), so each mask time is also given as a share of a step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS before mlx is imported)

# isort: split
import mlx.core as mx
import numpy as np

from mlxgpt.cpu import blas
from mlxgpt.generation import constrain
from mlxgpt.generation.constrain import JsonConstraint, _Engine, _Vocab
from mlxgpt.tokenizers import gpt2_tokenizer

SCHEMAS = {
    "json_object": None,
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
            "married": {"type": "boolean"},
        },
        "required": ["name", "age", "married"],
    },
    "numbers": {"type": "array", "items": {"type": "number"}, "maxItems": 64},
    "nested": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "maxItems": 8, "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "label": {"type": "string"},
                               "price": {"type": "number", "minimum": 0, "maximum": 1000},
                               "kind": {"enum": ["food", "tool", "toy"]}},
                "required": ["id", "label", "kind"]}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["items", "note"],
    },
}


def percentiles(xs: list[float]) -> dict[str, float]:
    ms = np.array(xs) * 1e3
    return {"median_ms": round(float(np.median(ms)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "max_ms": round(float(ms.max()), 3), "steps": len(xs)}


def run_request(constraint: JsonConstraint, max_tokens: int, rng: random.Random,
                eot: int) -> tuple[list[float], list[float], str]:
    state = constraint.start(max_tokens=max_tokens)
    masks, advances = [], []
    while True:
        t = time.perf_counter()
        mask = state.allowed()
        masks.append(time.perf_counter() - t)
        ids = np.flatnonzero(mask)
        short = ids[ids < 256] if rng.random() < 1 / 3 else ids
        token = int(rng.choice(short if len(short) else ids))
        if token == eot:
            return masks, advances, state.text
        t = time.perf_counter()
        state.advance(token)
        advances.append(time.perf_counter() - t)


def decode_step_seconds(steps: int = 32) -> float:
    """Median time of one decode step of a GPT-2 124M-shape model (float32, random weights)."""
    from mlxgpt import GPT, GPTConfig
    from mlxgpt.core.backend import prepare_for_inference
    from mlxgpt.generation.context import Context

    mx.random.seed(0)
    model = prepare_for_inference(GPT(GPTConfig()))
    mx.eval(model.parameters())
    ctx = Context(model)
    logits = ctx.prefill(list(range(16)))
    times = []
    for i in range(steps + 4):
        t = time.perf_counter()
        logits = ctx.step(mx.argmax(logits[0])[None])
        mx.eval(logits)
        if i >= 4:  # the first steps trace the compiled forward
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6, help="requests per schema (1 cold)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-baseline", action="store_true", help="skip the decode-step baseline")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    tok = gpt2_tokenizer()
    t = time.perf_counter()
    vocab = _Vocab(tok, tok.vocab_size)  # the trie and the string tables of the plain state
    vocab_s = time.perf_counter() - t
    t = time.perf_counter()
    for sub in range(1, 14):  # the other string states' tables, built when first met
        vocab.lex(sub)
    lex_rest_s = time.perf_counter() - t
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "blas": blas.blas_in_use(), "kernels": blas.kernels_note(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "vocab": tok.vocab_size, "max_tokens": args.max_tokens,
        "build_s": {"trie_and_plain_string_tables": round(vocab_s, 3),
                    "string_tables_other_13_states": round(lex_rest_s, 3)},
        "schemas": {},
    }
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        _Engine(vocab, schema)
        compile_s = time.perf_counter() - t
        rng = random.Random(name)
        cold, warm, adv = [], [], []
        for r in range(args.requests):
            if r == 0:  # a fresh constraint: nothing cached for this schema yet
                constrain._ENGINES.pop(tok, None)
            constraint = JsonConstraint(tok, schema)
            masks, advances, text = run_request(constraint, args.max_tokens, rng, tok.eot_id)
            (cold if r == 0 else warm).extend(masks)
            adv.extend(advances)
            json.loads(text)
        result["schemas"][name] = {"compile_ms": round(compile_s * 1e3, 2),
                                   "mask_cold": percentiles(cold),
                                   "mask_warm": percentiles(warm),
                                   "advance": percentiles(adv), "example": text[:120]}
    if not args.no_baseline:
        step = decode_step_seconds()
        result["decode_step_124M_ms"] = round(step * 1e3, 2)
        for row in result["schemas"].values():
            for key in ("mask_cold", "mask_warm"):
                row[key]["median_share_of_decode_step"] = round(
                    row[key]["median_ms"] / 1e3 / step, 4)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
