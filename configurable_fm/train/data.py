"""What the trainer reads: a token stream (packed windows) or pre-tokenised examples, for training and evaluation.

`make_data(config)` builds it from `config.data`:
    kind='shards'  : token shards written by scripts/prepare_data.py in `data.dir` (built first from the
                     experiments/data.py config named `data.prepare` when the directory does not exist yet);
    kind='tasks'   : synthetic tasks (configurable_fm/data/synthetic.py) encoded as prompt+answer rows with
                     loss only on the answers, for fine-tuning.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import ml_collections
import numpy as np

from configurable_fm.data import pipeline


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

    def eval_batches(self) -> Iterator[dict]:
        return pipeline.eval_batches(self.val_tokens, self.seq_len, self.eval_batch_size,
                                     max_batches=self.max_eval_batches)


@dataclasses.dataclass
class ExampleData:
    """Pre-tokenised rows {inputs, targets, loss_mask} (N, L) for training, and held-out rows for evaluation."""

    train: dict
    val: dict
    batch_size: int
    seed: int
    eval_batch_size: int
    manifest: dict | None = None

    def train_batches(self, process_index: int = 0, process_count: int = 1):
        return pipeline.from_examples(self.train, batch_size=self.batch_size, seed=self.seed,
                                      process_index=process_index, process_count=process_count)

    def eval_batches(self) -> Iterator[dict]:
        n = len(self.val["inputs"])
        for start in range(0, n, self.eval_batch_size):
            rows = {k: np.asarray(v[start:start + self.eval_batch_size]) for k, v in self.val.items()}
            short = self.eval_batch_size - len(rows["inputs"])
            mask = np.ones(len(rows["inputs"]), np.float32)
            if short:  # pad the last batch; padded rows carry mask 0
                rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
                mask = np.concatenate([mask, np.zeros(short, np.float32)])
            yield {**rows, "mask": mask}


def shard_data(cfg: ml_collections.ConfigDict) -> TokenData:
    from configurable_fm.data.shards import TokenStream

    directory = Path(cfg.data.dir)
    if not directory.exists():
        if not cfg.data.get("prepare"):
            raise FileNotFoundError(f"data.dir={directory} does not exist and data.prepare names no dataset config "
                                    "to build it (see experiments/data.py)")
        from configurable_fm.data.shards import build_dataset
        from experiments import data as data_configs

        build_dataset(data_configs.get_config(cfg.data.prepare), directory)
    train, val = TokenStream(directory, "train"), TokenStream(directory, "validation")
    return TokenData(train, val, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.data.eval_batch_size,
                     cfg.data.get("max_eval_batches"), manifest=train.manifest)


def make_data(cfg: ml_collections.ConfigDict):
    kind = cfg.data.kind
    if kind == "shards":
        return shard_data(cfg)
    raise ValueError(f"data.kind={kind!r} is unknown; supported: ['shards']")
