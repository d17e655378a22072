"""Fine-tuning data: JSONL forms, file:line errors, prompt masks, batches and the masked loss."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxgpt.data.examples import PAD_MULTIPLE, Batches, encode_records, find_splits, read_jsonl
from mlxgpt.errors import MlxgptError
from mlxgpt.tokenizers import byte_tokenizer
from mlxgpt.training.loss import lm_loss

TOK = byte_tokenizer()  # ids are bytes, so positions are easy to reason about


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_mask_counts_only_completion_tokens(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abc:", "completion": "xy"},
                                           {"prompt": "hello there:", "completion": "z"}])
    examples, _ = encode_records(read_jsonl(f), TOK, mask_prompt=True, max_len=64)
    e = examples[0]
    assert e.tokens == [*b"abc:xy", TOK.eot_id]
    assert e.mask == [0, 0, 0, 0, 1, 1, 1]  # completion + end-of-text
    inputs, targets, mask = Batches(examples, 2).collate(examples)
    assert inputs.shape == (2, PAD_MULTIPLE) and targets.shape == mask.shape == inputs.shape
    # Row 0 predicts "x", "y", EOT from positions 3, 4, 5; nothing else counts.
    assert np.nonzero(np.array(mask[0]))[0].tolist() == [3, 4, 5]
    assert np.array(targets[0, 3:6]).tolist() == [*b"xy", TOK.eot_id]
    assert float(mask.sum()) == 3 + 2

    # The loss is the mean cross-entropy over exactly those targets.
    model = tiny_model(n_layer=1)
    loss, n = lm_loss(model, inputs, targets, mask)
    logp = np.array(mx.log(mx.softmax(model(inputs).astype(mx.float32), axis=-1)))
    t, m = np.array(targets), np.array(mask)
    ce = -np.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
    want = ce[m > 0].mean()
    assert int(n) == 5
    assert abs(float(loss) - want) < 1e-5
    # Without masking, prompt tokens count too (the first token has nothing to predict it).
    unmasked, _ = encode_records(read_jsonl(f), TOK, mask_prompt=False, max_len=64)
    assert unmasked[0].n_targets == len(unmasked[0].tokens) - 1


def test_text_examples_train_on_everything_and_long_text_is_windowed(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdefghij"}])
    examples, stats = encode_records(read_jsonl(f), TOK, mask_prompt=True, max_len=4)
    assert [e.tokens for e in examples] == [list(b"abcd"), list(b"efgh"), [*b"ij", TOK.eot_id]]
    assert all(all(e.mask) for e in examples)
    assert stats == {"truncated": 0, "dropped": 0}


def test_long_prompt_loses_its_start_and_is_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "0123456789", "completion": "c"},
                                           {"prompt": "p", "completion": "cc"},
                                           {"prompt": "p", "completion": "c" * 9}])
    examples, stats = encode_records(read_jsonl(f), TOK, mask_prompt=True, max_len=6)
    assert examples[0].tokens == [*b"6789c", TOK.eot_id]  # the completion survives
    assert examples[0].mask == [0, 0, 0, 0, 1, 1]
    # The third keeps only completion tokens: the first of them has no context, the rest count.
    assert examples[2].tokens == [*b"ccccc", TOK.eot_id] and examples[2].n_targets == 5
    assert stats == {"truncated": 2, "dropped": 0}


@pytest.mark.parametrize(
    "line, why",
    [
        ('{"text": "ok"', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "only a prompt"}', '"prompt" without "completion"'),
        ('{"completion": "x"}', '"completion" without "prompt"'),
        ('{"input": "x"}', 'needs "text", "prompt" and "completion", or "messages" '
                           "(found keys: input)"),
        ('{"text": 3}', '"text" must be a string, got int'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, why):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, "", line])
    with pytest.raises(MlxgptError) as e:
        read_jsonl(f)
    assert str(e.value).startswith(f"{f}:3: ")
    assert why in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_file_is_refused(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n\n")
    with pytest.raises(MlxgptError, match=r"train.jsonl: empty \(no examples\)"):
        read_jsonl(f)


def test_splits_from_folder_or_single_file(tmp_path):
    rows = [{"text": f"line {i}"} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:3])
    splits = find_splits(tmp_path)
    assert sorted(splits) == ["test", "train"] and len(splits["train"]) == 20
    single = find_splits(tmp_path / "train.jsonl", val_fraction=0.25, seed=3)
    assert len(single["train"]) == 15 and len(single["valid"]) == 5
    assert find_splits(tmp_path / "train.jsonl", 0.25, seed=3) == single  # seeded
    with pytest.raises(MlxgptError, match="no train.jsonl"):
        find_splits(_mkdir(tmp_path / "e"))


def _mkdir(p):
    p.mkdir()
    return p


def test_batches_are_a_pure_function_of_the_step(tmp_path):
    rows = [{"text": "x" * n} for n in range(1, 40)]
    examples, _ = encode_records(
        [(f"f:{i}", r) for i, r in enumerate(rows)], TOK, mask_prompt=False, max_len=64
    )
    b = Batches(examples, 4, seed=7)
    assert len(b) == len(examples) // 4
    seen = set()
    for step in range(len(b)):  # one epoch visits every batch once
        inputs, _, mask = b.batch(step)
        seen.add(tuple(np.array(inputs[:, 0])) + (int(mask.sum()),))
        again = b.batch(step)[0]
        assert mx.array_equal(inputs, again)
    assert len(seen) == len(b)
    # The next epoch is another order of the same batches.
    order = [int(b.batch(s)[2].sum()) for s in range(len(b))]
    order2 = [int(b.batch(len(b) + s)[2].sum()) for s in range(len(b))]
    assert sorted(order) == sorted(order2) and order != order2


def test_messages_use_the_chat_transcript_and_mask_all_but_assistant_turns(tmp_path):
    from mlxgpt.tokenizers.transcript import render_transcript

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    (e,), _ = encode_records(read_jsonl(f), TOK, mask_prompt=True, max_len=256)
    assert TOK.decode(e.tokens[:-1]) == render_transcript(msgs)  # exactly what chat shows
    assert e.tokens[-1] == TOK.eot_id
    learnt = bytes(t for t, m in zip(e.tokens[:-1], e.mask[:-1], strict=True) if m)
    assert learnt == b" Hello.\n Bye!\n"  # the replies after "Assistant:", nothing else
