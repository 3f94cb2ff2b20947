"""What the trainer reads: a token stream (packed windows) or pre-tokenised examples, for training and evaluation.

`make_data(config)` builds it from `config.data`:
    kind='shards'  : token shards written by `cfm-prepare-data` (scripts/prepare_data.py) in `data.dir`, built
                     first from the experiments/data.py config named `data.prepare` when the directory does not
                     exist yet (a line on stderr names the dataset, its sources and the directory);
    kind='tasks'   : synthetic tasks (configurable_fm/data/synthetic) encoded as prompt+answer rows with loss only
                     on the answers and the eos, for fine-tuning:
                         data.tasks=('sort', 'reverse')   names in synthetic.TASKS
                         data.train_examples=N            training examples per task ('train' split)
                         data.eval_examples=M             held-out examples per task ('test' split) for val loss
                         data.task_seed=S                 seed of the example generators (cfg.seed orders batches)
                     Rows (N_rows = N x #tasks, L = seq_len) come from `synthetic.encode_examples`, tasks in the
                     listed order; training batches from `pipeline.from_examples`, evaluation batches from
                     `pipeline.eval_example_batches`.

Where token datasets live (`dataset_dir`): one place, the data root, `$CFM_DATA_DIR` or by default
~/.cache/configurable_fm/data, whatever the current directory. `data.dir` (and a dataset config's `out_dir`):
    ''                          -> <data root>/<data.prepare> (<data root>/<name> for a dataset config);
    'data/stdlib', 'stdlib'     -> <data root>/stdlib: a relative path is inside the data root (a leading 'data/',
                                   the shipped configs' form, is dropped);
    '/abs/dir', '~/d', './d'    -> that directory (./ and ../ relative to the current directory).
So `cfm-train --config experiments/pretrain.py:tiny` builds and reads the same shards from any directory.

Tokenizer of task rows and task metrics: `config.tokenizer` (a registered model name, default SmolLM2's
'smollm2-135m-instruct', or a tokenizer.json / directory / .gguf path) with `config.token_ids` = {eos, pad, bos}:
-1 takes eos / pad from the tokenizer's GGUF metadata (pad falls back to eos); bos=-1 means no BOS token.

Task metrics (`make_task_metrics`): `config.task_metrics=('sort', ...)` evaluated by greedy generation and exact
match (`synthetic.task_metric`) with `config.task_eval` = {n, seed, batch_size, max_new_tokens (0: the longest
answer + 2), split}; logged as '<task>/exact_match'.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.data import pipeline
# The data root and the dataset directory resolver live at the data layer (data/shards.py), re-exported here.
from configurable_fm.data.shards import DATA_DIR_ENV, DEFAULT_DATA_ROOT, data_root, dataset_dir  # noqa: F401
from configurable_fm.errors import ConfigError

DEFAULT_TOKENIZER = "smollm2-135m-instruct"
TASK_EVAL_DEFAULTS = {"n": 64, "seed": 0, "batch_size": 32, "max_new_tokens": 0, "split": "test"}


@dataclasses.dataclass
class TokenData:
    """Packed next-token prediction over 1-D token sequences (any object with len() and slicing)."""

    train_tokens: Any
    val_tokens: Any
    seq_len: int
    batch_size: int
    seed: int
    eval_batch_size: int
    max_eval_batches: int | None = None
    manifest: dict | None = None

    def train_batches(self, process_index: int = 0, process_count: int = 1):
        return pipeline.PackedBatches(self.train_tokens, seq_len=self.seq_len, global_batch_size=self.batch_size,
                                      seed=self.seed, process_index=process_index, process_count=process_count)

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        return pipeline.eval_batches(self.val_tokens, self.seq_len, self.eval_batch_size,
                                     max_batches=self.max_eval_batches, process_index=process_index,
                                     process_count=process_count)


@dataclasses.dataclass
class ExampleData:
    """Pre-tokenised rows {inputs, targets, loss_mask} (N, L) for training, and held-out rows for evaluation.

    `tokenizer`: the TaskTokenizer the rows were made with (task metrics reuse it), when known."""

    train: dict
    val: dict
    batch_size: int
    seed: int
    eval_batch_size: int
    manifest: dict | None = None
    max_eval_batches: int | None = None
    tokenizer: "TaskTokenizer | None" = None

    def train_batches(self, process_index: int = 0, process_count: int = 1):
        return pipeline.from_examples(self.train, batch_size=self.batch_size, seed=self.seed,
                                      process_index=process_index, process_count=process_count)

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        """Every held-out row once, in order; the last batch padded with rows of 'mask' 0."""
        return pipeline.eval_example_batches(self.val, self.eval_batch_size, self.max_eval_batches,
                                             process_index=process_index, process_count=process_count)


# ------------------------------------------------------------------------------------------ shards
def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shard_data(cfg: ml_collections.ConfigDict, *, log: Callable[[str], None] | None = None) -> TokenData:
    """TokenData of the shards in `dataset_dir(data.dir, data.prepare)`, built first from the experiments/data.py
    config named `data.prepare` when that directory does not exist (announced through `log`, default stderr:
    dataset, sources, directory)."""
    from configurable_fm.data.shards import MANIFEST, TokenStream

    say = log or _stderr
    prepare = cfg.data.get("prepare") or None
    directory = dataset_dir(cfg.data.get("dir"), prepare)
    if not directory.exists():
        if not prepare:
            from configurable_fm.errors import SourceNotFound

            raise SourceNotFound(f"data.dir={cfg.data.get('dir')!r} is {directory.absolute()}, which does not "
                                 "exist, and data.prepare names no dataset config to build it "
                                 "(see experiments/data.py)")
        from configurable_fm.data.shards import build_dataset
        from configurable_fm.errors import OutputExists
        from experiments import data as data_configs

        dcfg = data_configs.get_config(prepare)
        say(f"data: building dataset {prepare!r} (experiments/data.py:{prepare}, sources: "
            f"{', '.join(dcfg.sources)}) into {directory} (first use; the data root is ${DATA_DIR_ENV}, "
            f"default {DEFAULT_DATA_ROOT})")
        try:
            build_dataset(dcfg, directory, log=lambda m: say(f"data: {m}"))
        except OutputExists:
            if not (directory / MANIFEST).is_file():
                raise
            say(f"data: {directory} was built meanwhile by another process; using it")
    train, val = TokenStream(directory, "train"), TokenStream(directory, "validation")
    vocab, model_vocab = train.manifest.get("vocab_size"), cfg.get("model", {}).get("vocab_size")
    if vocab and model_vocab and int(vocab) > int(model_vocab):
        raise ConfigError(f"data.dir {directory}: its tokenizer has {vocab} ids (manifest vocab_size) but "
                          f"model.vocab_size={model_vocab}: ids past the embedding would make the loss NaN; set "
                          f"model.vocab_size >= {vocab}")
    return TokenData(train, val, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.data.eval_batch_size,
                     cfg.data.get("max_eval_batches"), manifest=train.manifest)


# ------------------------------------------------------------------------------------------ tokenizer
@dataclasses.dataclass(frozen=True)
class TaskTokenizer:
    """A `tokenizers.Tokenizer` with the special ids that task rows and task metrics use.

    info = {spec, sha256 of the tokenizer's JSON, vocab_size}; bos_id None: rows start with the prompt."""

    tokenizer: Any
    info: dict
    eos_id: int
    pad_id: int
    bos_id: int | None


def _file_key(spec: str) -> tuple:
    """(spec, resolved path, mtime_ns, size): a cache key that changes when the tokenizer file does."""
    from configurable_fm.models import registry

    path = registry.model_path(spec) if spec in registry.MODELS else Path(spec)
    try:
        st = path.stat()
        return spec, str(path.resolve()), st.st_mtime_ns, st.st_size
    except OSError:
        return spec, str(path), None, None


@functools.lru_cache(maxsize=4)
def _read_tokenizer(key: tuple):
    """(tokenizer, info, special ids from GGUF metadata or {}) for a `_file_key`; cached (GGUF parsing takes
    seconds and a study reads the same tokenizer in several stages)."""
    from configurable_fm.data.shards import resolve_tokenizer, sha256_text
    from configurable_fm.interop.tokenizers import gguf_special_tokens, tokenizer_from_gguf
    from configurable_fm.interop.gguf import read_gguf

    spec, path = key[0], Path(key[1])
    if path.suffix == ".gguf" and path.is_file():
        reader = read_gguf(path)  # parse the metadata once for the tokenizer and its special ids
        tok, specials = tokenizer_from_gguf(reader), gguf_special_tokens(reader)
        info = {"spec": spec, "sha256": sha256_text(tok.to_str()),
                "vocab_size": int(tok.get_vocab_size(with_added_tokens=True))}
        return tok, info, specials
    tok, info = resolve_tokenizer(spec)
    return tok, info, {}


def load_task_tokenizer(spec: str = DEFAULT_TOKENIZER, *, eos: int = -1, pad: int = -1, bos: int = -1,
                        where: str = "token_ids") -> TaskTokenizer:
    """The tokenizer `spec` with its special ids: eos/pad -1 -> from the GGUF metadata (pad: else eos), bos -1 ->
    none. Ids outside the vocabulary, or an eos the tokenizer does not define, are errors naming `where`.<key>."""
    tok, info, specials = _read_tokenizer(_file_key(str(spec)))
    vocab = info["vocab_size"]
    if eos < 0:
        if "eos" not in specials:
            raise ConfigError(f"{where}.eos is -1 (take it from the tokenizer) but tokenizer {spec!r} names no eos "
                             f"id in GGUF metadata; set {where}.eos")
        eos = specials["eos"]
    if pad < 0:
        pad = specials.get("pad", eos)
    for key, value in (("eos", eos), ("pad", pad), ("bos", bos)):
        if value >= vocab:
            raise ConfigError(f"{where}.{key}={value} is outside the vocabulary of tokenizer {spec!r} ({vocab} ids)")
    return TaskTokenizer(tok, info, int(eos), int(pad), None if bos < 0 else int(bos))


def task_tokenizer(cfg: ml_collections.ConfigDict) -> TaskTokenizer:
    """`load_task_tokenizer(cfg.tokenizer, **cfg.token_ids)` with the defaults of the module docstring."""
    ids = dict(cfg.get("token_ids") or {})
    unknown = sorted(set(ids) - {"eos", "pad", "bos"})
    if unknown:
        raise ConfigError(f"token_ids has unknown key(s) {unknown}; valid: ['bos', 'eos', 'pad']")
    return load_task_tokenizer(cfg.get("tokenizer") or DEFAULT_TOKENIZER,
                               **{k: int(v) for k, v in ids.items() if v is not None})


# ------------------------------------------------------------------------------------------ tasks
def _task_names(value, key: str) -> tuple[str, ...]:
    from configurable_fm.data.synthetic import TASKS

    names = (value,) if isinstance(value, str) else tuple(value or ())
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"{key} names unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} lists a task twice: {list(names)}")
    return names


