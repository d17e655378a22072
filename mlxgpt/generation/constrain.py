"""Constrained decoding to JSON: a token is allowed only if the text stays a prefix of a document
that the schema accepts, so the output always parses (and validates), whatever the model.

Use::

    constraint = JsonConstraint(tokenizer, schema, vocab_size=model.config.vocab_size)
    state = constraint.start(max_tokens=256)
    while True:
        logits[~state.allowed()] = -inf; token = pick(logits)
        if token == tokenizer.eot_id: break          # allowed exactly when state.complete
        state.advance(token)                          # MlxgptError if it was not allowed
    json.loads(state.text)

The schema subset (anything else is refused by name, as one ``MlxgptError`` line):

- ``type``: ``object``, ``array``, ``string``, ``number``, ``integer``, ``boolean``, ``null`` or a
  list of them; without ``type`` it is inferred from the keywords (none: any JSON value).
- objects: ``properties`` and ``required``. Only listed properties are written, in the order
  they are listed; required ones always, optional ones when the model chooses to.
  ``additionalProperties`` is accepted in any form (nothing extra is written); an object without
  ``properties`` is free-form: any keys, values of the ``additionalProperties`` schema if it is
  one, else any JSON value (``{}`` only if it is ``false``).
- arrays: ``items`` (one schema), ``minItems``, ``maxItems``, ``uniqueItems: false``.
- strings: ``minLength``, ``maxLength`` (in characters, as JSON Schema counts them); ``format``
  is an annotation and ignored.
- numbers and integers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``
  (exact; a bounded ``number`` is written with at most 6 decimals and no exponent).
- ``enum`` and ``const`` (values of any JSON type, written compactly; filtered by ``type``),
  ``anyOf`` and ``oneOf`` (generated alike: alternatives of a ``oneOf`` should not overlap),
  ``$ref`` to ``#``, ``#/$defs/...``, ``#/definitions/...`` (recursion included), ``true`` /
  ``false`` schemas; annotations (``title``, ``description``, ``default``, ``examples`` ...).
- ``schema=None`` (``response_format`` ``json_object``): any JSON object.
- limits (a schema may come from an untrusted client): schemas nested at most
  MAX_SCHEMA_DEPTH deep (``$ref`` chains included), a schema document at most
  MAX_SCHEMA_NESTING JSON levels deep, numeric limits within +-MAX_LIMIT.

The text: no whitespace before or after the document; at most ``whitespace`` bytes of it
(space, tab, newline, carriage return; default MAX_WHITESPACE = 1, so ``{"a": 1, "b": [2]}``
but no indentation: a weak model otherwise pads every gap) in each gap between the tokens of the
JSON. In strings
any UTF-8 character (validated: no overlong forms, no surrogates), control characters only as
escapes, ``\\uXXXX`` escapes of anything but surrogates.

Termination: with ``max_tokens``, a token is allowed only if a complete document still fits the
tokens left after it, counting one token per byte of its shortest completion (every byte is a
token of byte-level BPEs and of the byte tokenizer; the tokenizer must have all 256). So a state
never runs out of allowed tokens and the document is complete when the budget is spent (then
only ``<|endoftext|>`` is allowed; the budget does not count it). ``start`` refuses a
``max_tokens`` that cannot hold the shortest document. Without ``max_tokens`` only the caps
bound a document: strings MAX_STRING characters, arrays MAX_ITEMS items, free-form objects
MAX_PROPERTIES properties, free-form nesting MAX_DEPTH, numbers INT_DIGITS + FRAC_DIGITS digits
and EXP_DIGITS exponent digits (explicit ``maxLength`` / ``maxItems`` win).

How it is fast: the schema compiles to a pushdown automaton over bytes whose states (stacks of
frames, sets of stacks where ``anyOf`` branches) are hashable. Per tokenizer, once, the
vocabulary goes into a byte trie; a state's mask walks the trie stepping the automaton and
prunes a subtree at its first dead byte, and the result (each live token and the length of the
shortest completion after it) is cached by state. Inside a free string, where almost every
token lives and the states never repeat (the character count grows), a walk would cost tens of
milliseconds: there each token's effect on a string (characters added, closed or not, the bytes
after the closing quote) is precomputed once per tokenizer, so the mask is a few numpy
operations over the vocabulary plus a walk of the few bytes that follow a quote.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import MlxgptError
from ..tokenizers.base import Tokenizer

MAX_WHITESPACE = 1  # default bytes of whitespace in one gap between JSON tokens (see below)
MAX_STRING = 1024  # characters in a string without maxLength
MAX_KEY = 64  # characters in a key of a free-form object
MAX_ITEMS = 128  # items in an array without maxItems
MAX_PROPERTIES = 32  # properties in a free-form object
MAX_DEPTH = 6  # nesting of free-form objects and arrays
INT_DIGITS = 15  # digits before the point (15: every such integer is exact as a double)
FRAC_DIGITS = 15  # digits after the point in an unbounded number
EXP_DIGITS = 2  # exponent digits
BOUNDED_FRAC_DIGITS = 6  # digits after the point in a number with minimum / maximum
# Limits on what a schema may ask, so a hostile one is refused in one line rather than crashing
# a recursive reader or asking for numbers no model writes (int64/uint64 bounds still fit).
MAX_SCHEMA_DEPTH = 64  # schemas inside schemas (properties, items, anyOf, $ref chains ...)
MAX_SCHEMA_NESTING = 128  # JSON nesting of the schema document (objects and lists)
MAX_LIMIT = 10**20  # largest magnitude of minimum / maximum / exclusive* in a schema

INF = 1 << 29  # "no completion": larger than any budget; INF + a few lengths fit int32
_MAX_LEN = 1 << 26  # lengths are clamped here so that sums with INF stay in int32
_DFA_LIMIT = 50_000  # interned states kept before the tables are dropped and rebuilt
_NEED_CACHE = 4096  # cached masks per schema
_ENGINES_PER_TOKENIZER = 16  # compiled schemas kept per tokenizer

_ANNOTATIONS = frozenset(
    "title description default examples $comment $schema $id deprecated readOnly writeOnly "
    "format contentEncoding contentMediaType $defs definitions".split()
)
_TYPED = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems", "uniqueItems"}),
    "string": frozenset({"minLength", "maxLength"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
}
_KNOWN = _ANNOTATIONS.union({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"},
                            *_TYPED.values())
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# --------------------------------------------------------------------------- bytes

_WS = frozenset(b" \t\n\r")
_QUOTE, _COLON, _COMMA = ord('"'), ord(":"), ord(",")
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = ord("{"), ord("}"), ord("["), ord("]")

# String lexer states at a byte boundary: plain, after "\", in "\uXXXX" (digits read; UD: after a
# first digit d/D, the second must keep it off the surrogates), and inside a UTF-8 character
# (continuation bytes still needed, the range the next one must fall in).
S_NORMAL, S_ESC, S_U0, S_UD, S_U1, S_U2, S_U3 = range(7)
_UTF8 = {7: (1, 0x80, 0xBF), 8: (2, 0x80, 0xBF), 9: (2, 0xA0, 0xBF), 10: (2, 0x80, 0x9F),
         11: (3, 0x80, 0xBF), 12: (3, 0x90, 0xBF), 13: (3, 0x80, 0x8F)}
_N_SUBS = 14
_FIN = (0, 1, 4, 3, 3, 2, 1, 1, 2, 2, 2, 3, 3, 3)  # bytes that finish the character in progress
_DEAD, _CLOSE = -1, -2


def _string_table() -> list[list[int]]:
    """[sub][byte] -> _DEAD, _CLOSE or new_sub * 2 + (1 if a character was completed)."""
    t = [[_DEAD] * 256 for _ in range(_N_SUBS)]
    hexd = b"0123456789abcdefABCDEF"
    lead = {0xE0: 9, 0xED: 10, 0xF0: 12, 0xF4: 13}
    for b in range(256):
        if b == _QUOTE:
            t[S_NORMAL][b] = _CLOSE
        elif b == 0x5C:
            t[S_NORMAL][b] = S_ESC * 2
        elif 0x20 <= b < 0x80:
            t[S_NORMAL][b] = S_NORMAL * 2 + 1
        elif 0xC2 <= b <= 0xDF:
            t[S_NORMAL][b] = 7 * 2
        elif 0xE0 <= b <= 0xEF:
            t[S_NORMAL][b] = lead.get(b, 8) * 2
        elif 0xF0 <= b <= 0xF4:
            t[S_NORMAL][b] = lead.get(b, 11) * 2
        if b in b'"\\/bfnrt':
            t[S_ESC][b] = S_NORMAL * 2 + 1
        if b == ord("u"):
            t[S_ESC][b] = S_U0 * 2
        if b in hexd:
            t[S_U0][b] = (S_UD if b in b"dD" else S_U1) * 2
            t[S_U1][b] = S_U2 * 2
            t[S_U2][b] = S_U3 * 2
            t[S_U3][b] = S_NORMAL * 2 + 1
        if b in b"01234567":
            t[S_UD][b] = S_U2 * 2
        for sub, (need, lo, hi) in _UTF8.items():
            if lo <= b <= hi:
                t[sub][b] = S_NORMAL * 2 + 1 if need == 1 else (7 if need == 2 else 8) * 2
    return t


_STR_NEXT = _string_table()
# Printable ASCII but '"' and '\': a token made only of these is plain string text.
_PLAIN = bytes(b for b in range(0x20, 0x7F) if b not in (_QUOTE, 0x5C))


def _lex_string(sub: int, data: bytes) -> tuple[int, int, int, bytes]:
    """A token read inside a string from lexer state ``sub``: (outcome, characters completed,
    end state, bytes after the closing quote); outcome 0 dead, 1 still inside, 2 closed."""
    chars = 0
    for i, b in enumerate(data):
        r = _STR_NEXT[sub][b]
        if r == _CLOSE:
            return 2, chars, S_NORMAL, data[i + 1 :]
        if r == _DEAD:
            return 0, 0, 0, b""
        sub, chars = r >> 1, chars + (r & 1)
    return 1, chars, sub, b""


# --------------------------------------------------------------------------- the vocabulary


class _Vocab:
    """What a tokenizer's vocabulary looks like to the automaton, built once per (tokenizer,
    vocab_size): each id's bytes, a byte trie, and per string-lexer state the effect of every
    token on a string (for masks inside strings)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.size = vocab_size
        eot = tokenizer.eot_id
        self.eot = eot if eot is not None and 0 <= eot < vocab_size else None
        special = set(getattr(tokenizer, "special_tokens", {}).values()) | {eot}
        self.bytes: list[bytes | None] = [None] * vocab_size
        for i in range(min(vocab_size, tokenizer.vocab_size)):
            if i in special:
                continue
            try:
                b = tokenizer.token_bytes(i)
            except (MlxgptError, IndexError, KeyError):
                continue
            self.bytes[i] = b or None
        # Every printable ASCII byte and JSON's whitespace on its own, so every document can be
        # spelled. Other bytes may lack a token (SmolLM2 has none for 0x04 or 0xF1): no token
        # holds them then, so the automaton never reaches a state that needs them.
        singles = {b[0] for b in self.bytes if b is not None and len(b) == 1}
        needed = set(range(0x20, 0x7F)) | set(_WS)
        if not needed <= singles:
            missing = min(needed - singles)
            raise MlxgptError(
                f"constrained output needs a token for every printable ASCII byte; tokenizer "
                f"{getattr(tokenizer, 'name', '?')} has none for byte 0x{missing:02x} "
                f"(among {vocab_size} ids)"
            )
        self._build_trie()
        # A token completes at most this many values of one array or object (one per comma,
        # plus the value in progress): counts further than this from a limit behave alike.
        self.max_values = 1 + max(b.count(b",") for b in self.bytes if b is not None)
        self.first = np.array([b[0] if b else 0 for b in self.bytes], np.uint8)
        # Every suffix that follows a '"' in some token: what may come after a string closes.
        rests = {b[i + 1 :] for b in self.bytes if b is not None for i, c in enumerate(b)
                 if c == _QUOTE}
        self.rests = sorted(rests)
        self.rest_index = {r: k for k, r in enumerate(self.rests)}
        self._lex: list[_StringLex | None] = [None] * _N_SUBS
        self._lock = threading.Lock()
        self.lex(S_NORMAL)  # the others are met rarely: built on first use

    def _build_trie(self) -> None:
        kids: list[dict[int, int]] = [{}]
        ends: list[list[int] | None] = [None]
        for i, data in enumerate(self.bytes):
            if data is None:
                continue
            node = 0
            for c in data:
                nxt = kids[node].get(c)
                if nxt is None:
                    nxt = len(kids)
                    kids[node][c] = nxt
                    kids.append({})
                    ends.append(None)
                node = nxt
            if ends[node] is None:
                ends[node] = []
            ends[node].append(i)  # type: ignore[union-attr]
        # Tuples walk faster than dicts; a node's ids as one array for the masks.
        self.kids = [tuple(d.items()) for d in kids]
        self.ends = [None if e is None else tuple(e) for e in ends]

    def lex(self, sub: int) -> _StringLex:
        """The string tables for lexer state ``sub`` (built on first use)."""
        table = self._lex[sub]
        if table is None:
            with self._lock:
                table = self._lex[sub] or _StringLex(self, sub)
                self._lex[sub] = table
        return table


