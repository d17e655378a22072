"""Classifier heads: parity with transformers' GPT2ForSequenceClassification (import, export),
the loss, ``mlxgpt finetune --task classify`` / ``eval --task classify`` / ``classify`` end to
end on a toy task, and bad input."""

import json
import random

import mlx.core as mx
import numpy as np
import pytest
from _hf_helpers import SMALL, random_hf_model, read_config

import mlxgpt
from mlxgpt.checkpoints.folder import is_classifier_folder, load_model, save_classifier
from mlxgpt.core.classifier import GPTClassifier
from mlxgpt.data.examples import LabelledBatches, encode_labelled, read_jsonl
from mlxgpt.data.examples import check_labelled_record as check
from mlxgpt.tokenizers import byte_tokenizer
from mlxgpt.training.classify import classify_loss
from mlxgpt.training.loss import lm_loss

TOK = byte_tokenizer()
ANIMALS = ("cat", "dog", "fish")


def padded(rows, pad):
    """(B, T) right-padded ids and each row's length."""
    width = max(map(len, rows))
    return (np.array([r + [pad] * (width - len(r)) for r in rows], np.int32),
            np.array([len(r) for r in rows], np.int32))


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def random_hf_classifier(folder, seed=0, pad=100):
    """A random GPT2ForSequenceClassification (SMALL's shape, three labels), saved to folder."""
    import torch
    import transformers

    lm = random_hf_model(SMALL, seed)  # every body parameter random, LayerNorms included
    config = transformers.GPT2Config(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     pad_token_id=pad, id2label=dict(enumerate(ANIMALS)),
                                     label2id={a: i for i, a in enumerate(ANIMALS)})
    model = transformers.GPT2ForSequenceClassification(config).eval()
    model.transformer.load_state_dict(lm.transformer.state_dict())
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return model


def tiny_classifier(tiny_model, labels=("neg", "pos"), seed=0, **config):
    clf = GPTClassifier(tiny_model(seed, **config), labels, key=mx.random.key(seed))
    clf.score.weight = mx.random.normal(clf.score.weight.shape, key=mx.random.key(seed + 1))
    clf.eval()
    return clf


# --------------------------------------------------------------------------- parity


def test_hf_classifier_imports_with_the_same_logits_under_padding(tmp_path, cli_ok):
    hf = random_hf_classifier(tmp_path / "hf")
    rng = np.random.default_rng(0)
    # Real tokens avoid the pad id (100), so transformers finds the same last real token.
    rows = [rng.integers(0, 100, n).tolist() for n in (7, 1, 13, 4)]
    ids, lengths = padded(rows, pad=100)
    ref = hf_logits(hf, ids)
    assert ref.shape == (4, 3)

    clf, _ = mlxgpt.load_classifier(tmp_path / "hf")  # in memory
    assert clf.labels == ANIMALS
    got = np.array(clf(mx.array(ids), mx.array(lengths)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # Each row alone, unpadded, gives its padded row's logits: padding changes nothing, and
    # lengths (not a pad id) say where a row ends, so padding with a real token works too.
    alone = np.concatenate([np.array(clf(mx.array([r]))) for r in rows])
    np.testing.assert_allclose(alone, got, atol=1e-5, rtol=0)
    with_real_pad, _ = padded(rows, pad=int(rows[0][0]))
    np.testing.assert_allclose(np.array(clf(mx.array(with_real_pad), mx.array(lengths))), got,
                               atol=1e-5, rtol=0)

    r = cli_ok("convert", tmp_path / "hf", tmp_path / "clf")
    assert "classifier with 3 labels" in r.output
    assert is_classifier_folder(tmp_path / "clf")
    converted, _ = mlxgpt.load_classifier(tmp_path / "clf")
    np.testing.assert_allclose(np.array(converted(mx.array(ids), mx.array(lengths))), ref,
                               atol=1e-4, rtol=0)
    load_model(tmp_path / "clf")  # the GPT alone is an ordinary model folder


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tiny_model, cli_ok):
    import transformers
    from safetensors.numpy import load_file

    clf = tiny_classifier(tiny_model, labels=("neg", "neutral", "pos"))
    save_classifier(clf, tmp_path / "clf", TOK)
    cli_ok("export", tmp_path / "clf", tmp_path / "hf")

    cfg = read_config(tmp_path / "hf")
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"]
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert cfg["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert cfg["num_labels"] == 3 and cfg["pad_token_id"] == TOK.eot_id
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["score.weight"].shape == (3, 32) and "score.bias" not in weights
    assert "lm_head.weight" not in weights

    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    texts = ["a short one", "and a somewhat longer text", "x"]
    # transformers' own tokenizer pads with <|endoftext|> (256), which bytes never are.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.pad_token_id == TOK.eot_id
    ids = hf_tok(texts, padding=True, return_tensors="np")["input_ids"]
    ref, lengths = padded([TOK.encode(t) for t in texts], pad=TOK.eot_id)
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(np.array(clf(mx.array(ids), mx.array(lengths))),
                               hf_logits(hf, ids), atol=1e-4, rtol=0)

    # And back: the exported folder imports as the same classifier.
    back, _ = mlxgpt.load_classifier(tmp_path / "hf")
    assert back.labels == clf.labels
    np.testing.assert_allclose(np.array(back(mx.array(ids), mx.array(lengths))),
                               np.array(clf(mx.array(ids), mx.array(lengths))), atol=1e-5)


# --------------------------------------------------------------------------- the loss


def test_loss_is_cross_entropy_plus_weighted_lm_loss(tiny_model, tmp_path):
    clf = tiny_classifier(tiny_model)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "good film", "label": "pos"}, {"text": "dull", "label": "neg"},
        {"text": "a truly wonderful evening", "label": "pos"}]))
    examples, _ = encode_labelled(read_jsonl(f, check), TOK, clf.labels, max_len=64)
    assert examples[1].tokens == [*b"dull", TOK.eot_id] and examples[1].label == 0
    inputs, targets, mask, lengths, labels = LabelledBatches(examples, 3).collate(examples)
    assert np.array(lengths).tolist() == [9, 4, 25]
    assert np.array(inputs[1, :4]).tolist() == list(b"dull")  # the whole text is the input

    logits = np.array(clf(inputs, lengths)).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[np.arange(3), np.array(labels)].mean()

    plain, n = classify_loss(0.0)(clf, inputs, targets, mask, lengths, labels)
    assert int(n) == 3  # examples, not tokens
    assert abs(float(plain) - ce) < 1e-5
    val, _ = classify_loss(0.5)(clf, inputs, lengths, labels)  # validation: no LM targets
    assert abs(float(val) - ce) < 1e-5
    lm, n_tok = lm_loss(clf.transformer, inputs, targets, mask)
    assert int(n_tok) == 9 + 4 + 25  # every next token of the text, end-of-text included
    both, _ = classify_loss(0.5)(clf, inputs, targets, mask, lengths, labels)
    assert abs(float(both) - (ce + 0.5 * float(lm))) < 1e-5


