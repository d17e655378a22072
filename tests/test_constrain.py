"""JSON-constrained decoding: random token choices among the allowed ones always give JSON that
parses and validates, within max_tokens; forbidden tokens raise; unsupported schemas are refused
in one line; a random-weight model decodes valid JSON."""

from __future__ import annotations

import json
import random

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

import mlxgpt
from mlxgpt.errors import MlxgptError
from mlxgpt.generation.constrain import (
    INF,
    K_STR,
    MAX_WHITESPACE,
    JsonConstraint,
    JsonState,
)
from mlxgpt.generation.context import Context
from mlxgpt.tokenizers import byte_tokenizer, gpt2_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "format": "email", "title": "ignored annotations"},
        "married": {"type": "boolean"},
        "spouse": {"type": "null"},
        "role": {"enum": ["admin", "user", 3, None]},
    },
    "required": ["name", "age", "married"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": PERSON,
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "minLength": 5, "maxLength": 5}},
                "required": ["zip"]},
            "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1,
                       "maxItems": 4},
        },
        "required": ["person", "scores"],
    },
    "arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": -3, "maximum": 3},
                  "maxItems": 3},
        "minItems": 2, "maxItems": 5,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number"},
            "p": {"type": "number", "minimum": 0, "maximum": 1},
            "t": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 0.25},
            "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 1000},
            "big": {"type": "integer", "minimum": 12345678901234567890},
        },
        "required": ["x", "p", "t", "n", "big"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"type": "string", "enum": ["red", "green", "blue", 7]},
            "level": {"enum": [1, 12, 123, "x\"y\\z", [1, {"a": None}], {"k": "v"}]},
            "fixed": {"const": "yes"},
            "opt": {"type": ["string", "null"], "maxLength": 3},
        },
        "required": ["color", "level", "fixed", "opt"],
    },
    "pydantic": {  # as pydantic writes it: $defs, $ref, anyOf for Optional, allOf wrappers
        "$defs": {
            "Kind": {"enum": ["cat", "dog"], "title": "Kind", "type": "string"},
            "Pet": {"properties": {"kind": {"$ref": "#/$defs/Kind"},
                                   "name": {"title": "Name", "type": "string"}},
                    "required": ["kind", "name"], "title": "Pet", "type": "object"},
        },
        "properties": {
            "owner": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "pets": {"items": {"$ref": "#/$defs/Pet"}, "type": "array", "maxItems": 3},
            "best": {"allOf": [{"$ref": "#/$defs/Pet"}], "description": "the best one"},
        },
        "required": ["pets", "best"],
        "title": "Household",
        "type": "object",
    },
    "recursive": {
        "$ref": "#/$defs/node",
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["v"]}},
    },
    "map": {"type": "object", "additionalProperties": {"type": "boolean"}},
    "any": {},
    "json_object": None,
}


def drive(state: JsonState, rng: random.Random, eot: int, limit: int = 10_000) -> int:
    """Random choices among the allowed tokens (a third of the time among single bytes, so that
    structure gets written too) until the end-of-text token; returns the tokens read."""
    n = 0
    while True:
        mask = state.allowed()
        ids = np.flatnonzero(mask)
        assert len(ids), f"no token allowed after {state.text!r}"
        assert bool(mask[eot]) == state.complete
        short = ids[ids < 256] if rng.random() < 1 / 3 else ids
        token = int(rng.choice(short if len(short) else ids))
        if token == eot:
            return n
        state.advance(token)
        n += 1
        assert n <= limit


def check(text: str, schema: dict | None):
    doc = json.loads(text)
    if schema is None:
        assert isinstance(doc, dict)
    else:
        jsonschema.validate(doc, schema)
    return doc


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("tok_name", ["byte", "gpt2"])
def test_random_choices_give_valid_json(name, tok_name):
    tok = byte_tokenizer() if tok_name == "byte" else gpt2_tokenizer()
    schema = SCHEMAS[name]
    constraint = JsonConstraint(tok, schema)
    rng = random.Random(f"{name}-{tok_name}")
    runs = 12 if tok_name == "byte" else 6
    for run in range(runs):
        # budgets from the tightest possible to roomy; the byte tokenizer needs more tokens
        budget = constraint.min_tokens + [0, 3, 20, 80][run % 4] * (3 if tok_name == "byte" else 1)
        state = constraint.start(max_tokens=budget)
        n = drive(state, rng, tok.eot_id)
        assert n <= budget and state.complete
        check(state.text, schema)