class _StringLex:
    """Every token read inside a string from one lexer state, as arrays over the vocabulary."""

    def __init__(self, vocab: _Vocab, sub: int):
        n = vocab.size
        kind = np.zeros(n, np.int8)
        chars = np.zeros(n, np.int32)
        part = np.zeros(n, np.int32)  # 1: ends inside a character (it will count as one)
        fin = np.zeros(n, np.int32)  # bytes that finish that character
        rest = np.zeros(n, np.int32)  # closed: index of the bytes after the quote
        plain_start = sub == S_NORMAL
        live = np.array([r != _DEAD for r in _STR_NEXT[sub]])[vocab.first]
        for i in np.flatnonzero(live).tolist():  # the others die at their first byte
            data = vocab.bytes[i]
            if data is None:
                continue
            if plain_start and not data.translate(None, _PLAIN):
                kind[i], chars[i] = 1, len(data)
                continue
            k, c, end, after = _lex_string(sub, data)
            kind[i], chars[i] = k, c
            if k == 1:
                part[i], fin[i] = end != S_NORMAL, _FIN[end]
            elif k == 2:
                rest[i] = vocab.rest_index[after]
        inside = kind == 1
        self.in_fin = np.where(inside, fin, INF).astype(np.int32)  # + what follows = need
        self.in_len = (chars + part).astype(np.int32)  # characters the string has after it
        self.in_max = int(self.in_len[inside].max(initial=0))
        self.cl_ids = np.flatnonzero(kind == 2)
        self.cl_chars = chars[self.cl_ids]
        self.cl_rest = rest[self.cl_ids]


