"""Hugging Face tokenizer files: ``vocab.json`` + ``merges.txt`` (written and read) and
``tokenizer.json`` (read), in GPT-2's byte-level alphabet."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checks import check_links, shown
from ..core.config import MAX_SIZES
from ..errors import MlxgptError
from .base import EOT, GPT2_PATTERN, SMOLLM_PATTERN

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
MAX_ID = MAX_SIZES["vocab_size"]  # ids index tables: a huge one would allocate that much


HF_TOKENIZER_FILE, HF_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


@functools.lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def to_hf(token: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in token)


def from_hf(token: str) -> bytes | None:
    """Bytes of a byte-level token string; None if it is not byte-level."""
    table = _char_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return None


def write_hf_files(
    folder: Path,
    vocab: Mapping[int, bytes],
    merges: list[tuple[bytes, bytes]],
    special_tokens: Mapping[str, int],
    eot_id: int | None,
    pattern: str,
    *,
    bos_id: int | None = None,
    chat_template: str | None = None,
    add_bos: bool = False,
) -> None:
    """vocab.json + merges.txt + tokenizer_config.json (GPT2Tokenizer), and tokenizer.json when
    the split pattern is not GPT-2's (vocab.json/merges.txt cannot express it). The chat
    template, where there is one, goes into tokenizer_config.json as Hugging Face keeps it.
    ``add_bos`` (with a special ``bos_id``): BOS before encoded text, said both ways readers
    look for it (see :func:`read_add_bos`)."""
    hf_vocab = {to_hf(b): i for i, b in sorted(vocab.items())}
    hf_vocab.update(special_tokens)
    hf_merges = [f"{to_hf(a)} {to_hf(b)}" for a, b in merges]
    eot = next((s for s, i in special_tokens.items() if i == eot_id), None)
    bos = next((s for s, i in special_tokens.items() if i == bos_id), eot)
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s, i in special_tokens.items()
    }
    config = {
        # GPT2Tokenizer imposes GPT-2's split; another pattern needs tokenizer.json as written.
        "tokenizer_class": "GPT2Tokenizer"
        if pattern == GPT2_PATTERN
        else "PreTrainedTokenizerFast",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": bos,
        "eos_token": eot,
        "unk_token": eot,
        "added_tokens_decoder": added,
    }
    if chat_template:
        config["chat_template"] = chat_template
    add_bos = add_bos and bos_id in special_tokens.values()
    if add_bos:  # only then: the files of tokenizers without BOS stay as they were
        config["add_bos_token"] = True
    (folder / VOCAB_FILE).write_text(json.dumps(hf_vocab, ensure_ascii=False), encoding="utf-8")
    (folder / MERGES_FILE).write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in hf_merges), encoding="utf-8"
    )
    (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    if pattern != GPT2_PATTERN:
        tok = {
            "version": "1.0",
            "added_tokens": [{"id": int(k), **v} for k, v in added.items()],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": pattern},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": False,
                        "trim_offsets": True,
                        "use_regex": False,
                    },
                ],
            },
            # transformers (v5) reads add_bos from here when there is a tokenizer.json
            "post_processor": _bos_template(bos, bos_id) if add_bos else None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": False,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": hf_vocab,
                "merges": hf_merges,
            },
        }
        (folder / HF_TOKENIZER_FILE).write_text(json.dumps(tok, ensure_ascii=False), "utf-8")


def _bos_template(bos: str | None, bos_id: int | None) -> dict[str, Any]:
    """A TemplateProcessing post-processor that puts ``bos`` before the text (Llama 2's)."""
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise MlxgptError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxgptError(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a config), or one line saying what it holds."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise MlxgptError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_vocab(vocab: Any, source: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise MlxgptError(f"{source}: the vocabulary must be a non-empty JSON object")
    for s, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_ID:
            raise MlxgptError(f"{source}: token {shown(s)} has id {shown(i)}, expected an "
                              f"integer in 0..{MAX_ID - 1}")
    return vocab


def check_special(special: Any, source: Path | str) -> dict[str, int]:
    """Special tokens: an object of strings to ids >= 0."""
    if not isinstance(special, dict):
        raise MlxgptError(f"{source}: special tokens must be an object of token -> id, "
                          f"got {shown(special)}")
    for s, i in special.items():
        if not isinstance(s, str) or not isinstance(i, int) or isinstance(i, bool) \
                or not 0 <= i < MAX_ID:
            raise MlxgptError(f"{source}: special token {shown(s)} has id {shown(i)}, expected "
                              f"an integer in 0..{MAX_ID - 1}")
    return special


def _split_merge(line: Any, n: int, source: Path) -> tuple[str, str]:
    parts = line.split(" ") if isinstance(line, str) else line
    if (
        not isinstance(parts, list)
        or len(parts) != 2
        or not all(isinstance(p, str) and p for p in parts)
    ):
        raise MlxgptError(f"{source}: merge {n} ({shown(line)}) is not two tokens")
    return parts[0], parts[1]


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list, dict[str, int], str]:
    """GPT-2 style vocab.json + merges.txt; special tokens from tokenizer_config.json and
    added_tokens.json where present, else <|endoftext|> if the vocab has it."""
    vocab = _check_vocab(read_json_file(folder / VOCAB_FILE), folder / VOCAB_FILE)
    try:
        lines = (folder / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MlxgptError(f"{folder / MERGES_FILE}: cannot read ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [
        _split_merge(line, n, folder / MERGES_FILE)
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]
    special = {EOT: vocab[EOT]} if EOT in vocab else {}
    if (folder / HF_CONFIG_FILE).is_file():
        added = read_json_object(folder / HF_CONFIG_FILE).get("added_tokens_decoder") or {}
        try:
            special.update({d["content"]: int(i) for i, d in added.items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            raise MlxgptError(f"{folder / HF_CONFIG_FILE}: bad added_tokens_decoder") from None
        check_special(special, folder / HF_CONFIG_FILE)
    if (folder / "added_tokens.json").is_file():
        special.update(_check_vocab(read_json_file(folder / "added_tokens.json"), folder))
    return vocab, merges, special, GPT2_PATTERN


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list, dict[str, int], str]:
    """A Hugging Face tokenizers file with a byte-level BPE model."""
    data = read_json_file(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise MlxgptError(f"{path}: not a BPE tokenizer (only byte-level BPE is supported)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"):
        if model.get(key):
            raise MlxgptError(f"{path}: BPE option {key} is not supported (byte-level BPE only)")
    if data.get("normalizer"):
        raise MlxgptError(f"{path}: tokenizer normalizers are not supported")
    vocab = _check_vocab(model.get("vocab"), path)
    if not isinstance(model["merges"], list):
        raise MlxgptError(f"{path}: model.merges must be a list")
    merges = [_split_merge(m, n, path) for n, m in enumerate(model["merges"], 1)]
    try:
        special = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError):
        raise MlxgptError(f"{path}: bad added_tokens") from None
    check_special(special, path)
    return vocab, merges, special, _pretokenizer_pattern(data.get("pre_tokenizer"), path)


def _pretokenizer_pattern(pre: Any, path: Path) -> str:
    """The split regex of a ByteLevel pre-tokenizer, alone or after a Split (Isolated)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and "pretokenizers" in pre else [pre]
    steps = steps if isinstance(steps, list) else [steps]
    unsupported = MlxgptError(f"{path}: unsupported pre_tokenizer (byte-level BPE only)")
    *split, byte_level = steps
    if not isinstance(byte_level, dict) or byte_level.get("type") != "ByteLevel":
        raise unsupported
    if byte_level.get("add_prefix_space"):
        raise MlxgptError(f"{path}: add_prefix_space=true is not supported")
    if not split and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    digits = split[0] if len(split) == 1 and isinstance(split[0], dict) else {}
    if (digits.get("type") == "Digits" and digits.get("individual_digits")
            and byte_level.get("use_regex", True)):
        return SMOLLM_PATTERN  # SmolLM's: each digit alone, then GPT-2's split
    if len(split) == 1 and isinstance(split[0], dict) and not byte_level.get("use_regex", True):
        s = split[0]
        regex = (s.get("pattern") or {}).get("Regex")
        if (
            s.get("type") == "Split"
            and regex
            and s.get("behavior") == "Isolated"
            and not s.get("invert")
        ):
            return regex
    raise unsupported


def read_chat_config(folder: Path) -> dict[str, Any]:
    """What a Hugging Face folder says about chat: ``chat_template`` (tokenizer_config.json, or
    chat_template.jinja beside it), ``eos_token`` and ``bos_token`` (strings)."""
    out: dict[str, Any] = {}
    cfg = read_json_object(folder / HF_CONFIG_FILE) if (folder / HF_CONFIG_FILE).is_file() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MlxgptError(f"{jinja}: cannot read ({e})") from None
    if isinstance(template, str) and template:
        out["chat_template"] = template
    for key in ("eos_token", "bos_token"):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[key] = v
    return out


def read_add_bos(folder: Path, bos_token: str | None) -> tuple[bool, str | None]:
    """Whether a Hugging Face folder's tokenizer puts BOS before encoded text, and its BOS.

    As llama.cpp's converter reads it: tokenizer_config.json's ``add_bos_token`` where it is
    true or false, else whether tokenizer.json's post-processor (a TemplateProcessing, alone or
    in a Sequence, as Llama 3's) starts the text with ``bos_token``. The BOS is ``bos_token``,
    or where the folder names none, the special token that template puts first.
    """
    cfg = read_json_object(folder / HF_CONFIG_FILE) if (folder / HF_CONFIG_FILE).is_file() else {}
    flag = cfg.get("add_bos_token")
    if isinstance(flag, bool) and bos_token is not None:
        return flag, bos_token
    first = _template_first(folder)  # (read again: the parts reader keeps no post-processor)
    bos = bos_token or first
    if isinstance(flag, bool):
        return flag and bos is not None, bos
    return first is not None and first == bos, bos


def _template_first(folder: Path) -> str | None:
    """The special token tokenizer.json's TemplateProcessing puts before a single text."""
    if not (folder / HF_TOKENIZER_FILE).is_file():
        return None
    data = read_json_file(folder / HF_TOKENIZER_FILE)
    post = data.get("post_processor") if isinstance(data, dict) else None
    steps = post.get("processors") if isinstance(post, dict) and "processors" in post else [post]
    for step in steps if isinstance(steps, list) else []:
        single = step.get("single") if isinstance(step, dict) else None
        if isinstance(single, list) and single and step.get("type") == "TemplateProcessing":
            first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
            token = first.get("id") if isinstance(first, dict) else None
            return token if isinstance(token, str) else None
    return None


def read_hf_parts(folder: Path) -> tuple[tuple, Path] | None:
    check_links(folder)
    if (folder / HF_TOKENIZER_FILE).is_file():
        return _read_tokenizer_json(folder / HF_TOKENIZER_FILE), folder / HF_TOKENIZER_FILE
    has_vocab, has_merges = (folder / VOCAB_FILE).is_file(), (folder / MERGES_FILE).is_file()
    if has_vocab and has_merges:
        return _read_vocab_merges(folder), folder / VOCAB_FILE
    if has_vocab or has_merges:
        missing = MERGES_FILE if has_vocab else VOCAB_FILE
        raise MlxgptError(
            f"{folder}: has {VOCAB_FILE if has_vocab else MERGES_FILE} but no {missing}"
        )
    return None