def test_tight_budget_ends_on_time():
    tok = gpt2_tokenizer()
    constraint = JsonConstraint(tok, SCHEMAS["nested"])
    m = constraint.min_tokens
    with pytest.raises(MlxgptError, match=f"max_tokens {m - 1} is too small for this schema: "
                                          f"it needs at least {m}"):
        constraint.start(max_tokens=m - 1)
    rng = random.Random(0)
    for budget in (m, m + 1, m + 5):
        state = constraint.start(max_tokens=budget)
        for _ in range(budget):  # never stops early on its own: take anything but the end
            ids = np.flatnonzero(state.allowed())
            ids = ids[ids != tok.eot_id]
            if not len(ids):
                break
            state.advance(int(rng.choice(ids)))
        assert state.complete
        mask = state.allowed()
        assert mask[tok.eot_id] and (mask.sum() == 1 or len(tok.encode(state.text)) < budget)
        check(state.text, SCHEMAS["nested"])


def test_spent_budget_allows_only_the_end():
    tok = byte_tokenizer()
    state = JsonConstraint(tok, {"type": "integer"}).start(max_tokens=3)
    for ch in b"-12":
        state.advance(ch)
    assert state.complete and np.flatnonzero(state.allowed()).tolist() == [tok.eot_id]
    with pytest.raises(MlxgptError):
        state.advance(ord("3"))
    state.advance(tok.eot_id)
    assert not state.allowed().any() and state.text == "-12"


def test_forbidden_tokens_raise_and_leave_the_state():
    tok = gpt2_tokenizer()
    state = JsonConstraint(tok, PERSON, vocab_size=50304).start(max_tokens=100)
    mask = state.allowed()
    assert mask.shape == (50304,) and not mask[tok.vocab_size:].any() and not mask[tok.eot_id]
    for bad in (tok.encode("hello")[0], tok.eot_id, 50300, tok.encode(" {")[0]):
        assert not mask[bad]
        with pytest.raises(MlxgptError, match="allowed"):
            state.advance(bad)
    assert state.text == ""
    for t in tok.encode('{"name":"Al","'):
        state.advance(t)
    married, age = tok.encode("married")[0], tok.encode("age")[0]
    assert state.allowed()[age] and not state.allowed()[married]
    with pytest.raises(MlxgptError):  # "age" is required before "married"
        state.advance(married)
    state = JsonConstraint(tok, PERSON).start()
    for t in tok.encode('{"name":"Al'):
        state.advance(t)
    with pytest.raises(MlxgptError):  # raw control characters cannot be in a string
        state.advance(tok.encode("\n")[0])
    assert state.text == '{"name":"Al' and not state.complete


def feed(schema, text: str, max_tokens: int | None = None,
         whitespace: int = MAX_WHITESPACE) -> JsonState:
    """Read ``text`` byte by byte (MlxgptError at the first byte that is not allowed)."""
    state = JsonConstraint(byte_tokenizer(), schema, whitespace=whitespace).start(max_tokens)
    for b in text.encode():
        state.advance(b)
    return state


@pytest.mark.parametrize("text", [
    '{"a":1,"c":"x"}', '{ "a" : 1 , "b" : [ ] , "c" : "" }', '{\n  "a": -0.5e+10,\n  "c": "é"}',
    '{"a":2,"b":[true,null,"x"],"c":"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD7FF"}',
])
def test_accepted_texts(text):
    schema = {"properties": {"a": {"type": "number"}, "b": {"type": "array"},
                             "c": {"type": "string"}}, "required": ["a", "c"]}
    state = feed(schema, text, whitespace=4)  # room to indent
    assert state.complete and state.text == text
    check(text, schema)


