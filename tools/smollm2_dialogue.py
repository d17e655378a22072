"""Before and after a dialogue fine-tune of SmolLM2: do replies end at the end-of-turn token,
and what does the model still know?

    mlxgpt finetune --model smollm2 --data data/english/dialogue --out runs/dialogue \\
        --mask-prompt --steps 60 --batch-size 4 --max-seq-len 192 --seed 0
    python tools/smollm2_dialogue.py --valid data/english/dialogue/valid.jsonl \\
        --adapter runs/dialogue

For the first ``--n`` held-out conversations, the greedy reply to their first user turn (through
the chat template, at most 64 tokens): the share that ends at ``<|im_end|>`` rather than at the
token limit. Then five general-knowledge questions, answered greedily, without and with the
adapter. (The held-out reply loss comes from ``mlxgpt eval --mask-prompt``.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlxgpt
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers.transcript import chat_prompt

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
             "What is the largest planet in the solar system?"]


def reply(model, tok, text: str) -> tuple[str, str]:
    ids, _ = chat_prompt(tok, [{"role": "user", "content": text}])
    out, final = "", None
    for r in mlxgpt.stream_generate(model, tok, ids, max_tokens=64,
                                    sampling=SamplingSettings(temperature=0)):
        out += r.text
        final = r
    return out.strip(), final.finish_reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--valid", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    firsts = [json.loads(line)["messages"][0]["content"]
              for line in args.valid.read_text().splitlines()[: args.n]]
    for name, adapter in (("before", None), ("after", args.adapter)):
        model, tok = mlxgpt.load("smollm2", adapter=adapter)
        ends = [reply(model, tok, t)[1] for t in firsts]
        print(f"{name}: {sum(e == 'eos' for e in ends)}/{len(ends)} replies end at <|im_end|>")
        for q in QUESTIONS:
            print(f"  {q} -> {reply(model, tok, q)[0][:150]!r}")


if __name__ == "__main__":
    main()
