"""Input pipelines: packed fixed-length LM batches, deterministic and exactly resumable.

This is the project's documented alternative to grain: plain numpy, no extra dependency on the GPU machine, and
an iterator state that is a small JSON dict (saved with orbax's `JsonSave` next to the model) from which the
exact next batch is restored.

Packing (pre-training). A token stream t of length n (any object with `len()` and slicing `t[a:b]` returning a 1-D
integer array: `configurable_fm.data.shards.TokenStream`, a numpy array or memmap) is cut into
num_windows = (n - 1) // L windows of L + 1 tokens at stride L; window i is t[i*L : i*L + L + 1], so consecutive
windows share one token and every token but the first is a target exactly once:

    inputs[i] = t[i*L : i*L + L],   targets[i] = t[i*L + 1 : i*L + L + 1]

Order. Epoch e visits the windows in the order perm_e = Generator(PCG64([seed, e])).permutation(num_windows)
(the identity when shuffle=False). Global batch k of epoch e is the B consecutive windows perm_e[k*B : (k+1)*B];
with drop_remainder the last num_windows % B windows of each epoch are skipped (different ones every epoch),
without it the batches run on through the concatenation perm_0 ++ perm_1 ++ ... and may straddle an epoch.

Hosts. Process p of P takes rows [p*B/P, (p+1)*B/P) of every global batch, so the global batch (and the state)
does not depend on P: a run may resume on a different number of hosts and see the same data.

    it = PackedBatches(stream, seq_len=2048, global_batch_size=256, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                    # {'inputs': int32 (B/P, L), 'targets': int32 (B/P, L)}
    state = it.get_state()              # JSON-serialisable; it.set_state(state) resumes at the next batch
    for batch in eval_batches(val_stream, seq_len=2048, batch_size=64): ...   # + 'mask' (B,) float32
    ft = from_examples({'inputs': X, 'targets': Y, 'loss_mask': M}, batch_size=32, seed=0)
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError

STATE_VERSION = 1


def epoch_order(num_items: int, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch `epoch`: a permutation of range(num_items) from PCG64([seed, epoch])."""
    if not shuffle:
        return np.arange(num_items, dtype=np.int64)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_items)


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not a positive multiple of process_count={process_count}")
    return batch_size // process_count


def _crc(arrays) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc


