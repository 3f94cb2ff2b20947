"""Token shards: deterministic builds, the train/validation split, TokenStream reads, corruption and manifest errors.

The datasets are built from text files written in tmp_path (the `files` source) with a small byte-level BPE
tokenizer trained here, so nothing is downloaded and each build takes well under a second.
"""
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configurable_fm.data import corpora
from configurable_fm.errors import ConfigError
from configurable_fm.data.shards import (DatasetError, ManifestError, TokenStream, assign_splits, build_dataset,
                                         load_manifest, resolve_config, split_score, token_dtype, validate_manifest)

WORDS = ("the cat sat on a mat while an old dog slept near warm fire and birds sang songs of spring rain "
         "def return class import lambda yield None True False").split()


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of 60 text documents (two exact duplicates, one too short, one holding '<|endoftext|>')
    and a BPE tokenizer.json (eos '<|endoftext|>' = id 0)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = {}
    for i in range(60):
        texts[f"doc_{i:03d}.txt"] = make_text(rng, rng.randint(20, 120))
    texts["dup_a.txt"] = texts["doc_005.txt"]
    texts["sub/dup_b.txt"] = texts["doc_007.txt"].replace(" ", "  ")
    texts["short.txt"] = "tiny"
    texts["special.txt"] = "the model writes <|endoftext|> inside a document, as code often does " * 3
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts.values()), trainer)
    tok_path = root.parent / f"{root.name}_tokenizer.json"
    tok.save(str(tok_path))
    return root, tok_path, texts