# --------------------------------------------------------------------------- end to end

LETTERS, DIGITS = "abcdefghij", "0123456789"


def toy_rows(n, seed):
    """Separable by eye: letters are "word", digits are "number"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["number", "word"])
        chars = DIGITS if label == "number" else LETTERS
        rows.append({"text": "".join(rng.choice(chars) for _ in range(rng.randint(3, 12))),
                     "label": label})
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory, model_folder):
    root = tmp_path_factory.mktemp("cls")
    data = root / "data"
    data.mkdir()
    write_rows(data / "train.jsonl", toy_rows(160, 0))
    write_rows(data / "valid.jsonl", toy_rows(32, 1))
    write_rows(root / "test.jsonl", toy_rows(40, 2))
    return model_folder(root, name="model"), data, root / "test.jsonl"


FAST = ["--task", "classify", "--batch-size", "8", "--warmup", "3", "--eval-every", "20",
        "--eval-batches", "4", "--log-every", "5"]


@pytest.mark.parametrize("mode, args, least", [
    ("lora", ["--lr", "1e-2", "--targets", "all", "--steps", "40"], 0.95),
    ("full", ["--full", "--lr", "2e-3", "--steps", "40"], 0.95),
    # A linear probe of a random GPT's features: clearly above chance, not perfect.
    ("head", ["--head-only", "--lr", "1e-1", "--steps", "80"], 0.75),
])
def test_finetune_learns_and_eval_and_classify_print_it(toy, tmp_path, cli_ok, mode, args,
                                                        least):
    model_dir, data, test = toy
    out = tmp_path / mode
    r = cli_ok("finetune", "--model", model_dir, "--data", data, "--out", out, *FAST, *args)
    assert "train: 160 examples (number " in r.output and "val accuracy" in r.output
    # The classifier's loss counts examples, and the progress lines say so.
    assert " ex/s | ETA" in r.output and "tok/s" not in r.output
    for f in ("config.json", "model.safetensors", "classifier.safetensors", "classifier.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "classifier.json").read_text())["labels"] == ["number", "word"]
    kept = {"lora": "adapters.safetensors", "full": "model.safetensors",
            "head": "classifier.safetensors"}[mode]
    assert (out / "last" / kept).is_file() and (out / "last" / "classifier.safetensors").is_file()

    report = cli_ok("eval", "--task", "classify", "--model", out, "--data", test).output
    lines = report.splitlines()
    acc = float(next(x for x in lines if x.startswith("accuracy: ")).split(": ")[1])
    assert acc >= least, report  # the majority label is 0.525 of the test lines
    assert any(x.startswith("macro-F1: ") for x in lines)
    assert any(x.startswith("majority baseline: ") for x in lines)
    assert "confusion (rows: label, columns: predicted):" in report

    out_lines = cli_ok("classify", "--model", out, "123456", "abcdef").output.splitlines()
    assert [x.split("\t")[0] for x in out_lines] == ["number", "word"]
    assert all(0.5 <= float(x.split("\t")[1]) <= 1.0 for x in out_lines)
    piped = cli_ok("classify", "--model", out, "-", input="123456\nabcdef\n").output
    assert piped.splitlines() == out_lines
    clf, tok = mlxgpt.load_classifier(out)
    api = mlxgpt.classify(clf, tok, ["123456", "abcdef"])
    assert [f"{p.label}\t{p.probability:.4f}" for p in api] == out_lines


def test_classifier_resumes_where_it_stopped(toy, tmp_path, cli_ok):
    model_dir, data, _ = toy
    # A constant learning rate, so that 2 + 2 steps follow the same schedule as 4.
    args = ["finetune", "--model", model_dir, "--data", data, *FAST, "--lr", "1e-2",
            "--min-lr", "1e-2", "--warmup", "0", "--log-every", "1", "--eval-every", "0",
            "--save-every", "0"]
    cli_ok(*args, "--out", tmp_path / "straight", "--steps", 4)
    cli_ok(*args, "--out", tmp_path / "resumed", "--steps", 2)
    assert "resuming" in cli_ok(*args, "--out", tmp_path / "resumed", "--steps", 4,
                                "--resume").output

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").open()) if "loss" in r]

    np.testing.assert_allclose(losses(tmp_path / "resumed"), losses(tmp_path / "straight"),
                               atol=1e-6)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("lines, why", [
    ([{"text": "abc", "label": "x"}, {"text": "abc"}],
     'train.jsonl:2: needs "text" and "label" (no "label"'),
    ([{"label": "x"}], 'train.jsonl:1: needs "text" and "label" (no "text"'),
    ([{"text": "abc", "label": "x"}, {"text": " ", "label": "y"}],
     'train.jsonl:2: "text" is empty'),
    ([{"text": "abc", "label": 1}], 'train.jsonl:1: "label" must be a string, got int'),
    ([{"text": "abc", "label": "x"}, {"text": "def", "label": "x"}],
     "every example has the label 'x'; a classifier needs at least two labels"),
])
def test_bad_training_data_is_one_clear_line(toy, tmp_path, cli, refused, lines, why):
    model_dir, _, _ = toy
    (tmp_path / "d").mkdir()
    write_rows(tmp_path / "d" / "train.jsonl", lines)
    r = cli("finetune", "--task", "classify", "--model", model_dir, "--data", tmp_path / "d",
            "--out", tmp_path / "o")
    assert why in refused(r)
    assert not (tmp_path / "o").exists()


def test_other_refusals(toy, tmp_path, tiny_model, cli, refused):
    model_dir, data, test = toy
    (tmp_path / "empty").mkdir()
    r = cli("finetune", "--task", "classify", "--model", model_dir, "--data", tmp_path / "empty",
            "--out", tmp_path / "o")
    assert "no train.jsonl in this folder" in refused(r)
    (tmp_path / "v").mkdir()
    write_rows(tmp_path / "v" / "train.jsonl", toy_rows(8, 0))
    write_rows(tmp_path / "v" / "valid.jsonl", [{"text": "zzz", "label": "other"}])
    r = cli("finetune", "--task", "classify", "--model", model_dir, "--data", tmp_path / "v",
            "--out", tmp_path / "o")
    assert "valid.jsonl:1: label 'other' is not in train.jsonl (its labels: " in refused(r)
    assert not (tmp_path / "o").exists()
    r = cli("finetune", "--model", model_dir, "--data", data, "--out", tmp_path / "o",
            "--head-only")
    assert "--head-only needs --task classify" in refused(r)
    r = cli("finetune", "--task", "classify", "--model", model_dir, "--data", data,
            "--out", tmp_path / "o", "--mask-prompt")
    assert "--mask-prompt does not apply" in refused(r)

    clf = tiny_classifier(tiny_model, labels=("number", "word"))
    save_classifier(clf, tmp_path / "clf", TOK)
    unknown = write_rows(tmp_path / "t.jsonl", [{"text": "12", "label": "number"},
                                                {"text": "hm", "label": "maybe"}])
    r = cli("eval", "--task", "classify", "--model", tmp_path / "clf", "--data", unknown)
    assert "t.jsonl:2: label 'maybe' is not one of the classifier's labels" in refused(r)
    pc = write_rows(tmp_path / "pc.jsonl", [{"prompt": "a:", "completion": " b"}])
    r = cli("eval", "--task", "classify", "--model", tmp_path / "clf", "--data", pc)
    assert 'pc.jsonl:1: needs "text" and "label"' in refused(r)
    r = cli("classify", "--model", model_dir, "hello")
    assert "not a classifier" in refused(r)
    r = cli("classify", "--model", tmp_path / "clf", "-", input="12\n\nab\n")
    assert "stdin line 2: empty text" in refused(r)
    r = cli("classify", "--model", tmp_path / "clf")
    assert "give one or more TEXT" in refused(r)