class _EpochBatches:
    """Shuffled-per-epoch batches over `num_items` items, with the JSON state protocol.

    Subclasses provide `_fetch(item_ids) -> dict of arrays` and `_data_settings() -> dict` (what identifies the
    data, checked on `set_state`). Position = (epoch, index): the next batch starts at perm_epoch[index].
    """

    kind = "_EpochBatches"

    def __init__(self, num_items: int, *, batch_size: int, seed: int, process_index: int, process_count: int,
                 shuffle: bool, drop_remainder: bool):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._rows = _check_sharding(batch_size, process_index, process_count)
        if num_items < 1:
            raise ConfigError(f"{self.kind}: the data holds no complete item")
        if drop_remainder and num_items < batch_size:
            raise ConfigError(f"{self.kind}: only {num_items} items, fewer than one global batch of {batch_size} "
                              "(use a smaller batch or drop_remainder=False)")
        self.num_items = int(num_items)
        self.global_batch_size = int(batch_size)
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.shuffle, self.drop_remainder = bool(shuffle), bool(drop_remainder)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None

    # ------------------------------------------------------------------------------------------- order
    @property
    def batches_per_epoch(self) -> int:
        """num_items // B with drop_remainder; otherwise ceil(num_items / B) (the last one runs into the next epoch)."""
        if self.drop_remainder:
            return self.num_items // self.global_batch_size
        return math.ceil(self.num_items / self.global_batch_size)

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order, self._order_epoch = epoch_order(self.num_items, self.seed, epoch, shuffle=self.shuffle), epoch
        return self._order

    def _next_global_ids(self) -> np.ndarray:
        """Item ids of the next global batch (B,), advancing the position."""
        b = self.global_batch_size
        if self.drop_remainder:
            ids = self._order_of(self.epoch)[self.index:self.index + b]
            self.index += b
        else:
            parts, need = [], b
            while need:
                take = self._order_of(self.epoch)[self.index:self.index + need]
                parts.append(take)
                need -= len(take)
                self.index += len(take)
                if self.index == self.num_items:
                    self.epoch, self.index = self.epoch + 1, 0
            ids = np.concatenate(parts)
        self._normalise()
        return ids

    def _normalise(self):
        """Moves to the next epoch when the rest of this one cannot make a batch (drop_remainder) or is empty."""
        left = self.num_items - self.index
        if left == 0 or (self.drop_remainder and left < self.global_batch_size):
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ids = self._next_global_ids()
        lo = self.process_index * self._rows
        return self._fetch(ids[lo:lo + self._rows])

    # ------------------------------------------------------------------------------------------- state
    def _settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "global_batch_size": self.global_batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "drop_remainder": self.drop_remainder, **self._data_settings()}

    def get_state(self) -> dict[str, Any]:
        """{'version', 'epoch', 'index', + the settings that must match on restore}; JSON-serialisable."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "index": self.index, **self._settings()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a `get_state()` dict; the next batch is the one that would have followed it.

        Raises ValueError naming the first setting (batch size, seed, seq_len, data size, ...) that differs.
        The process index/count are not part of the state: the global batch sequence does not depend on them.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pipeline state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in self._settings().items():
            if key not in state:
                raise ValueError(f"pipeline state lacks setting {key!r} (this pipeline has {key}={mine!r})")
            if state[key] != mine:
                raise ValueError(f"cannot restore pipeline state: {key} is {state[key]!r} in the state but "
                                 f"{mine!r} in this pipeline")
        epoch, index = state.get("epoch"), state.get("index")
        for name, v in (("epoch", epoch), ("index", index)):
            if not is_int(v) or v < 0:
                raise ValueError(f"pipeline state {name}={v!r} is not a non-negative integer")
        limit = self.num_items - (self.global_batch_size if self.drop_remainder else 1)
        if index > limit:
            raise ValueError(f"pipeline state index={index} is past the last batch start {limit} of an epoch")
        self.epoch, self.index = epoch, index


class PackedBatches(_EpochBatches):
    """Next-token batches of packed windows of a token stream (see the module docstring for the exact order).

    `next(it)` -> {'inputs': int32 (B/P, L), 'targets': int32 (B/P, L)}. Iteration never ends (epochs follow
    one another). `tokens_per_batch` = B * L global target tokens per step.
    """

    kind = "PackedBatches"

    def __init__(self, tokens, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, drop_remainder: bool = True):
        if getattr(tokens, "ndim", 1) != 1:
            raise ValueError(f"tokens must be a 1-D sequence, got shape {getattr(tokens, 'shape', None)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens, self.seq_len, self.num_tokens = tokens, int(seq_len), len(tokens)
        self.num_windows = max(0, (self.num_tokens - 1) // self.seq_len)
        if self.num_windows < 1:
            raise ConfigError(f"a stream of {self.num_tokens} tokens holds no window of seq_len+1={seq_len + 1}")
        super().__init__(self.num_windows, batch_size=global_batch_size, seed=seed, process_index=process_index,
                         process_count=process_count, shuffle=shuffle, drop_remainder=drop_remainder)
        self._fingerprint = _crc([_window(tokens, 0, self.seq_len), _window(tokens, self.num_windows - 1, self.seq_len)])

    @property
    def tokens_per_batch(self) -> int:
        return self.global_batch_size * self.seq_len

    def _data_settings(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "num_tokens": self.num_tokens, "data_crc32": self._fingerprint}

    def _fetch(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.stack([_window(self.tokens, int(w), self.seq_len) for w in window_ids])
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


def _window(tokens, i: int, seq_len: int) -> np.ndarray:
    """Window i: tokens[i*L : i*L + L + 1] as int32 (L + 1,)."""
    w = np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1])
    if w.shape != (seq_len + 1,):
        raise ValueError(f"tokens[{i * seq_len}:{i * seq_len + seq_len + 1}] (window {i}) has shape {w.shape}, "
                         f"expected ({seq_len + 1},)")
    if not np.issubdtype(w.dtype, np.integer):
        raise TypeError(f"token window {i} has dtype {w.dtype}, expected integers")
    return w.astype(np.int32, copy=False)


def eval_batches(tokens, seq_len: int, batch_size: int, max_batches: int | None = None, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive windows 0, 1, ..., num_windows-1 (no shuffle) in batches of `batch_size` (global).

    Yields {'inputs', 'targets': int32 (B/P, L), 'mask': float32 (B/P,)}; the last batch is completed with
    all-zero rows whose mask is 0, so summing loss * mask over all batches counts every window's L targets
    exactly once: the targets tokens[1 : num_windows*L + 1] ((n-1) % L trailing tokens that do not fill a
    window are not evaluated). `max_batches` stops after that many batches. Process p gets rows
    [p*B/P, (p+1)*B/P) of every batch, as in `PackedBatches`.
    """
    rows = _check_sharding(batch_size, process_index, process_count)
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    num_windows = max(0, (len(tokens) - 1) // seq_len)
    num_batches = math.ceil(num_windows / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for k in range(num_batches):
        start = k * batch_size + process_index * rows
        out = np.zeros((rows, seq_len + 1), np.int32)
        mask = np.zeros((rows,), np.float32)
        for r in range(rows):
            if start + r < num_windows:
                out[r], mask[r] = _window(tokens, start + r, seq_len), 1.0
        yield {"inputs": np.ascontiguousarray(out[:, :-1]), "targets": np.ascontiguousarray(out[:, 1:]),
               "mask": mask}


# ------------------------------------------------------------------------------------- pre-tokenised examples
def _check_examples(examples: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated copies: inputs/targets int32 (N, L), loss_mask float32 (N, L) (ones when absent), extras as given."""
    missing = [k for k in ("inputs", "targets") if k not in examples]
    if missing:
        raise KeyError(f"examples lack {missing}; they have {sorted(examples)}")
    out = {k: np.asarray(v) for k, v in sorted(examples.items())}
    if "loss_mask" not in out:
        out["loss_mask"] = np.ones(out["targets"].shape, np.float32)
    shape = out["inputs"].shape
    if out["inputs"].ndim != 2:
        raise ValueError(f"examples['inputs'] must be (N, L), got shape {shape}")
    n = len(out["inputs"])
    for k, v in out.items():
        if v.ndim == 0 or len(v) != n:
            raise ValueError(f"examples[{k!r}] has shape {v.shape}, but inputs have N={n} rows")
    for k in ("targets", "loss_mask"):
        if out[k].shape != shape:
            raise ValueError(f"examples[{k!r}] has shape {out[k].shape}, expected {shape} like inputs")
    for k in ("inputs", "targets"):
        if not np.issubdtype(out[k].dtype, np.integer):
            raise TypeError(f"examples[{k!r}] has dtype {out[k].dtype}, expected integers")
        out[k] = out[k].astype(np.int32)
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    return out


class ExampleBatches(_EpochBatches):
    """Shuffled-per-epoch batches of pre-tokenised examples (fine-tuning), same state protocol as PackedBatches.

    `next(it)` -> {'inputs': int32 (B/P, L), 'targets': int32 (B/P, L), 'loss_mask': float32 (B/P, L), extras}.
    """

    kind = "ExampleBatches"

    def __init__(self, examples: Mapping[str, Any], *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, drop_remainder: bool = True):
        self.examples = _check_examples(examples)
        self.seq_len = self.examples["inputs"].shape[1]
        super().__init__(len(self.examples["inputs"]), batch_size=batch_size, seed=seed,
                         process_index=process_index, process_count=process_count, shuffle=shuffle,
                         drop_remainder=drop_remainder)
        self._fingerprint = _crc(self.examples[k] for k in sorted(self.examples))

    def _data_settings(self) -> dict[str, Any]:
        return {"num_examples": self.num_items, "seq_len": self.seq_len, "keys": sorted(self.examples),
                "data_crc32": self._fingerprint}

    def _fetch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[ids] for k, v in self.examples.items()}


def from_examples(examples: Mapping[str, Any], batch_size: int, seed: int, *, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True, drop_remainder: bool = True) -> ExampleBatches:
    """An `ExampleBatches` iterator over {'inputs', 'targets', 'loss_mask'?, ...} arrays of N rows (copied)."""
    return ExampleBatches(examples, batch_size=batch_size, seed=seed, process_index=process_index,
                          process_count=process_count, shuffle=shuffle, drop_remainder=drop_remainder)


def eval_example_batches(examples: Mapping[str, Any], batch_size: int, max_batches: int | None = None, *,
                         process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Examples in their order, in batches of `batch_size`; the last one padded with zero rows, 'mask' (B/P,) 0 there."""
    data = _check_examples(examples)
    if "mask" in data:
        raise ValueError("examples may not have a key 'mask': eval batches add it (1 for real rows, 0 for padding)")
    rows = _check_sharding(batch_size, process_index, process_count)
    n = len(data["inputs"])
    num_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for k in range(num_batches):
        ids = np.arange(k * batch_size + process_index * rows, k * batch_size + (process_index + 1) * rows)
        valid = ids < n
        batch = {}
        for key, v in data.items():
            out = np.zeros((rows,) + v.shape[1:], v.dtype)
            out[valid] = v[ids[valid]]
            batch[key] = out
        batch["mask"] = valid.astype(np.float32)
        yield batch