def _count(d, key: str, low: int) -> int:
    value = d.get(key)
    if not is_int(value) or value < low:
        raise ConfigError(f"data.{key} must be an int >= {low}, got {value!r}")
    return int(value)


def encode_task_rows(tok: TaskTokenizer, names, split: str, n: int, seed: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of `n` examples of each task's `split`, concatenated in task order ({inputs, targets, loss_mask}
    (n * len(names), seq_len)); too long an example is an error naming the task."""
    from configurable_fm.data.synthetic import encode_examples, get_task

    parts = []
    for name in names:
        try:
            parts.append(encode_examples(tok.tokenizer, get_task(name).examples(split, n, seed), seq_len,
                                         eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id))
        except ValueError as e:
            raise ConfigError(f"data.tasks: task {name!r} ({split} split): {e}") from None
    return {k: np.concatenate([p[k] for p in parts]) for k in ("inputs", "targets", "loss_mask")}


def _crc(rows: dict) -> int:
    crc = 0
    for k in sorted(rows):
        crc = zlib.crc32(np.ascontiguousarray(rows[k]).tobytes(), crc)
    return crc


def task_data(cfg: ml_collections.ConfigDict) -> ExampleData:
    """ExampleData of synthetic task rows (module docstring); `data.train_examples=0` builds evaluation rows only."""
    d = cfg.data
    names = _task_names(d.get("tasks"), "data.tasks")
    if not names:
        raise ConfigError("data.kind='tasks' needs data.tasks, e.g. ('sort',)")
    n_train, n_eval = _count(d, "train_examples", 0), _count(d, "eval_examples", 1)
    seed = _count(d, "task_seed", 0)
    tok = task_tokenizer(cfg)
    train = encode_task_rows(tok, names, "train", n_train, seed, cfg.seq_len)
    val = encode_task_rows(tok, names, "test", n_eval, seed, cfg.seq_len)
    manifest = {"kind": "tasks", "tasks": list(names), "train_examples": n_train, "eval_examples": n_eval,
                "task_seed": seed, "seq_len": int(cfg.seq_len), "tokenizer": tok.info,
                "token_ids": {"eos": tok.eos_id, "pad": tok.pad_id, "bos": tok.bos_id},
                "train_rows": len(train["inputs"]), "eval_rows": len(val["inputs"]),
                "train_answer_tokens": int(train["loss_mask"].sum()), "eval_answer_tokens": int(val["loss_mask"].sum()),
                "train_crc32": _crc(train), "eval_crc32": _crc(val)}
    return ExampleData(train, val, cfg.batch_size, cfg.seed, d.get("eval_batch_size") or cfg.batch_size,
                       manifest=manifest, max_eval_batches=d.get("max_eval_batches"), tokenizer=tok)


def make_task_metrics(cfg: ml_collections.ConfigDict, tokenizer: TaskTokenizer | None = None
                      ) -> dict[str, Callable]:
    """{task: fn(model) -> {'<task>/exact_match': float}} for the names in `cfg.task_metrics` (empty when
    there are none; the tokenizer is then not loaded). `tokenizer`: a TaskTokenizer already loaded from the same
    config (e.g. the task data's) to reuse; anything else is ignored."""
    from configurable_fm.data.synthetic import task_metric

    names = _task_names(cfg.get("task_metrics"), "task_metrics")
    if not names:
        return {}
    ev = dict(cfg.get("task_eval") or {})
    unknown = sorted(set(ev) - set(TASK_EVAL_DEFAULTS))
    if unknown:
        raise ConfigError(f"task_eval has unknown key(s) {unknown}; valid: {sorted(TASK_EVAL_DEFAULTS)}")
    ev = {**TASK_EVAL_DEFAULTS, **ev}
    tok = tokenizer if isinstance(tokenizer, TaskTokenizer) else task_tokenizer(cfg)
    kw = {"n": int(ev["n"]), "seed": int(ev["seed"]), "batch_size": int(ev["batch_size"]), "split": ev["split"],
          "eos_id": tok.eos_id, "pad_id": tok.pad_id, "bos_id": tok.bos_id}
    if ev["max_new_tokens"]:
        kw["max_new_tokens"] = int(ev["max_new_tokens"])
    return {name: task_metric(name, tokenizer=tok.tokenizer, **kw) for name in names}


DATA_KINDS: dict[str, Callable] = {"shards": shard_data, "tasks": task_data}


def make_data(cfg: ml_collections.ConfigDict):
    kind = cfg.data.kind
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind={kind!r} is unknown; supported: {sorted(DATA_KINDS)}")
    return DATA_KINDS[kind](cfg)