# --------------------------------------------------------------------------- the schema's nodes

N_UNION, N_STR, N_NUM, N_LIT, N_OBJ, N_FOBJ, N_ARR = range(7)


class _Node:
    """One compiled schema: ``kind`` and its parameters; ``min`` = bytes of its shortest
    document (INF: none)."""

    def __init__(self, kind: int, **params: Any):
        self.kind, self.min = kind, INF
        self.__dict__.update(params)


class _Trie:
    """Byte strings as a trie: children, terminal value (-1: none), cost = bytes to a terminal."""

    def __init__(self) -> None:
        self.kids: list[dict[int, int]] = [{}]
        self.term: list[int] = [-1]
        self.cost: list[int] = []

    def new(self) -> int:
        self.kids.append({})
        self.term.append(-1)
        return len(self.kids) - 1

    def add(self, root: int, data: bytes, value: int) -> None:
        node = root
        for c in data:
            node = self.kids[node].get(c) or self.kids[node].setdefault(c, self.new())
        self.term[node] = value

    def set_costs(self, at_terminal) -> None:
        """cost[t] = min(at_terminal(term[t]) if terminal, 1 + cost[child])."""
        cost = [INF] * len(self.kids)
        for t in reversed(range(len(self.kids))):  # children are created after parents
            best = at_terminal(self.term[t]) if self.term[t] >= 0 else INF
            for c in self.kids[t].values():
                best = min(best, 1 + cost[c])
            cost[t] = min(best, INF)
        self.cost = cost


# Frames (tuples, so states hash):
#   (K_ROOT, node, phase)                 phase 0 before the value, 1 in it, 2 done
#   (K_OBJ|K_FOBJ|K_ARR, node, phase, a, c, ws)   a: property index / count, c: key trie node
#   (K_STR, node, count, sub)             count: characters so far, sub: lexer state
#   (K_NUM, node, phase, neg, v, k, f, m, e)   int value v of k digits, fraction f of m digits
#   (K_LIT, node, trie node)
K_ROOT, K_OBJ, K_FOBJ, K_ARR, K_STR, K_NUM, K_LIT = range(7)
P_OPEN, P_KEY, P_AFTER_KEY, P_AFTER_COLON, P_IN_VALUE, P_AFTER_VALUE, P_AFTER_COMMA = range(7)
Q_SIGN, Q_ZERO, Q_INT, Q_DOT, Q_FRAC, Q_E, Q_ESIGN, Q_EXP = range(8)
_NUM_REST = (1, 0, 0, 1, 0, 1, 1, 0)  # bytes to finish an unbounded number, by phase


def _json_path(path: str) -> str:
    return "#" + path