def config(corpus, **over):
    root, tok_path, _ = corpus
    c = {"name": "tiny_files", "sources": ("files",), "tokenizer": str(tok_path), "eos_id": 0,
         "validation_fraction": 0.2, "max_tokens_per_shard": 300, "min_chars": 10,
         "files": {"root": str(root), "patterns": ("**/*.txt",)}}
    c.update(over)
    return c


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    manifest = build_dataset(config(corpus), out)
    return out, manifest


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_build_is_deterministic(corpus, built, tmp_path):
    out, manifest = built
    again = build_dataset(config(corpus), tmp_path / "again")
    a, b = files_of(out), files_of(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert len([f for f in a if f.endswith(".npy")]) >= 4  # several shards per split were written
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name
    m1, m2 = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    m1.pop("created"), m2.pop("created")
    assert m1 == m2
    assert manifest["splits"] == again["splits"]
    # a different split salt draws a different split
    other = build_dataset(config(corpus, split_salt="other"), tmp_path / "salted")
    assert other["splits"]["validation"]["shards"] != manifest["splits"]["validation"]["shards"]


def test_manifest_contents(corpus, built):
    out, m = built
    assert load_manifest(out) == m
    assert m["dtype"] == "uint16" and m["eos_id"] == 0 and m["eos_token"] == "<|endoftext|>"
    assert m["vocab_size"] == 400 and len(m["tokenizer"]["sha256"]) == 64
    assert m["config"]["validation_fraction"] == 0.2 and "out_dir" not in m["config"]
    src = m["sources"]["files"]
    assert src["documents_read"] == 64 and src["dropped_duplicate"] == 2 and src["dropped_short"] == 1
    assert src["documents"] == 61 == m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"]
    for split in ("train", "validation"):
        s = m["splits"][split]
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"])
        assert all(sh["tokens"] <= 300 for sh in s["shards"])
        assert all(sh["tokens"] == 300 for sh in s["shards"][:-1])  # only the last shard is partial
    assert m["code"].keys() == {"revision", "dirty"}


def read_docs(out):
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


def test_split_respects_fraction_and_is_disjoint(corpus, built):
    out, m = built
    docs = read_docs(out)
    train = {d["id"] for d in docs if d["split"] == "train"}
    val = {d["id"] for d in docs if d["split"] == "validation"}
    assert train and val and not train & val
    assert {d["sha256"] for d in docs if d["split"] == "train"}.isdisjoint(
        d["sha256"] for d in docs if d["split"] == "validation")
    # validation holds exactly the documents whose hash score is below the fraction
    _, _, texts = corpus
    for d in docs:
        key = corpora.dedup_key(corpora.normalize_text(texts[d["id"]]))
        assert (split_score(key, "configurable_fm") < 0.2) == (d["split"] == "validation"), d["id"]


def test_assign_splits_fraction_and_minimum():
    docs = [corpora.Document("s", str(i), f"document number {i}") for i in range(4000)]
    splits = assign_splits(docs, fraction=0.1, salt="x")
    assert abs(len(splits["validation"]) / 4000 - 0.1) < 0.015
    assert len(splits["train"]) + len(splits["validation"]) == 4000
    assert {d.id for d in splits["train"]}.isdisjoint(d.id for d in splits["validation"])
    # the split of a document does not depend on the others
    sub = assign_splits(docs[:2000], fraction=0.1, salt="x")
    assert {d.id for d in sub["validation"]} == {d.id for d in splits["validation"] if int(d.id) < 2000}
    # shuffled order is a permutation; source order is kept otherwise
    kept = assign_splits(docs, fraction=0.1, salt="x", shuffle=False)
    assert [int(d.id) for d in kept["train"]] == sorted(int(d.id) for d in kept["train"])
    assert [d.id for d in splits["train"]] != [d.id for d in kept["train"]]
    # tiny corpora still get min_validation documents (never all of them)
    three = assign_splits(docs[:3], fraction=0.01, salt="x", min_validation=2)
    assert len(three["validation"]) == 2 and len(three["train"]) == 1
    assert assign_splits(docs[:3], fraction=0.0, salt="x")["validation"] == []
    # ... and at least one stays in train whatever the fraction
    for n in (1, 2, 5):
        most = assign_splits(docs[:n], fraction=0.99, salt="x")
        assert len(most["train"]) == 1 and len(most["validation"]) == n - 1


def test_stream_concatenation_and_slicing(corpus, built):
    out, m = built
    stream = TokenStream(out, "train")
    shards = [np.load(out / sh["file"], allow_pickle=False) for sh in m["splits"]["train"]["shards"]]
    full = np.concatenate(shards).astype(np.int32)
    assert len(stream) == len(full) == m["splits"]["train"]["tokens"]
    assert stream[:].dtype == np.int32 and np.array_equal(stream[:], full)
    rng = np.random.default_rng(0)
    bounds = [int(b) for b in stream.offsets]
    cases = [(b - 3, b + 5) for b in bounds[1:-1]] + [(0, 0), (5, 2), (-10, None), (0, 1000000), (290, 910)]
    cases += [tuple(sorted(rng.integers(0, len(full), 2))) for _ in range(20)]
    for a, b in cases:
        assert np.array_equal(stream[a:b], full[a:b]), (a, b)
    assert np.array_equal(stream[7:905:13], full[7:905:13]) and np.array_equal(stream[900:10:-7], full[900:10:-7])
    assert stream[301] == full[301] and stream[-1] == full[-1] == 0
    with pytest.raises(IndexError, match="out of range"):
        stream[len(full)]
    assert repr(stream).startswith(f"TokenStream({str(out)!r}, 'train'")


def test_documents_decode_and_eos_only_at_ends(corpus, built):
    out, m = built
    _, tok_path, texts = corpus
    tok = Tokenizer.from_file(str(tok_path))
    streams = {s: TokenStream(out, s) for s in ("train", "validation")}
    docs = read_docs(out)
    for d in docs:
        ids = streams[d["split"]][d["start"]:d["start"] + d["tokens"]]
        assert ids[-1] == 0 and 0 not in ids[:-1]
        assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) == corpora.normalize_text(texts[d["id"]])
    assert sum(int((streams[s][:] == 0).sum()) for s in streams) == len(docs)
    assert "special.txt" in {d["id"] for d in docs}


def copy_dataset(src, dst):
    for name, data in files_of(src).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
    return dst


def test_corrupt_shards_are_named(built, tmp_path):
    out, m = built
    shard = m["splits"]["train"]["shards"][1]["file"]
    ds = copy_dataset(out, tmp_path / "trunc")
    (ds / shard).write_bytes((ds / shard).read_bytes()[:-20])
    with pytest.raises(DatasetError, match=rf"{shard}: unreadable shard"):
        TokenStream(ds, "train")
    TokenStream(ds, "validation")  # the other split is intact

    ds = copy_dataset(out, tmp_path / "short")
    np.save(ds / shard, np.zeros(17, np.uint16), allow_pickle=False)
    with pytest.raises(DatasetError, match=rf"{shard}: 17 tokens on disk but 300 in the manifest"):
        TokenStream(ds, "train")

    ds = copy_dataset(out, tmp_path / "dtype")
    np.save(ds / shard, np.zeros(300, np.int64), allow_pickle=False)
    with pytest.raises(DatasetError, match=rf"{shard}: shard is int64\[300\], the manifest says uint16"):
        TokenStream(ds, "train")

    ds = copy_dataset(out, tmp_path / "flip")
    raw = bytearray((ds / shard).read_bytes())
    raw[-1] ^= 1
    (ds / shard).write_bytes(bytes(raw))
    stream = TokenStream(ds, "train")  # same size: opens
    with pytest.raises(DatasetError, match=rf"{shard}: sha256 .* does not match the manifest"):
        stream.verify()
    with pytest.raises(DatasetError, match=rf"{shard}: sha256"):
        TokenStream(ds, "train", verify="sha256")
    TokenStream(out, "train", verify="sha256").verify()

    ds = copy_dataset(out, tmp_path / "missing")
    (ds / shard).unlink()
    with pytest.raises(DatasetError, match=rf"{shard}: shard missing"):
        TokenStream(ds, "train")
    with pytest.raises(KeyError, match="no split 'test'"):
        TokenStream(out, "test")


