"""SmolLM2 against its references, with figures: what tests/test_smollm2.py asserts, measured
and printed, plus the tokenizer on a whole corpus.

    python tools/smollm2_check.py                              # parity figures
    python tools/smollm2_check.py --corpus data/english/prose.txt   # + ids on the whole corpus

Parity: mlxgpt's model (the Q4_1 file's weights dequantized to float32) against transformers'
LlamaForCausalLM with the same weights: the largest logit difference per prompt, and how many
of 64 greedy tokens are identical (prompts and chat-template prompts). Tokenizer: ids of each
paragraph of the corpus from mlxgpt, Hugging Face ``tokenizers`` with SmolLM2's pre-tokeniser,
and llama.cpp (``llama_cpp``, when installed); mismatches are counted and the first is shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlxgpt  # noqa: F401  (first: preloads the fast BLAS)

# isort: split
import mlx.core as mx
import numpy as np

PROMPTS = ["The history of the Roman Empire", "Once upon a time, in a small village,",
           "The best way to learn a new language is"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


def parity(model, tok) -> None:
    import torch
    import transformers
    from mlx.utils import tree_flatten

    from mlxgpt.generation.sample import SamplingSettings
    from mlxgpt.tokenizers.transcript import chat_prompt

    cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_dict().items()
                                      if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(v))
                        for k, v in tree_flatten(model.parameters())}, strict=False)
    hf.tie_weights()

    def ref(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].numpy()

    for p in PROMPTS:
        ids = tok.encode(p)
        diff = np.abs(np.array(model(mx.array([ids])))[0] - ref(ids)).max()
        print(f"logits {p!r}: max |diff| {diff:.2g}")
    prompts = [tok.encode(p) for p in PROMPTS]
    prompts += [chat_prompt(tok, [{"role": "user", "content": q}])[0] for q in QUESTIONS]
    for ids in prompts:
        out = [r.token for r in mlxgpt.stream_generate(
            model, tok, ids, max_tokens=64, stop_at_eos=False,
            sampling=SamplingSettings(temperature=0)) if r.token is not None]
        logits = ref(ids + out)[len(ids) - 1:]
        same = next((i for i in range(64) if int(np.argmax(logits[i])) != out[i]), 64)
        print(f"greedy: {same}/64 identical: {tok.decode(out)[:60]!r}")


def tokenizer(path: Path, corpus: Path) -> None:
    import tokenizers

    from mlxgpt.checkpoints.gguf_llama import gguf_tokenizer

    _, meta = mx.load(str(path), return_metadata=True)
    tok = gguf_tokenizer(meta, path)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    paragraphs = [p for p in corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    ours = tok.encode_batch(paragraphs)
    refs = {"hugging face tokenizers": [e.ids for e in hf.encode_batch(paragraphs)]}
    try:
        import llama_cpp

        ll = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        refs["llama.cpp"] = [ll.tokenize(p.encode(), add_bos=False, special=False)
                             for p in paragraphs]
    except ImportError:
        print("llama_cpp not installed: llama.cpp's tokenizer skipped")
    n_ids = sum(map(len, ours))
    for name, want in refs.items():
        bad = [i for i, (a, b) in enumerate(zip(ours, want, strict=True)) if a != b]
        first = f"; first: {paragraphs[bad[0]][:60]!r}" if bad else ""
        print(f"tokenizer vs {name}: {len(paragraphs)} paragraphs, {n_ids} ids, "
              f"{len(bad)} differ{first}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="a UTF-8 text file (paragraphs: blank lines)")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    from mlxgpt.checkpoints.fetch import fetch

    path = fetch("smollm2")
    if not args.skip_parity:
        parity(*mlxgpt.load(path, dtype="float32"))
    if args.corpus:
        tokenizer(path, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