def test_whitespace_budget_per_gap():
    schema = {"properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert feed(schema, '{"a": 1}').complete  # the default: one byte per gap
    with pytest.raises(MlxgptError):
        feed(schema, '{"a":  1}')
    with pytest.raises(MlxgptError):
        feed(schema, '{"a": 1}', whitespace=0)
    assert feed(schema, '{"a":1}', whitespace=0).complete
    assert feed(schema, '{\n  "a": 1\n}', whitespace=3).complete
    with pytest.raises(MlxgptError, match="whitespace"):
        JsonConstraint(byte_tokenizer(), schema, whitespace=-1)


@pytest.mark.parametrize("text", [
    '{"c":"x","a":1}',  # properties come in the schema's order
    '{"a":1}',  # c is required
    '{"a":1,"c":"x","d":2}',  # nothing unlisted
    '{"a":01', '{"a":1.}', '{"a":+1', '{"a":1,}', "[", ' {"a":1,"c":"x"}',
    '{"a":1,"c":"\x01"}', '{"a":1,"c":"\\x"}', '{"a":1,"c":"\\ud800"}',
    '{"a":1,"c":"x"} ',  # nothing after the document
    '{"a":1,"c":"x"' + " " * (MAX_WHITESPACE + 1) + "}",
])
def test_refused_texts(text):
    schema = {"properties": {"a": {"type": "number"}, "b": {"type": "array"},
                             "c": {"type": "string"}}, "required": ["a", "c"]}
    with pytest.raises(MlxgptError):
        feed(schema, text)


def test_invalid_utf8_is_refused():
    state = feed({"type": "string"}, '"')
    for bad in (b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90", b"\xff", b"\x80"):
        trial = feed({"type": "string"}, '"')
        with pytest.raises(MlxgptError):
            for b in bad:
                trial.advance(b)
    for b in "é€😀".encode():
        state.advance(b)
    state.advance(ord('"'))
    assert json.loads(state.text) == "é€😀"


def test_string_lengths_count_characters():
    schema = {"type": "string", "minLength": 2, "maxLength": 3}
    assert feed(schema, '"é\\u00e9😀"').complete
    for text in ('"é\\u00e9😀x', '"x"'):
        with pytest.raises(MlxgptError):
            feed(schema, text)


def accepted_documents(schema) -> set[str]:
    """Every document the automaton accepts (for finite languages), by depth-first search."""
    tok = byte_tokenizer()
    found: set[str] = set()

    def visit(state: JsonState, data: bytes):
        mask = state.allowed()
        if mask[tok.eot_id]:
            found.add(data.decode())
        for b in np.flatnonzero(mask[:256]):
            nxt = JsonConstraint(tok, schema).start()
            for c in data + bytes([b]):
                nxt.advance(c)
            visit(nxt, data + bytes([b]))

    visit(JsonConstraint(tok, schema).start(), b"")
    return found


def test_integer_bounds_are_exact():
    docs = accepted_documents({"type": "integer", "minimum": -5, "exclusiveMaximum": 13})
    assert docs == {str(i) for i in range(-5, 13)} | {"-0"}
    docs = accepted_documents({"type": "integer", "exclusiveMinimum": 6.5, "maximum": 12})
    assert docs == {str(i) for i in range(7, 13)}


def test_number_bounds_are_exact():
    schema = {"type": "number", "exclusiveMinimum": 0.5, "maximum": 1}
    assert feed(schema, "0.500001").complete and feed(schema, "1.000000").complete
    assert not feed(schema, "0.5").complete  # not yet: more decimals must follow
    for text in ("0.5000000", "1.000001", "2", "-", "1e"):
        with pytest.raises(MlxgptError):
            feed(schema, text)


def test_enum_prefixes_and_literals():
    assert accepted_documents({"enum": [1, 12, "a", None, [1, 2]]}) == {
        "1", "12", '"a"', "null", "[1,2]"}
    assert accepted_documents({"type": "boolean"}) == {"true", "false"}


def assert_mask_matches_advance(state: JsonState):
    """Every byte token: allowed() says yes exactly when advance() accepts it."""
    mask = state.allowed()
    for t in range(256):
        trial = JsonState(state._engine, state._left)
        trial._states, trial._data = state._states, bytearray(state._data)
        try:
            trial.advance(t)
            ok = True
        except MlxgptError:
            ok = False
        assert ok == mask[t], (state.text, t)
    return mask


def test_masks_agree_with_advance():
    rng = random.Random(3)
    long_array = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 12}
    for schema in (SCHEMAS["nested"], SCHEMAS["enums"], SCHEMAS["numbers"], SCHEMAS["arrays"],
                   long_array, None):
        constraint = JsonConstraint(byte_tokenizer(), schema)
        state = constraint.start(max_tokens=constraint.min_tokens + rng.choice([8, 40]))
        while True:  # until the budget is spent
            mask = assert_mask_matches_advance(state)
            if not mask[:256].any():
                break
            state.advance(int(rng.choice(np.flatnonzero(mask[:256]))))


@pytest.mark.parametrize("prefix", ["[1,2,3,4,5", "[1,2,3,4,5,6,7,8,9,1,2",
                                    "[1,2,3,4,5,6,7,8,9,1,2,3"])
@pytest.mark.parametrize("slack", [1, 2, 3, None])
def test_array_counts_near_their_limits(prefix, slack):
    """Masks are cached for array counts far from minItems/maxItems; near them they differ."""
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 12}
    state = feed(schema, prefix, None if slack is None else len(prefix) + slack)
    assert_mask_matches_advance(state)