def test_manifest_validation_errors(built, tmp_path):
    out, m = built

    def broken(edit):
        bad = json.loads(json.dumps(m))
        edit(bad)
        return bad

    cases = [
        (lambda b: b.pop("dtype"), "dtype is missing"),
        (lambda b: b.update(format="other"), "format must be"),
        (lambda b: b.update(format_version=99), "format_version is 99, newer than this code reads"),
        (lambda b: b.update(dtype="float32"), "dtype must be 'uint16' or 'uint32'"),
        (lambda b: b.update(eos_id=400), r"eos_id must be an int in \[0, vocab_size=400\)"),
        (lambda b: b["splits"].pop("validation"), "splits.validation is missing"),
        (lambda b: b["splits"]["train"].update(tokens=1), r"splits.train.tokens is 1 but its shards hold"),
        (lambda b: b["splits"]["train"]["shards"][0].update(tokens="300"), r"splits.train.shards\[0\].tokens"),
        (lambda b: b["splits"]["train"]["shards"][0].update(file="../x.npy"), r"splits.train.shards\[0\].file"),
        (lambda b: b["splits"]["validation"]["shards"][0].update(file="train/shard_00000.npy"),
         r"splits.validation.shards\[0\].file must be 'validation/shard_NNNNN.npy'"),
        (lambda b: b["splits"]["train"]["shards"][0].update(sha256="abc"), r"shards\[0\].sha256 must be"),
        (lambda b: b["tokenizer"].pop("sha256"), "tokenizer.sha256"),
    ]
    for edit, msg in cases:
        with pytest.raises(ManifestError, match=msg):
            validate_manifest(broken(edit), "m.json")
    with pytest.raises(ManifestError, match="must be a JSON object"):
        validate_manifest([], "m.json")
    ds = copy_dataset(out, tmp_path / "badjson")
    (ds / "manifest.json").write_text('{\n "format": "configurable_fm.token_dataset",\n "name": }\n')
    with pytest.raises(ManifestError, match=r"manifest.json: invalid JSON at line 3"):
        load_manifest(ds)
    with pytest.raises(DatasetError, match="no such manifest"):
        load_manifest(tmp_path / "nowhere")


