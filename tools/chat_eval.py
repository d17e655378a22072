"""Does a model chat in turn? Replies to held-out conversations, as ``mlxgpt chat`` makes them.

For every conversation of a ``{"messages": [...]}`` JSONL file, the turns before its last
assistant turn are given to a :class:`mlxgpt.generation.chat.ChatSession` and the model replies
to the last user turn (greedy, at most ``--max-tokens``). Reported: the share of replies that
end at the turn boundary (the next speaker tag or ``<|endoftext|>``) rather than at the token
limit, and the reply perplexity from ``mlxgpt eval --mask-prompt`` (loss on assistant turns).

    python tools/chat_eval.py --data data/english/dialogue/valid.jsonl --model english shakespeare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import mlxgpt
from mlxgpt.generation.chat import ChatSession, ChatSettings
from mlxgpt.generation.sample import SamplingSettings
from mlxgpt.tokenizers.transcript import Message


def boundary_share(model_ref: str, conversations: list[list[dict]], max_tokens: int) -> float:
    model, tokenizer = mlxgpt.load(model_ref)
    settings = ChatSettings(max_tokens=max_tokens, sampling=SamplingSettings(temperature=0.0))
    ended = 0
    for turns in conversations:
        last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
        session = ChatSession(model, tokenizer, settings)
        session.messages = [Message(t["role"], t["content"]) for t in turns[:last_user]]
        "".join(session.reply(turns[last_user]["content"]))
        ended += session.last.finish_reason in ("stop", "eos")
    return ended / len(conversations)


def reply_loss(model_ref: str, data: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mlxgpt", "eval", "--model", model_ref,
                          "--data", str(data), "--mask-prompt"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    convs = [json.loads(line)["messages"]
             for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"| model | reply loss (nats/token) | reply perplexity | replies ending at the "
          f"boundary ({len(convs)}, max {args.max_tokens} tokens) |\n|---|---|---|---|")
    for ref in args.model:
        loss = reply_loss(ref, args.data)
        share = boundary_share(ref, convs, args.max_tokens)
        print(f"| {ref} | {float(loss['loss']):.3f} | {float(loss['perplexity']):.1f} | "
              f"{share:.1%} |", flush=True)


if __name__ == "__main__":
    main()
