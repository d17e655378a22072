"""tools/fetch_english.py: the cleaning and conversion functions, on small inline samples.

Nothing here downloads anything: the archives' readers get archives built in the test.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from mlxgpt.data.examples import check_record

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fetch_english", ROOT / "tools/fetch_english.py")
fe = importlib.util.module_from_spec(_spec)
sys.modules["fetch_english"] = fe
_spec.loader.exec_module(fe)

H, P = fe.HEADING, fe.PARAGRAPH

WIKITEXT = """{{Infobox person
| name = Ada {{nowrap|King}}
| image = Ada.jpg
}}
'''Augusta Ada King''' ({{birth date|1815|12|10}} – 1852) was an English [[mathematician]] \
and [[Writer|writer]],<ref name="a">{{cite book|title=X [[y]]}}</ref> known for work on \
[[Charles Babbage|Babbage's]] [[Analytical Engine]]s.<ref name="b"/> She was \
{{convert|5|ft|m}} tall.<!-- a comment
over two lines -->

[[File:Ada Lovelace.jpg|thumb|Ada, by [[Alfred Chalon]]]]
== Early life ==
She was born in [[London]] ({{lang|fr|la ville}}; {{IPAc-en|l|ʌ|n}}) and read \
[http://example.org the archive] of [[wikt:poetry|poetry]].
{| class="wikitable"
|-
| a || b
{|
| nested
|}
|}
* First item with [[a|several]] words
* Second item, ''in italics'' here
=== Empty ===
== References ==
{{reflist}}
* A cited book
[[Category:1815 births]]
[[de:Ada Lovelace]]
"""


def test_clean_wikitext_reduces_markup_to_paragraphs_and_headings():
    assert fe.clean_wikitext(WIKITEXT) == [
        (P, "Augusta Ada King (10 December 1815 – 1852) was an English mathematician and "
            "writer, known for work on Babbage's Analytical Engines. She was 5 ft tall."),
        (H, "Early life"),
        (P, "She was born in London (la ville; ) and read the archive of poetry."),
        (P, "First item with several words\nSecond item, in italics here"),
        (H, "Empty"),  # render() drops it: nothing under it
    ]


def test_render_tidies_and_drops_fragments_and_empty_headings():
    doc = fe.render(fe.clean_wikitext(WIKITEXT), "Ada Lovelace")
    assert doc == (
        "Ada Lovelace\n\n"
        "Augusta Ada King (10 December 1815 – 1852) was an English mathematician and writer, "
        "known for work on Babbage's Analytical Engines. She was 5 ft tall.\n\n"
        "Early life\n\n"
        "She was born in London (la ville) and read the archive of poetry.\n\n"
        "First item with several words\nSecond item, in italics here")
    blocks = [(H, "A"), (P, "Too short."), (H, "B"), (P, "\u201cQuoted\u201d  text , here it is ."),
              (P, "Αθήνα είναι μια πόλη"), (H, "C")]  # not English: dropped
    assert fe.render(blocks) == 'B\n\n"Quoted" text, here it is.'
    assert fe.render([(H, "Only a heading")], "Title") == ""


def test_tidy_removes_template_leftovers_and_ascii_art():
    assert fe.tidy("Andorra (; , ), officially ( ; born 1900 ; ) the Principality .") == \
        "Andorra, officially (born 1900) the Principality."
    assert fe.tidy("files such as Packages.gz or .bz2 here") == \
        "files such as Packages.gz or .bz2 here"
    assert fe.tidy("|_| .^. /_\\ LJ=======LJ /_\\ .^. |_|\nA line of words.\n1,234 567") == \
        "A line of words."


def test_templates_nested_rendered_and_unbalanced():
    assert fe.strip_templates("a {{outer|x={{inner|y}}|z}} b") == "a  b"
    assert fe.strip_templates("{{convert|1|to|3|km}}, {{convert|7|mi|km|abbr=on}}") == \
        "1 to 3 km, 7 mi"
    assert fe.strip_templates("{{lang|de|[[Haus|das Haus]]}}") == "[[Haus|das Haus]]"
    assert fe.strip_templates("x {{box|\n{|\n| cell\n|}\n}} y }} z") == "x  y  z"
    assert fe.strip_templates("before {{never closed [[link]]") == "before never closed [[link]]"


def test_links_tables_and_redirects():
    assert fe.strip_links("[[Image:a.png|thumb|see [[b|c]] and [[d]]]] [[e (f)|]] "
                          "[[:Category:G|cats]] [[fr:Paris]] [[Foo]]bar") == " e cats  Foobar"
    assert fe.strip_file_links(
        "a [[File:x.png|thumb|C<sub>4</sub> [[n-butane|''n''-butane]]; Bicyclo[1.1.0]butane.]] b"
        "\nc [[Image:y.png|never closed\nd") == "a  b\nc \nd"
    assert fe.strip_tables("x\n{|\n|a\n{|\n|b\n|}\n|c\n|}\ny") == "x\ny"
    assert fe.is_redirect_or_disambiguation("#REDIRECT [[Computer accessibility]]")
    assert fe.is_redirect_or_disambiguation("'''Mercury''' may be:\n{{disambiguation}}")
    assert not fe.is_redirect_or_disambiguation("'''Anarchism''' is a philosophy.")


def test_wikipedia_documents_from_a_dump():
    page = ("<page><title>{t}</title><ns>{ns}</ns><id>1</id>{r}<revision><id>{rev}</id>"
            "<text xml:space=\"preserve\">{text}</text></revision></page>")
    body = "'''Thing''' is a [[word]]. " * 30
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + page.format(t="Thing", ns=0, r="", rev=7, text=body)
           + page.format(t="Old", ns=0, r='<redirect title="Thing" />', rev=8,
                         text="#REDIRECT [[Thing]]")
           + page.format(t="Talk:Thing", ns=1, r="", rev=9, text=body)
           + page.format(t="Stub", ns=0, r="", rev=10, text="'''Stub''' is short.")
           + "</mediawiki>")
    import bz2

    docs = list(fe.wikipedia_documents(bz2.compress(xml.encode())))
    assert [(t, r) for t, r, _ in docs] == [("Thing", 7)]
    assert docs[0][2] == "Thing\n\n" + ("Thing is a word. " * 30).strip()


def test_lee_documents_decode_latin1_and_drop_short_lines():
    long = "The minister said the plan would cost \xa3 3,000 and take a year. " * 5
    docs = fe.lee_documents([long.encode("latin-1") + b"\nToo short.\n"])
    assert docs == [" ".join(("The minister said the plan would cost \u00a3 3,000 and take a "
                              "year. " * 5).split())]


def test_html_to_blocks_drops_code_navigation_and_keeps_headings():
    page = """<html><head><title>Skip me</title><style>p {}</style></head><body>
    <div id="banner">Download the ebook</div>
    <h2 class="title">6.1. Filling in the <code>sources.list</code> File</h2>
    <div class="para">APT needs a &ldquo;list of package   sources&rdquo;:
      the file <code class="filename">/etc/apt/sources.list</code>.</div>
    <pre class="programlisting">deb http://deb.debian.org/debian bookworm main</pre>
    <div class="example"><p class="title">Example 6.1</p><p>inside the example</p></div>
    <p>Line one<br/>line two &amp; more<br>line three</p>
    <ul class="docnav"><li>Prev</li><li>Next</li></ul>
    <table><tr><td>a cell</td></tr></table>
    <p>Last <em>words</em>.</p></body></html>"""
    blocks = fe.html_to_blocks(page, {"docnav", "example"}, {"banner"})
    assert blocks == [
        (H, "6.1. Filling in the sources.list File"),
        (P, "APT needs a \u201clist of package sources\u201d: the file /etc/apt/sources.list."),
        (P, "Line one\nline two & more\nline three"),
        (P, "Last words."),
    ]
    assert fe.handbook_documents({"en-US/x.html": page.replace(
        "Last <em>words</em>.", "Last words. " * 40).encode()}).__len__() == 1


def test_osis_to_blocks_notes_titles_poetry():
    osis = ('<div sID="b1" type="book" osisID="Gen"/><title type="main">Genesis</title>'
            '<chapter n="1" sID="Gen.1"/><div sID="p1" type="x-p"/>'
            '<w lemma="strong:H1">In</w> <w lemma="strong:H2">the</w> beginning, God<note '
            'placement="foot"><reference>1:1 </reference>Elohim.</note><w>created</w> the '
            'heavens<note placement="foot">or, sky</note>. <div eID="p1" type="x-p"/>'
            '<lg sID="g1"/><l level="1" sID="l1"/>\u201cBecause you have done this,'
            '<l eID="l1" level="1"/> <l level="2" sID="l2"/>you are cursed.\u201d'
            '<l eID="l2" level="2"/><lg eID="g1"/>')
    assert fe.osis_to_blocks(osis) == [
        (H, "Genesis"),
        (P, "In the beginning, God created the heavens."),
        (P, "\u201cBecause you have done this,\nyou are cursed.\u201d"),
    ]


def _ztext(verses: list[list[str]]) -> dict[str, bytes]:
    """A SWORD zText module (ot only; nt empty) with one zlib block per inner list."""
    bzs = bzz = bzv = b""
    for b, block in enumerate(verses):
        raw = b"".join(v.encode() for v in block)
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
        off = 0
        for v in block:
            bzv += struct.pack("<IIH", b, off, len(v.encode()))
            off += len(v.encode())
    bzv = struct.pack("<IIH", 0, 0, 0) + bzv  # an empty entry, as at the module's start
    d = fe.WEB_DIR
    return {d + "ot.bzs": bzs, d + "ot.bzz": bzz, d + "ot.bzv": bzv,
            d + "nt.bzs": b"", d + "nt.bzz": b"", d + "nt.bzv": b""}


def test_sword_ztext_and_bible_documents():
    words = "and God saw that it was good " * 10
    files = _ztext([
        ['<div sID="a" type="book" osisID="Gen"/><milestone n="Genesis" type="x-usfm-toc2"/>'
         '<title level="2" type="main">The First Book,</title> '
         '<title level="1" type="main">Genesis</title>',
         f'<div sID="p" type="x-p"/>In the beginning {words}.', "<div eID=\"p\" type=\"x-p\"/>"],
        ['<div type="book" osisID="Exod" sID="b"/><milestone n="Exodus" type="x-usfm-toc2"/>',
         f"Now these are the names {words}."],
    ])
    assert list(fe.sword_ztext(files))[1] == f'<div sID="p" type="x-p"/>In the beginning {words}.'
    assert fe.bible_documents(files) == [
        "The First Book, Genesis\n\nIn the beginning " + " ".join(words.split()) + ".",
        "Exodus\n\nNow these are the names " + " ".join(words.split()) + ".",
    ]


def test_reflow_prose_verse_signatures_and_hyphens():
    text = ("ABRUPT, adj.  Sudden, like the arrival of a cannon-\n"
            "shot -- and the departure of the soldier.\n"
            "    A new paragraph starts\n"
            "here.\n\n"
            "    Spring beckons!  All things to the call respond;\n"
            "    The trees are leaving and cashiers abscond.\n"
            "                                                             Phela Orm\n")
    assert fe.reflow(text, 0, keep_verse=True) == [
        "ABRUPT, adj.  Sudden, like the arrival of a cannon-shot -- and the departure of the "
        "soldier.",
        "A new paragraph starts here.",
        "Spring beckons!  All things to the call respond;\n"
        "The trees are leaving and cashiers abscond.\nPhela Orm",
    ]
    assert fe.reflow(text, 0, keep_verse=False)[-1] == "A new paragraph starts here."
    assert fe.devil_entry("ABC, n.  The _first_ letters of a long alphabet.") == [
        (P, "ABC, n.  The first letters of a long alphabet.")]


def test_jargon_entry_and_dictd_index():
    entry = ("blue wire\n n.\n\n    [IBM] Patch wires added to circuit boards at the\n"
             "    factory. Compare {purple\n    wire}.\n\n"
             "     <code> ::= <example>\n\n    2. A second sense of the word.\n\n")
    assert fe.jargon_entry(entry) == [
        (H, "blue wire"),
        (P, "[IBM] Patch wires added to circuit boards at the factory. Compare purple wire."),
        (P, "2. A second sense of the word."),
    ]
    data = b"00-database-short\nThe header\nbeta\n text two\nalpha\n text one\n"
    # dictd base 64 digits: "A" = 0 ... "Z" = 25, "a" = 26 ...: beta at 29 ("d"), 15 bytes
    # ("P"); alpha at 44 ("s"), 16 bytes ("Q"); a second headword for beta's entry
    index = "00-database-short\tA\td\nalpha\ts\tQ\nbeta\td\tP\nbeta-again\td\tP\n"
    assert fe.dictd_entries(index, data) == [("beta", "beta\n text two\n"),
                                             ("alpha", "alpha\n text one\n")]
    docs = fe.dictionary_documents(
        [("abc", "ABC, n. " + "a word " * 40), ("Zed", "ZED, n. " + "last words " * 30)],
        "The Book", lambda _w, t: fe.devil_entry(t))
    assert [d.split("\n")[0] for d in docs] == ["The Book: A", "The Book: Z"]


CHAT_YAML = """categories:
- trivia
conversations:
- - Do you like it?
  - Yes
- - What year was Kennedy assassinated?
  - 1963
  - Are you sure?
- - can you write code?
  - |
    Sure:

    ```
    print("hi")
    ```
- - Do you like it?
  - Yes
- - Hello
- - Hi
  - ''
  - Lost
"""


def test_chatterbot_yaml_to_messages():
    convs = fe.chatterbot_conversations(CHAT_YAML)
    assert convs == [["Do you like it?", "Yes"],
                     ["What year was Kennedy assassinated?", "1963", "Are you sure?"],
                     ["can you write code?", 'Sure:\n\n```\nprint("hi")\n```'],
                     ["Do you like it?", "Yes"], ["Hello"], ["Hi", "", "Lost"]]
    assert fe.to_messages(convs[1]) == {"messages": [
        {"role": "user", "content": "What year was Kennedy assassinated?"},
        {"role": "assistant", "content": "1963"}]}
    assert fe.to_messages(["Hello"]) is None
    assert fe.to_messages(["Hi", "", "Lost"]) is None
    records = fe.dialogue_records({"b.yml": CHAT_YAML.encode(), "a.yml": b"conversations:\n"})
    assert [r["messages"][0]["content"] for r in records] == [
        "Do you like it?", "What year was Kennedy assassinated?", "can you write code?"]
    for i, r in enumerate(records):
        check_record(r, f"record {i}")  # what mlxgpt finetune accepts
        assert json.loads(json.dumps(r)) == r


def test_split_valid_is_seeded_and_keeps_order():
    records = list(range(50))
    train, valid = fe.split_valid(records, 0.1, seed=0)
    assert len(valid) == 5 and sorted(train + valid) == records
    assert train == sorted(train) and valid == sorted(valid)
    assert fe.split_valid(records, 0.1, seed=0) == (train, valid)
    assert fe.split_valid(records, 0.1, seed=1) != (train, valid)


def _deb(tmp_path: Path, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"),
               ("data.tar.xz", buf.getvalue())]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':16s}{0:<12d}{0:<6d}{0:<6d}{100644:<8d}{len(data):<10d}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path = tmp_path / "x_1.0_all.deb"
    path.write_bytes(out)
    return path


def test_deb_members_reads_the_data_tar_in_place(tmp_path):
    dz = gzip.compress(b"entry\n", mtime=0)
    deb = _deb(tmp_path, {"usr/share/doc/x/copyright": b"public domain\n",
                          "usr/share/dictd/x.dict.dz": dz, "usr/share/other": b"not wanted"})
    got = fe.deb_members(deb, lambda n: n.startswith(("usr/share/doc/", "usr/share/dictd/")))
    assert got == {"usr/share/doc/x/copyright": b"public domain\n",
                   "usr/share/dictd/x.dict.dz": dz}
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not an ar archive")
    with pytest.raises(SystemExit, match="not a Debian package"):
        fe.deb_members(bad, lambda n: True)


def test_fetch_checks_the_digest_of_a_cached_archive(tmp_path):
    (tmp_path / fe.ARCHIVES["dict-devil"].filename).write_bytes(b"tampered")
    with pytest.raises(SystemExit, match="has sha256 .* expected 6a5356"):
        fe.fetch("dict-devil", tmp_path)