def test_overwrite_and_config_errors(corpus, tmp_path):
    out = tmp_path / "ds"
    build_dataset(config(corpus), out)
    with pytest.raises(FileExistsError, match="already exists"):
        build_dataset(config(corpus), out)
    m = build_dataset(config(corpus, validation_fraction=0.5), out, overwrite=True)
    assert load_manifest(out)["config"]["validation_fraction"] == 0.5 == m["config"]["validation_fraction"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary directories left behind
    with pytest.raises(KeyError, match=r"unknown dataset config key\(s\) \['files.rooot'\]"):
        resolve_config(config(corpus, files={"rooot": "x"}))
    with pytest.raises(ConfigError, match="eos_id 400 is outside"):  # a UserError: a one-line CLI message
        build_dataset(config(corpus, eos_id=400), tmp_path / "eos")
    resolved = resolve_config(config(corpus, sources=["files"], english={"parts": "sotu, wordnet"}))
    assert resolved["sources"] == ("files",) and resolved["english"]["parts"] == ("sotu", "wordnet")
    assert resolved["min_chars"] == 10 and resolved["shuffle_documents"] is True  # given / default
    with pytest.raises(ConfigError, match=r"unknown source\(s\) \['wiki'\]"):
        resolve_config(config(corpus, sources="files,wiki"))
    with pytest.raises(ConfigError, match="validation_fraction must be in"):
        resolve_config(config(corpus, validation_fraction=1.0))
    assert not (tmp_path / "eos").exists()


@pytest.mark.parametrize("over, message", [
    ({"eos_id": 1.5}, r"eos_id must be an int >= 0, got 1.5"),  # was read as id 1
    ({"eos_id": True}, r"eos_id must be an int >= 0, got True"),
    ({"min_validation_documents": -3}, r"min_validation_documents must be an int >= 0, got -3"),
    ({"max_tokens_per_shard": "many"}, r"max_tokens_per_shard must be an int >= 1, got 'many'"),
    ({"encode_batch_chars": "lots"}, r"encode_batch_chars must be an int >= 0, got 'lots'"),
    ({"validation_fraction": "abc"}, r"validation_fraction must be in \[0, 1\), got 'abc'"),
    ({"files": 5}, r"files must be a mapping of options, got 5"),
])
def test_bad_numbers_in_a_dataset_config_are_errors_naming_the_key(corpus, over, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(config(corpus, **over))


def test_token_dtype():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151936) == np.uint32


def test_bpe_tokenizer_trained_on_the_training_split(corpus, tmp_path):
    """tokenizer='bpe:<n>': a byte-level BPE learnt from the training documents only, saved next to the shards,
    the same bytes on a rebuild, decoding every document exactly."""
    from configurable_fm.data.bpe import parse_bpe_spec
    from configurable_fm.interop.tokenizers import load_tokenizer

    a = build_dataset(config(corpus, tokenizer="bpe:600"), tmp_path / "a")
    b = build_dataset(config(corpus, tokenizer="bpe:600"), tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert files_of(tmp_path / "a" / "train") == files_of(tmp_path / "b" / "train")
    assert a["tokenizer"]["spec"] == "bpe:600" and a["tokenizer"]["file"] == "tokenizer.json"
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"] and a["vocab_size"] <= 600
    assert a["eos_token"] == "<|endoftext|>"
    tok = load_tokenizer(str(tmp_path / "a" / "tokenizer.json"))
    stream = TokenStream(tmp_path / "a", "validation")
    ids = stream[0:len(stream)]
    texts = tok.decode(list(ids), skip_special_tokens=False).split("<|endoftext|>")
    assert all(t in corpus[2].values() or t == "" or "<|endoftext|>" in t for t in texts)
    # the validation documents never reach the merges: their text alone decides nothing about the vocabulary
    c = build_dataset(config(corpus, tokenizer="bpe:600", validation_fraction=0.5), tmp_path / "c")
    assert c["tokenizer"]["sha256"] != a["tokenizer"]["sha256"]
    assert parse_bpe_spec("smollm2-135m-instruct") is None and parse_bpe_spec("bpe:8192") == 8192
    with pytest.raises(ValueError, match="at least 512"):
        parse_bpe_spec("bpe:100")


def test_without_out_dir_python_callers_build_into_the_data_root(corpus, built, tmp_path, monkeypatch, capsys):
    """build_dataset(config) with no out_dir: <$CFM_DATA_DIR>/<name> (dataset_dir, the trainer's resolver), never
    ./data/<name>; the dataset and the directory are announced on stderr (or through `log`)."""
    from configurable_fm.data.shards import data_root, dataset_dir
    from configurable_fm.train import data as train_data

    root = tmp_path / "root"
    monkeypatch.setenv("CFM_DATA_DIR", str(root))
    monkeypatch.chdir(tmp_path)
    assert train_data.dataset_dir is dataset_dir and train_data.data_root is data_root  # one resolver
    manifest = build_dataset(config(corpus))
    assert (root / "tiny_files" / "manifest.json").is_file() and not (tmp_path / "data").exists()
    err = capsys.readouterr().err
    assert f"building dataset 'tiny_files' (sources: files) into {root / 'tiny_files'}" in err
    assert "$CFM_DATA_DIR" in err
    assert files_of(root / "tiny_files" / "train") == files_of(built[0] / "train")
    assert manifest["name"] == "tiny_files"
    lines = []  # the config's out_dir, relative: inside the data root (a leading 'data/' dropped)
    build_dataset(config(corpus, out_dir="data/other"), log=lines.append)
    assert (root / "other" / "manifest.json").is_file() and lines[0].endswith(
        f"into {root / 'other'} (the data root is $CFM_DATA_DIR, default ~/.cache/configurable_fm/data)")
    assert not capsys.readouterr().err
    with pytest.raises(Exception, match="already exists"):
        build_dataset(config(corpus))


def test_progress_off_a_terminal_is_log_lines_not_bars(corpus, tmp_path, capsys):
    """progress=True draws tqdm bars only on a terminal; redirected (here: pytest's captured
    stderr), a build writes its phase lines and no carriage-return bar updates."""
    lines = []
    build_dataset(config(corpus), tmp_path / "ds", progress=True, log=lines.append)
    err = capsys.readouterr().err
    assert "\r" not in err and "doc/s" not in err
    assert any("documents" in line and "read in" in line for line in lines)