class _Compiler:
    """A schema (dict) -> nodes; refuses what it does not support with one line."""

    def __init__(self, root: Any):
        self.root_schema = root
        self.nodes: list[_Node] = []
        self.refs: dict[str, int] = {}
        self.free: dict[int, int] = {}  # depth -> the any-value node there
        self.key_node = self.add(_Node(N_STR, lo=0, hi=MAX_KEY))
        self.depth = 0  # schemas being compiled, one inside the other

    def add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def fail(self, path: str, msg: str) -> MlxgptError:
        return MlxgptError(f"response_format schema at {_json_path(path)}: {msg}")

    # -- free-form values

    def any_value(self, depth: int) -> int:
        """Any JSON value with ``depth`` free containers above it."""
        if depth not in self.free:
            alts = [self.string(0, MAX_STRING), self.number(False, None, None, ""),
                    self.literals([b"true", b"false", b"null"])]
            self.free[depth] = nid = self.add(_Node(N_UNION, alts=alts))
            if depth < MAX_DEPTH:  # containers only while the nesting allows them
                alts += [self.free_object(self.any_value(depth + 1)),
                         self.add(_Node(N_ARR, item=self.any_value(depth + 1), lo=0,
                                        hi=MAX_ITEMS))]
            return nid
        return self.free[depth]

    def free_object(self, value: int) -> int:
        return self.add(_Node(N_FOBJ, key=self.key_node, value=value, maxp=MAX_PROPERTIES))

    def string(self, lo: int, hi: int) -> int:
        return self.add(_Node(N_STR, lo=lo, hi=hi))

    def literals(self, values: list[bytes]) -> int:
        trie = _Trie()
        for k, v in enumerate(values):
            trie.add(0, v, k)
        trie.set_costs(lambda _: 0)
        return self.add(_Node(N_LIT, trie=trie))

    def number(self, integer: bool, lo: Fraction | None, hi: Fraction | None, path: str) -> int:
        bounded = lo is not None or hi is not None
        frac = 0 if integer else BOUNDED_FRAC_DIGITS if bounded else FRAC_DIGITS
        scale = 10**frac
        idig = INT_DIGITS
        lo_s = hi_s = None
        if lo is not None:
            lo_s = -((-lo * scale) // 1)  # ceil
            idig = max(idig, len(str(abs(lo_s) // scale)) + 1)
        if hi is not None:
            hi_s = (hi * scale) // 1  # floor
            idig = max(idig, len(str(abs(hi_s) // scale)) + 1)
        node = _Node(N_NUM, integer=integer, track=bounded, lo=lo_s, hi=hi_s, F=frac,
                     S=scale, idig=idig, exp=not integer and not bounded, rest={})
        if lo_s is not None and hi_s is not None and lo_s > hi_s:
            kind = "integer" if integer else f"number with at most {frac} decimals"
            raise self.fail(path, f"no {kind} lies between minimum and maximum")
        node.min = min(1 + _num_rest(node, f) for b in b"-0123456789"
                       if (f := _num_first(node, 0, b)) is not None)
        return self.add(node)

    # -- schemas

    def compile(self, schema: Any, path: str = "") -> int:
        # Compiling recurses: bound it, so a deep schema (or a long $ref chain) is refused in
        # one line rather than overflowing the stack.
        if self.depth >= MAX_SCHEMA_DEPTH:
            raise self.fail(path, f"schemas are nested more than {MAX_SCHEMA_DEPTH} deep")
        self.depth += 1
        try:
            return self._compile(schema, path)
        finally:
            self.depth -= 1

    def _compile(self, schema: Any, path: str) -> int:
        if schema is True:
            return self.any_value(1)
        if schema is False:
            return self.add(_Node(N_UNION, alts=[]))
        if not isinstance(schema, dict):
            raise self.fail(path, "a schema must be an object or a boolean")
        unknown = sorted(set(schema) - _KNOWN)
        if unknown:
            raise self.fail(path, f"unsupported JSON schema keyword {unknown[0]!r}")
        active = set(schema) - _ANNOTATIONS
        for key in ("$ref", "anyOf", "oneOf", "allOf"):
            if key in schema and active - {key}:
                other = sorted(active - {key})[0]
                raise self.fail(path, f"{key} together with {other!r} is not supported")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path)
        if "allOf" in schema:  # pydantic wraps a $ref with a description this way
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise self.fail(path, "allOf is supported with exactly one schema")
            return self.compile(parts[0], path + "/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise self.fail(path, f"{key} must be a non-empty list of schemas")
                return self.add(_Node(N_UNION, alts=[
                    self.compile(s, f"{path}/{key}/{i}") for i, s in enumerate(alts)]))
        types = self.types(schema, path)
        if "enum" in schema or "const" in schema:
            return self.enum(schema, types, path)
        if types is None:
            return self.any_value(1)
        ids = [self.typed(t, schema, path) for t in types]
        return ids[0] if len(ids) == 1 else self.add(_Node(N_UNION, alts=ids))

    def types(self, schema: dict, path: str) -> list[str] | None:
        t = schema.get("type")
        if t is None:  # inferred from the keywords present; None: any value
            found = [name for name, keys in _TYPED.items() if keys & set(schema)]
            return found or None
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names or not all(
                isinstance(n, str) for n in names):
            raise self.fail(path, "type must be a type name or a list of them")
        for n in names:
            if n not in _TYPES:
                raise self.fail(path, f"unknown type {n!r}")
        return list(dict.fromkeys(names))

    def ref(self, ref: Any, path: str) -> int:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(path, f"only local $ref (#/$defs/...) is supported, not {ref!r}")
        if ref not in self.refs:
            target: Any = self.root_schema
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise self.fail(path, f"$ref {ref!r} points to nothing")
                target = target[part]
            # A placeholder first, so a recursive reference finds this node.
            node = _Node(N_UNION, alts=[])
            self.refs[ref] = self.add(node)
            node.alts = [self.compile(target, ref[1:])]
        return self.refs[ref]

    def enum(self, schema: dict, types: list[str] | None, path: str) -> int:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail(path, "enum must be a non-empty list")
        if "const" in schema and "enum" in schema:
            values = [v for v in values if v in schema["enum"]]
        if types is not None and "type" in schema:
            values = [v for v in values if any(_is_type(v, t) for t in types)]
        if not values:
            raise self.fail(path, "no enum/const value has the schema's type")
        try:
            lits = [json.dumps(v, ensure_ascii=False, separators=(",", ":"),
                               allow_nan=False).encode() for v in values]
        except (TypeError, ValueError) as e:
            raise self.fail(path, f"enum/const value is not JSON: {e}") from None
        return self.literals(lits)

    def typed(self, t: str, schema: dict, path: str) -> int:
        if t == "boolean":
            return self.literals([b"true", b"false"])
        if t == "null":
            return self.literals([b"null"])
        if t == "string":
            lo = self.count(schema, "minLength", 0, path)
            hi = self.count(schema, "maxLength", max(MAX_STRING, lo), path)
            if lo > hi:
                raise self.fail(path, "minLength is larger than maxLength")
            return self.string(lo, hi)
        if t in ("number", "integer"):
            integer = t == "integer"
            return self.number(integer, *self.bounds(schema, path, integer), path)
        if t == "array":
            return self.array(schema, path)
        return self.object(schema, path)

    def count(self, schema: dict, key: str, default: int, path: str) -> int:
        v = schema.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise self.fail(path, f"{key} must be a non-negative integer")
        return v

    def bounds(self, schema: dict, path: str,
               integer: bool) -> tuple[Fraction | None, Fraction | None]:
        def get(key: str) -> Fraction | None:
            v = schema.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                    isinstance(v, float) and not np.isfinite(v)):
                raise self.fail(path, f"{key} must be a number")
            if abs(v) > MAX_LIMIT:  # a 1e40 bound asks for 41-digit numbers; 1e4000, worse
                raise self.fail(path, f"{key} must be between -1e20 and 1e20")
            return Fraction(repr(v)) if isinstance(v, float) else Fraction(v)

        lo, hi, xlo, xhi = (get(k) for k in ("minimum", "maximum", "exclusiveMinimum",
                                             "exclusiveMaximum"))
        step = Fraction(1) if integer else Fraction(1, 10**BOUNDED_FRAC_DIGITS)
        if xlo is not None:  # exclusive bounds: the next grid point inside
            nxt = (xlo // step + 1) * step
            lo = nxt if lo is None else max(lo, nxt)
        if xhi is not None:
            prv = (-((-xhi) // step) - 1) * step
            hi = prv if hi is None else min(hi, prv)
        return lo, hi

    def array(self, schema: dict, path: str) -> int:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise self.fail(path, "items as a list (tuple validation) is not supported")
        if schema.get("uniqueItems", False) is not False:
            raise self.fail(path, "uniqueItems is not supported")
        lo = self.count(schema, "minItems", 0, path)
        hi = self.count(schema, "maxItems", max(MAX_ITEMS, lo), path)
        if lo > hi:
            raise self.fail(path, "minItems is larger than maxItems")
        item = self.compile(items, path + "/items")
        return self.add(_Node(N_ARR, item=item, lo=lo, hi=hi))

    def object(self, schema: dict, path: str) -> int:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict):
            raise self.fail(path, "properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(path, "required must be a list of property names")
        for r in required:
            if r not in props:
                raise self.fail(path, f"required property {r!r} is not in properties")
        extra = schema.get("additionalProperties", True)
        if not props and extra is not False:
            value = self.any_value(1) if extra is True else self.compile(
                extra, path + "/additionalProperties")
            return self.free_object(value)
        keys = [json.dumps(k, ensure_ascii=False).encode() for k in props]
        kids = [self.compile(s, f"{path}/properties/{k}") for k, s in props.items()]
        req = [k in required for k in props]
        return self.add(_Node(N_OBJ, keys=keys, kids=kids, req=req))

    # -- shortest documents

    def finish(self) -> None:
        """Every node's shortest document (a fixpoint: $ref may recurse), then the tables that
        depend on them."""
        nodes = self.nodes
        changed = True
        while changed:
            changed = False
            for node in nodes:
                m = min(_node_min(node, nodes), INF)
                if m < node.min:
                    node.min, changed = m, True
        for node in nodes:
            if node.kind == N_OBJ:
                _object_tables(node, nodes)
            elif node.kind == N_UNION:  # alternatives without a document never start
                node.alts = [a for a in node.alts if nodes[a].min < INF]


def _is_type(v: Any, t: str) -> bool:
    if t == "integer":
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, float) and v.is_integer())
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    py = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}
    return isinstance(v, py[t])


def _node_min(node: _Node, nodes: list[_Node]) -> int:
    k = node.kind
    if k == N_UNION:
        return min((nodes[a].min for a in node.alts), default=INF)
    if k == N_STR:
        return 2 + node.lo
    if k == N_LIT:
        return node.trie.cost[0]
    if k == N_FOBJ:
        return 2
    if k == N_ARR:
        return 2 + node.lo * (nodes[node.item].min + 1) - (1 if node.lo else 0)
    if k == N_OBJ:
        req = [len(key) + 1 + nodes[c].min for key, c, r in
               zip(node.keys, node.kids, node.req, strict=True) if r]
        return 2 + sum(req) + max(len(req) - 1, 0)
    return node.min  # numbers: set when built


def _object_tables(node: _Node, nodes: list[_Node]) -> None:
    """Costs and key tries of an object with listed properties (written in their order)."""
    n = len(node.keys)
    mins = [min(nodes[c].min, INF) for c in node.kids]
    after = [0] * n  # bytes after property p's value: the required ones after it, then '}'
    acc = 1
    for p in reversed(range(n)):
        after[p] = acc
        if node.req[p]:
            acc += 1 + len(node.keys[p]) + 1 + mins[p]
    node.after = after

    def candidates(i: int) -> list[int]:
        out = []
        for q in range(i, n):
            if mins[q] < INF:
                out.append(q)
            if node.req[q]:
                break
        return out

    trie = _Trie()
    node.troot = []
    for i in range(n + 1):
        root = 0 if i == 0 else trie.new()
        node.troot.append(root)
        for q in candidates(i):
            trie.add(root, node.keys[q], q)
    trie.set_costs(lambda p: 1 + mins[p] + after[p])
    node.trie = trie
    node.more = [bool(candidates(p + 1)) for p in range(n)]
    node.nreq = sum(node.req)
    node.req_after = [any(node.req[p + 1 :]) for p in range(n)]


# --------------------------------------------------------------------------- numbers


def _num_first(node: _Node, nid: int, b: int) -> tuple | None:
    """The frame after a number's first byte, or None."""
    if b == ord("-"):
        f = (K_NUM, nid, Q_SIGN, 1, 0, 0, 0, 0, 0)
        return f if not node.track or _num_rest(node, f) < INF else None
    return _num_step(node, (K_NUM, nid, Q_SIGN, 0, 0, 0, 0, 0, 0), b)


def _num_step(node: _Node, f: tuple, b: int) -> tuple | None:
    _, nid, ph, neg, v, k, fr, m, e = f
    track = node.track
    nf = None
    if 48 <= b <= 57:
        d = b - 48
        if ph == Q_SIGN:
            nf = (K_NUM, nid, Q_ZERO if d == 0 else Q_INT, neg, d if track else 0, 1, 0, 0, 0)
        elif ph == Q_INT and k < node.idig:
            nf = (K_NUM, nid, Q_INT, neg, v * 10 + d if track else 0, k + 1, 0, 0, 0)
        elif ph == Q_DOT:
            nf = (K_NUM, nid, Q_FRAC, neg, v, k, d if track else 0, 1, 0)
        elif ph == Q_FRAC and m < node.F:
            nf = (K_NUM, nid, Q_FRAC, neg, v, k, fr * 10 + d if track else 0, m + 1, 0)
        elif ph in (Q_E, Q_ESIGN):
            nf = (K_NUM, nid, Q_EXP, neg, v, k, fr, m, 1)
        elif ph == Q_EXP and e < EXP_DIGITS:
            nf = (K_NUM, nid, Q_EXP, neg, v, k, fr, m, e + 1)
    elif b == ord(".") and node.F and ph in (Q_ZERO, Q_INT):
        nf = (K_NUM, nid, Q_DOT, neg, v, k, 0, 0, 0)
    elif b in b"eE" and node.exp and ph in (Q_ZERO, Q_INT, Q_FRAC):
        nf = (K_NUM, nid, Q_E, neg, v, k, fr, m, 0)
    elif b in b"+-" and ph == Q_E:
        nf = (K_NUM, nid, Q_ESIGN, neg, v, k, fr, m, 0)
    if nf is not None and track and _num_rest(node, nf) >= INF:
        return None
    return nf


def _num_rest(node: _Node, f: tuple) -> int:
    """Bytes that finish number frame f inside the node's bounds (INF: impossible)."""
    if not node.track:
        return _NUM_REST[f[2]]
    memo = node.rest
    if f not in memo:
        memo[f] = _bounded_rest(node, f)
    return memo[f]


def _bounded_rest(node: _Node, f: tuple) -> int:
    _, nid, ph, neg, v, k, fr, m, _e = f
    scale, frac = node.S, node.F
    # Bounds on the magnitude (scaled to integers: value * 10**F).
    if neg:
        mlo = 0 if node.hi is None else max(-node.hi, 0)
        mhi = None if node.lo is None else -node.lo
    else:
        mlo = 0 if node.lo is None else max(node.lo, 0)
        mhi = node.hi
    if mhi is not None and mhi < mlo:
        return INF

    def fits(a: int, b: int, step: int) -> bool:  # a multiple of step in [a, b] and the bounds
        a, b = max(a, mlo), b if mhi is None else min(b, mhi)
        return a <= b and -(-a // step) * step <= b

    if ph == Q_SIGN:
        best = INF
        for d in range(10):
            nf = (K_NUM, nid, Q_ZERO if d == 0 else Q_INT, neg, d, 1, 0, 0, 0)
            best = min(best, 1 + _num_rest(node, nf))
        return best
    if ph in (Q_ZERO, Q_INT):
        best = INF
        for j in range((node.idig - k if ph == Q_INT else 0) + 1):  # j more integer digits
            if j >= best:
                break
            p = 10**j
            a = v * p * scale
            if mhi is not None and a > mhi:
                break
            if fits(a, (v * p + p - 1) * scale, scale):
                best = j
                break
            for mm in range(1, frac + 1):  # or a point and mm decimals
                if j + 1 + mm >= best:
                    break
                if fits(a, (v * p + p) * scale - 1, 10 ** (frac - mm)):
                    best = j + 1 + mm
                    break
        return best
    if ph == Q_DOT:
        for mm in range(1, frac + 1):
            if fits(v * scale, (v + 1) * scale - 1, 10 ** (frac - mm)):
                return mm
        return INF
    if ph == Q_FRAC:
        q = 10 ** (frac - m)
        base = v * scale + fr * q
        if fits(base, base, 1):
            return 0
        for mm in range(m + 1, frac + 1):
            if fits(base, base + q - 1, 10 ** (frac - mm)):
                return mm - m
        return INF
    return _NUM_REST[ph]


# --------------------------------------------------------------------------- the automaton


class _Engine:
    """A compiled schema on one vocabulary: the automaton, its interned states (a lazily built
    DFA over byte strings), and the masks cached by state."""

    def __init__(self, vocab: _Vocab, schema: dict | None, whitespace: int = MAX_WHITESPACE):
        self.whitespace = whitespace
        comp = _Compiler(schema)
        if schema is None:
            root = comp.free_object(comp.any_value(1))
        else:
            if not isinstance(schema, dict):
                raise MlxgptError("response_format schema must be a JSON object")
            root = comp.compile(schema)
        comp.finish()
        self.nodes = comp.nodes
        if self.nodes[root].min >= INF:
            raise MlxgptError("response_format schema accepts no document (it requires values "
                              "that can never end, e.g. a required property that recurses)")
        self.vocab = vocab
        self.initial = frozenset([((K_ROOT, root, 0),)])
        self.min_bytes = self.nodes[root].min
        self.lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._sid: dict[frozenset, int] = {}
        self._sets: list[frozenset] = []
        self._min: list[int] = []
        self._trans: list[dict[int, int]] = []
        self._own: dict[tuple, int] = {}
        self._after: dict[tuple, int] = {}
        self._needs: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._rest_tables: OrderedDict[tuple, np.ndarray] = OrderedDict()

    # -- one byte

    def step(self, stack: tuple, b: int) -> list[tuple]:
        """The stacks after byte b (none: b is not allowed)."""
        top = stack[-1]
        kind = top[0]
        if kind == K_STR:
            _, n, count, sub = top
            r = _STR_NEXT[sub][b]
            if r == _CLOSE:
                return [self.done(stack[:-1])] if count >= self.nodes[n].lo else []
            if r == _DEAD:
                return []
            ns, comp = r >> 1, r & 1
            if (comp or ns != S_NORMAL) and count + 1 > self.nodes[n].hi:
                return []
            return [stack[:-1] + ((K_STR, n, count + comp, ns),)]
        if kind in (K_OBJ, K_FOBJ, K_ARR):
            return self._step_container(stack, top, b)
        if kind == K_NUM:
            node = self.nodes[top[1]]
            nf = _num_step(node, top, b)
            out = [stack[:-1] + (nf,)] if nf is not None else []
            if _num_rest(node, top) == 0:  # complete: the byte may belong to what follows
                out += self.step(self.done(stack[:-1]), b)
            return out
        if kind == K_LIT:
            trie = self.nodes[top[1]].trie
            out = self._lit(stack[:-1], top[1], trie, trie.kids[top[2]].get(b))
            if trie.term[top[2]] >= 0:
                out += self.step(self.done(stack[:-1]), b)
            return out
        if top[2] == 0:  # K_ROOT before the value; after it nothing may follow
            return self.enter(((K_ROOT, top[1], 1),), top[1], b)
        return []

    def _lit(self, stack: tuple, nid: int, trie: _Trie, t: int | None) -> list[tuple]:
        if t is None:
            return []
        if trie.term[t] >= 0 and not trie.kids[t]:
            return [self.done(stack)]
        return [stack + ((K_LIT, nid, t),)]

    def enter(self, stack: tuple, nid: int, b: int) -> list[tuple]:
        """Byte b starts a value of node nid above ``stack`` (its top waits for the value)."""
        node = self.nodes[nid]
        if node.min >= INF:
            return []
        k = node.kind
        if k == N_UNION:
            return [s for a in node.alts for s in self.enter(stack, a, b)]
        if k == N_STR:
            return [stack + ((K_STR, nid, 0, S_NORMAL),)] if b == _QUOTE else []
        if k == N_NUM:
            f = _num_first(node, nid, b)
            return [stack + (f,)] if f is not None else []
        if k == N_LIT:
            return self._lit(stack, nid, node.trie, node.trie.kids[0].get(b))
        if k == N_ARR:
            return [stack + ((K_ARR, nid, P_OPEN, 0, 0, 0),)] if b == _LBRACKET else []
        kind = K_OBJ if k == N_OBJ else K_FOBJ
        return [stack + ((kind, nid, P_OPEN, 0, 0, 0),)] if b == _LBRACE else []

    def done(self, stack: tuple) -> tuple:
        """The stack once the value its top frame waits for is complete."""
        return stack[:-1] + (_child_done(stack[-1]),)

    def _step_container(self, stack: tuple, f: tuple, b: int) -> list[tuple]:
        kind, n, ph, a, c, ws = f
        node = self.nodes[n]
        below = stack[:-1]
        if kind == K_OBJ and ph == P_KEY:
            t = node.trie.kids[c].get(b)
            if t is None:
                return []
            p = node.trie.term[t]
            if p >= 0:  # keys are quoted: a complete key is never a prefix of another
                return [below + ((K_OBJ, n, P_AFTER_KEY, p, 0, 0),)]
            return [below + ((K_OBJ, n, P_KEY, a, t, 0),)]
        if b in _WS:
            return [below + ((kind, n, ph, a, c, ws + 1),)] if ws < self.whitespace else []
        if kind == K_ARR:
            if ph == P_OPEN or ph == P_AFTER_COMMA:
                if ph == P_OPEN and b == _RBRACKET:
                    return [self.done(below)] if node.lo == 0 else []
                if node.hi == 0:
                    return []
                return self.enter(below + ((K_ARR, n, P_IN_VALUE, a, 0, 0),), node.item, b)
            if b == _COMMA:
                return [below + ((K_ARR, n, P_AFTER_COMMA, a, 0, 0),)] if a < node.hi else []
            if b == _RBRACKET:
                return [self.done(below)] if a >= node.lo else []
            return []
        if ph == P_AFTER_KEY:
            return [below + ((kind, n, P_AFTER_COLON, a, 0, 0),)] if b == _COLON else []
        if ph == P_AFTER_COLON:
            value = node.kids[a] if kind == K_OBJ else node.value
            return self.enter(below + ((kind, n, P_IN_VALUE, a, 0, 0),), value, b)
        if kind == K_OBJ:
            if ph == P_OPEN and b == _RBRACE:
                return [self.done(below)] if node.nreq == 0 else []
            if ph == P_AFTER_VALUE:
                if b == _COMMA:
                    return [below + ((K_OBJ, n, P_AFTER_COMMA, a, 0, 0),)] if node.more[a] else []
                return [self.done(below)] if b == _RBRACE and not node.req_after[a] else []
            if b != _QUOTE:
                return []
            root = node.troot[0 if ph == P_OPEN else a + 1]
            t = node.trie.kids[root].get(b)
            return [] if t is None else [below + ((K_OBJ, n, P_KEY, a, t, 0),)]
        # free-form object: a counts the properties written
        if ph == P_AFTER_VALUE:
            if b == _COMMA:
                return [below + ((K_FOBJ, n, P_AFTER_COMMA, a, 0, 0),)] if a < node.maxp else []
            return [self.done(below)] if b == _RBRACE else []
        if ph == P_OPEN and b == _RBRACE:
            return [self.done(below)]
        if b == _QUOTE and a < node.maxp:
            return self.enter(below + ((K_FOBJ, n, P_KEY, a, 0, 0),), node.key, b)
        return []

    # -- shortest completions

    def own(self, f: tuple) -> int:
        """Bytes that finish frame f (its own part, not its parents')."""
        v = self._own.get(f)
        if v is None:
            v = self._own[f] = min(self._own_min(f), INF)
        return v

    def _own_min(self, f: tuple) -> int:
        kind, n = f[0], f[1]
        node = self.nodes[n]
        if kind == K_STR:
            sub = f[3]
            return _FIN[sub] + max(0, node.lo - f[2] - (sub != S_NORMAL)) + 1
        if kind == K_NUM:
            return _num_rest(node, f)
        if kind == K_LIT:
            return node.trie.cost[f[2]]
        if kind == K_ROOT:
            return node.min if f[2] == 0 else 0
        ph, a = f[2], f[3]
        if kind == K_ARR:
            item = self.nodes[node.item].min
            if ph == P_OPEN:
                return 1 if node.lo == 0 else node.lo * (item + 1)
            if ph == P_AFTER_VALUE:
                return max(node.lo - a, 0) * (1 + item) + 1
            return item + max(node.lo - a - 1, 0) * (1 + item) + 1  # after a comma
        if kind == K_FOBJ:
            vmin = self.nodes[node.value].min
            return {P_OPEN: 1, P_AFTER_KEY: vmin + 2, P_AFTER_COLON: vmin + 1,
                    P_AFTER_VALUE: 1, P_AFTER_COMMA: vmin + 4}[ph]  # '"":' value '}'
        cost = node.trie.cost
        if ph == P_OPEN:
            return min(1 if node.nreq == 0 else INF, cost[node.troot[0]])
        if ph == P_KEY:
            return cost[f[4]]
        if ph == P_AFTER_COMMA:
            return cost[node.troot[a + 1]]
        tail = node.after[a]
        if ph == P_AFTER_VALUE:
            return tail
        vmin = self.nodes[node.kids[a]].min
        return vmin + tail + (1 if ph == P_AFTER_KEY else 0)

    def mincomp(self, stack: tuple) -> int:
        """Bytes of the shortest text that completes the document from this stack."""
        total = self.own(stack[-1])
        for f in stack[:-1]:
            v = self._after.get(f)
            if v is None:
                v = self._after[f] = self.own(_child_done(f))
            total += v
        return min(total, INF)

    def complete(self, stack: tuple) -> bool:
        while True:
            top = stack[-1]
            if top[0] == K_ROOT:
                return top[2] == 2
            if top[0] not in (K_NUM, K_LIT) or self.own(top) != 0:
                return False
            stack = self.done(stack[:-1])

    # -- the DFA over sets of stacks

    def _intern(self, states: frozenset) -> int:
        sid = self._sid.get(states)
        if sid is None:
            sid = self._sid[states] = len(self._sets)
            self._sets.append(states)
            self._min.append(min(self.mincomp(s) for s in states))
            self._trans.append({})
        return sid

    def _next(self, sid: int, b: int) -> int:
        """The state after byte b (-1: dead); memoised."""
        t = self._trans[sid].get(b)
        if t is None:
            out = {s for st in self._sets[sid] for s in self.step(st, b)}
            t = self._intern(frozenset(out)) if out else -1
            if t >= 0 and self._min[t] >= INF:
                t = -1
            self._trans[sid][b] = t
        return t

    # -- masks

    def needs(self, stack: tuple) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
        """For every token: bytes of the shortest completion after it from this stack (INF:
        not allowed). Sparse (ids, lengths) from the trie walk, or dense in a string."""
        if stack[-1][0] == K_STR:
            return self._string_needs(stack)
        stack = self.canonical(stack)
        hit = self._needs.get(stack)
        if hit is not None:
            self._needs.move_to_end(stack)
            return hit
        if len(self._sets) > _DFA_LIMIT:
            self._reset()
        hit = self._walk(self._intern(frozenset([stack])))
        self._needs[stack] = hit
        if len(self._needs) > _NEED_CACHE:
            self._needs.popitem(last=False)
        return hit

    def canonical(self, stack: tuple) -> tuple:
        """A stack whose masks equal this one's, the same for all array / free-object counts
        that one token cannot take to a limit (masks are cached by it)."""
        k = self.vocab.max_values
        out = []
        for f in stack:
            if f[0] == K_ARR:
                node = self.nodes[f[1]]
                if node.lo < f[3] and f[3] + k <= node.hi:
                    f = (K_ARR, f[1], f[2], node.lo, f[4], f[5])
            elif f[0] == K_FOBJ and 0 < f[3] and f[3] + k <= self.nodes[f[1]].maxp:
                f = (K_FOBJ, f[1], f[2], 0, f[4], f[5])
            out.append(f)
        return tuple(out)

    def _walk(self, sid: int) -> tuple[np.ndarray, np.ndarray]:
        """Walk the vocabulary trie from state sid, pruning at the first dead byte."""
        kids, ends, mins, nxt = self.vocab.kids, self.vocab.ends, self._min, self._next
        ids: list[int] = []
        need: list[int] = []
        todo = [(sid, 0)]
        while todo:
            s, node = todo.pop()
            trans = self._trans[s]
            for b, child in kids[node]:
                t = trans.get(b)
                if t is None:
                    t = nxt(s, b)
                if t < 0:
                    continue
                toks = ends[child]
                if toks is not None:
                    ids.extend(toks)
                    need.extend([mins[t]] * len(toks))
                if kids[child]:
                    todo.append((t, child))
        return (np.asarray(ids, np.int64),
                np.minimum(np.asarray(need, np.int64), INF).astype(np.int32))

    def _string_needs(self, stack: tuple) -> np.ndarray:
        _, n, count, sub = stack[-1]
        node = self.nodes[n]
        lex = self.vocab.lex(sub)
        cont = self.canonical(self.done(stack[:-1]))  # after the closing quote
        mc = min(self.mincomp(cont), _MAX_LEN)
        need = lex.in_fin + np.int32(1 + mc)  # tokens that stay inside: finish, quote, the rest
        if node.lo > count:  # characters still missing count too (a partial one counts)
            need += np.clip(node.lo - count - lex.in_len, 0, _MAX_LEN).astype(np.int32)
        if node.hi - count < lex.in_max:
            need[count + lex.in_len > node.hi] = INF
        if len(lex.cl_ids):  # tokens that close the string: their tail is walked from cont
            total = count + lex.cl_chars
            ok = (total >= node.lo) & (total <= node.hi)
            need[lex.cl_ids] = np.where(ok, self._rest_table(cont)[lex.cl_rest], INF)
        return need

    def _rest_table(self, cont: tuple) -> np.ndarray:
        """For every byte string that follows a quote in some token: the shortest completion
        after reading it from ``cont`` (INF: dead)."""
        table = self._rest_tables.get(cont)
        if table is not None:
            return table
        if len(self._sets) > _DFA_LIMIT:
            self._reset()
        start = self._intern(frozenset([cont]))
        table = np.full(len(self.vocab.rests), INF, np.int32)
        for i, rest in enumerate(self.vocab.rests):
            s = start
            for b in rest:
                s = self._next(s, b)
                if s < 0:
                    break
            else:
                table[i] = min(self._min[s], INF)
        self._rest_tables[cont] = table
        if len(self._rest_tables) > _NEED_CACHE:
            self._rest_tables.popitem(last=False)
        return table

    def mask(self, states: frozenset, left: int | None) -> np.ndarray:
        """Allowed tokens (bool (vocab,)) with ``left`` tokens of budget (None: unlimited)."""
        limit = INF - 1 if left is None else left - 1
        out = np.zeros(self.vocab.size, bool)
        with self.lock:
            parts = [self.needs(st) for st in states]
        if len(parts) == 1 and isinstance(parts[0], tuple):
            ids, need = parts[0]
            out[ids[need <= limit]] = True
        else:
            dense = np.full(self.vocab.size, INF, np.int32)
            for p in parts:
                if isinstance(p, tuple):
                    dense[p[0]] = np.minimum(dense[p[0]], p[1])
                else:
                    np.minimum(dense, p, out=dense)
            out = dense <= limit
        return out


def _child_done(f: tuple) -> tuple:
    """Frame f once the value it waits for is complete."""
    kind = f[0]
    if kind == K_ROOT:
        return (K_ROOT, f[1], 2)
    if kind == K_ARR:
        return (K_ARR, f[1], P_AFTER_VALUE, f[3] + 1, 0, 0)
    if kind == K_FOBJ and f[2] == P_KEY:
        return (K_FOBJ, f[1], P_AFTER_KEY, f[3], 0, 0)
    if kind == K_FOBJ:
        return (K_FOBJ, f[1], P_AFTER_VALUE, f[3] + 1, 0, 0)
    return (K_OBJ, f[1], P_AFTER_VALUE, f[3], 0, 0)


# --------------------------------------------------------------------------- caches

_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {size: _Vocab}
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> LRU of engines
_CACHE_LOCK = threading.Lock()


def _vocab(tokenizer: Tokenizer, size: int) -> _Vocab:
    with _CACHE_LOCK:
        per = _VOCABS.setdefault(tokenizer, {})
        if size not in per:
            per[size] = _Vocab(tokenizer, size)
        return per[size]


def check_nesting(schema: Any, limit: int = MAX_SCHEMA_NESTING) -> None:
    """MlxgptError if the schema document nests objects and lists deeper than ``limit``.
    Iterative, so it is safe on any parsed JSON: run it before anything recursive
    (``json.dumps``, the compiler) reads a schema from a client."""
    todo = [(schema, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            raise MlxgptError(f"response_format schema is nested more than {limit} levels deep")
        todo.extend((c, depth + 1) for c in children)


def _engine(tokenizer: Tokenizer, schema: dict | None, size: int, whitespace: int) -> _Engine:
    check_nesting(schema)
    try:
        key = (size, whitespace, None if schema is None else json.dumps(schema, sort_keys=True,
                                                                        allow_nan=False))
    except (TypeError, ValueError) as e:
        raise MlxgptError(f"response_format schema is not JSON: {e}") from None
    vocab = _vocab(tokenizer, size)
    with _CACHE_LOCK:
        lru = _ENGINES.setdefault(tokenizer, OrderedDict())
        engine = lru.get(key)
        if engine is not None:
            lru.move_to_end(key)
            return engine
    engine = _Engine(vocab, schema, whitespace)
    with _CACHE_LOCK:
        lru[key] = engine
        if len(lru) > _ENGINES_PER_TOKENIZER:
            lru.popitem(last=False)
    return engine


# --------------------------------------------------------------------------- the interface


class JsonConstraint:
    """A JSON schema (or any JSON object) compiled for one tokenizer and vocabulary size.
    Compiled schemas and their masks are cached per tokenizer, so building the same schema
    again is cheap and its masks are warm."""

    def __init__(self, tokenizer: Tokenizer, schema: dict | None = None,
                 vocab_size: int | None = None, whitespace: int = MAX_WHITESPACE):
        """schema None: any JSON object (json_object mode). vocab_size: the model's (may exceed
        the tokenizer's; ids past the tokenizer are never allowed). whitespace: bytes of it
        allowed in each gap between JSON tokens (0: compact JSON; more lets a model indent,
        and lets a weak one pad). Unsupported schema keywords or a malformed schema:
        MlxgptError with one clear line."""
        if not isinstance(whitespace, int) or whitespace < 0:
            raise MlxgptError(f"whitespace must be a number of bytes >= 0, not {whitespace!r}")
        size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
        if size <= 0:
            raise MlxgptError(f"vocab_size must be positive, not {size}")
        self.tokenizer, self.schema, self.vocab_size = tokenizer, schema, size
        self._engine = _engine(tokenizer, schema, size, whitespace)

    @property
    def min_tokens(self) -> int:
        """The smallest max_tokens that ``start`` accepts (bytes of the shortest document)."""
        return self._engine.min_bytes

    def start(self, max_tokens: int | None = None) -> JsonState:
        """A fresh state. With max_tokens, every document ends within that many tokens (the
        end-of-text token not counted); MlxgptError if even the shortest cannot."""
        if max_tokens is not None and max_tokens < self.min_tokens:
            raise MlxgptError(f"max_tokens {max_tokens} is too small for this schema: it needs "
                              f"at least {self.min_tokens}")
        return JsonState(self._engine, max_tokens)


class JsonState:
    """One document being written: the automaton's state, the text, the budget left."""

    def __init__(self, engine: _Engine, max_tokens: int | None):
        self._engine = engine
        self._states = engine.initial
        self._left = max_tokens
        self._data = bytearray()
        self._ended = False

    def allowed(self) -> np.ndarray:
        """bool (vocab_size,): tokens that may come next. The tokenizer's eot id is allowed
        exactly when the text is complete (all False once it was read)."""
        e = self._engine
        if self._ended:
            return np.zeros(e.vocab.size, bool)
        out = e.mask(self._states, self._left)
        if e.vocab.eot is not None:
            out[e.vocab.eot] = self.complete
        return out

    def advance(self, token: int) -> None:
        """Read one token; MlxgptError if it was not allowed (the state is then unchanged)."""
        e = self._engine
        token = int(token)
        if self._ended:
            raise MlxgptError(f"token {token} after the end of the JSON document")
        if token == e.vocab.eot and e.vocab.eot is not None:
            if not self.complete:
                raise MlxgptError("the end-of-text token is not allowed: the JSON document is "
                                  "not complete")
            self._ended = True
            return
        data = e.vocab.bytes[token] if 0 <= token < e.vocab.size else None
        if data is None:
            raise MlxgptError(f"token {token} is never allowed in JSON output")
        with e.lock:
            states = self._states
            for b in data:
                states = frozenset(s for st in states for s in e.step(st, b))
                if not states:
                    break
            fits = bool(states) and (self._left is None or
                                     min(e.mincomp(s) for s in states) <= self._left - 1)
        if not fits:
            raise MlxgptError(f"token {token} ({data!r}) is not allowed here: the JSON would "
                              f"not match the schema{'' if self._left is None else ' in budget'}")
        self._states = states
        self._data += data
        if self._left is not None:
            self._left -= 1

    def copy(self) -> JsonState:
        """An independent state at the same point (speculative decoding advances a copy over
        a draft's tokens; the automaton's states are immutable, so this is cheap)."""
        other = JsonState.__new__(JsonState)
        other._engine, other._states, other._left = self._engine, self._states, self._left
        other._data, other._ended = bytearray(self._data), self._ended
        return other

    @property
    def complete(self) -> bool:
        """The text so far is a complete document the schema accepts."""
        return any(self._engine.complete(s) for s in self._states)

    @property
    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")