@pytest.mark.parametrize("tok_name", ["byte", "gpt2"])
def test_string_fast_path_equals_the_trie_walk(tok_name):
    """Masks inside strings come from per-token tables; they equal walking the whole trie."""
    tok = byte_tokenizer() if tok_name == "byte" else gpt2_tokenizer()
    schema = {"type": "array", "items": {"anyOf": [
        {"type": "string", "minLength": 3, "maxLength": 6}, {"type": "string"}]}}
    constraint = JsonConstraint(tok, schema)
    engine = constraint._engine
    rng = random.Random(5)
    state = constraint.start(max_tokens=60)
    compared = 0
    while compared < (40 if tok_name == "byte" else 3):
        strings = [s for s in state._states if s[-1][0] == K_STR]
        for stack in strings:
            ids, need = engine._walk(engine._intern(frozenset([stack])))
            slow = np.full(engine.vocab.size, INF, np.int32)
            slow[ids] = need
            assert np.array_equal(np.minimum(engine._string_needs(stack), INF), slow)
            compared += 1
        ids = np.flatnonzero(state.allowed())
        token = int(rng.choice(ids))
        if token == tok.eot_id:
            state = constraint.start(max_tokens=60)
        else:
            state.advance(token)


def _nested(depth: int) -> dict:
    """Arrays of arrays ``depth`` deep (built without recursion)."""
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _ref_chain(n: int) -> dict:
    """$defs a0 -> a1 -> ... -> an: shallow as JSON, deep to compile."""
    defs: dict = {f"a{i}": {"type": "array", "items": {"$ref": f"#/$defs/a{i + 1}"}}
                  for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


@pytest.mark.parametrize(("schema", "match"), [
    ({"type": "string", "pattern": "^a"}, "unsupported JSON schema keyword 'pattern'"),
    ({"properties": {"x": {"type": "integer", "multipleOf": 3}}},
     "#/properties/x: unsupported JSON schema keyword 'multipleOf'"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"if": {}, "then": {}}, "'if'"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems is not supported"),
    ({"type": "array", "items": [{"type": "string"}]}, "items as a list"),
    ({"$ref": "other.json#/a"}, "only local $ref"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"properties": {"a": {}}, "required": ["b"]}, "required property 'b' is not in properties"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength is larger than maxLength"),
    ({"type": "strnig"}, "unknown type 'strnig'"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"type": "integer", "enum": ["a"]}, "no enum/const value has the schema's type"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer lies between"),
    ({"allOf": [{}, {}]}, "allOf is supported with exactly one schema"),
    ({"anyOf": [{}], "type": "object"}, "anyOf together with 'type'"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
     "accepts no document"),
    ({"type": "integer", "maximum": "9"}, "maximum must be a number"),
    ([1, 2], "must be a JSON object"),
    # hostile schemas (a server compiles them from clients): refused, never a crash
    ({"type": "integer", "minimum": 1e40}, "minimum must be between -1e20 and 1e20"),
    ({"type": "number", "exclusiveMaximum": -(10**400)}, "exclusiveMaximum must be between"),
    (_nested(70), "schemas are nested more than 64 deep"),
    (_nested(900), "nested more than 128 levels deep"),
    ({"const": _nested_list(2000)}, "nested more than 128 levels deep"),
    (_ref_chain(100), "schemas are nested more than 64 deep"),
])
def test_unsupported_schemas_are_refused_in_one_line(schema, match):
    with pytest.raises(MlxgptError) as info:
        JsonConstraint(byte_tokenizer(), schema)
    msg = str(info.value)
    assert match in msg and "\n" not in msg


def test_limits_leave_real_schemas_alone():
    # int64 bounds and a few levels of nesting are ordinary in generated schemas
    JsonConstraint(byte_tokenizer(), {"type": "integer", "minimum": -(2**63),
                                      "maximum": 2**63 - 1})
    JsonConstraint(byte_tokenizer(), _nested(60))
    JsonConstraint(byte_tokenizer(), _ref_chain(20))


def test_a_tokenizer_without_every_printable_byte_is_refused():
    with pytest.raises(MlxgptError, match="needs a token for every printable ASCII byte"):
        JsonConstraint(byte_tokenizer(), None, vocab_size=100)


@pytest.mark.parametrize("tok_name", ["gpt2", "byte"])
def test_random_model_greedy_decode_is_valid(tmp_path, model_folder, tok_name):
    """A random-weight model, argmax of the logits where allowed() is False set to -inf."""
    model, tok = mlxgpt.load(model_folder(tmp_path, tok_name, n_positions=256))
    schemas = [SCHEMAS["nested"], SCHEMAS["enums"], None]
    for schema in schemas:
        constraint = JsonConstraint(tok, schema, vocab_size=model.config.vocab_size)
        budget = constraint.min_tokens + 40
        state = constraint.start(max_tokens=budget)
        ctx = Context(model)
        logits = ctx.prefill(tok.encode("Answer in JSON: "))
        for _ in range(budget + 1):
            scores = np.array(logits[0].astype(mx.float32))
            scores[~state.allowed()] = -np.inf
            token = int(scores.argmax())
            if token == tok.eot_id:
                break
            state.advance(token)
            logits = ctx.step(mx.array([token]))
        assert state.complete
        check(state.text, schema)
