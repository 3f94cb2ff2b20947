"""Batches of the data pipelines as analysis sees them: the token mask, a bounded iteration, progress reports.

Batches are dicts as configurable_fm/data/pipeline.py and configurable_fm/train/data.py yield them:
{'inputs': int (B, L), 'targets': int (B, L), 'loss_mask'?: (B, L), 'mask'?: (B,) row mask of padded evaluation
batches, 'attention_mask'?: (B, L), 'token_mask'?: (B, L)}. Analysis needs only 'inputs'.

Token mask m (B, L), the positions whose values enter a reduction (`token_mask`):
    'attention_mask' when the batch has one (1 = real token);
    else, with a 'loss_mask', the positions t <= the row's last scored position (task rows: the prompt and the
    answer, not the right padding; a row with no scored position has none);
    else every position;
then times the row mask 'mask' (B,) and the position mask 'token_mask' (B, L) when present ('token_mask' picks
positions, e.g. each entity mention's last token, without changing what the forward sees).
"""
from __future__ import annotations

import itertools
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from configurable_fm.checks import is_int


def batch_inputs(batch: Mapping[str, Any], where: str) -> np.ndarray:
    """The batch's 'inputs' as int32 (B, L); KeyError/ValueError naming `where` otherwise."""
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"{where} lacks 'inputs'; it has {keys} (batches are dicts with inputs (B, L) and optionally "
                       "targets, loss_mask, mask and attention_mask, as configurable_fm.data.pipeline yields them)")
    inputs = np.asarray(batch["inputs"])
    if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(f"{where}: inputs must be integer token ids (B, L), got {inputs.dtype} {inputs.shape}")
    return inputs.astype(np.int32)


def masked_forward(model, batch):
    """reduce_over's forward for batches with an attention_mask: model(inputs, attention_mask=attention_mask), with
    batch_keys ('inputs', 'attention_mask'). One module-level function, so repeated reductions reuse their compiled
    step."""
    return model(batch["inputs"], attention_mask=batch["attention_mask"])


def token_mask(batch: Mapping[str, Any], where: str = "batch") -> np.ndarray:
    """(B, L) float32 mask of the token positions that enter reductions (module docstring)."""
    inputs = batch_inputs(batch, where)
    if "attention_mask" in batch:
        m = np.asarray(batch["attention_mask"], np.float32)
        if m.shape != inputs.shape:
            raise ValueError(f"{where}: attention_mask is {m.shape} but inputs are {inputs.shape}")
    elif "loss_mask" in batch:
        lm = np.asarray(batch["loss_mask"]) > 0
        if lm.shape != inputs.shape:
            raise ValueError(f"{where}: loss_mask is {lm.shape} but inputs are {inputs.shape}")
        last = np.where(lm.any(axis=1), lm.shape[1] - 1 - np.argmax(lm[:, ::-1], axis=1), -1)
        m = (np.arange(lm.shape[1])[None, :] <= last[:, None]).astype(np.float32)
    else:
        m = np.ones(inputs.shape, np.float32)
    if "mask" in batch:
        rows = np.asarray(batch["mask"], np.float32)
        if rows.shape != inputs.shape[:1]:
            raise ValueError(f"{where}: mask is {rows.shape} but the batch has {inputs.shape[0]} rows")
        m = m * rows[:, None]
    if "token_mask" in batch:
        picked = np.asarray(batch["token_mask"], np.float32)
        if picked.shape != inputs.shape:
            raise ValueError(f"{where}: token_mask is {picked.shape} but inputs are {inputs.shape}")
        m = m * picked
    return m


def limited(batches: Iterable, max_batches: Optional[int]) -> tuple[Iterable, Optional[int]]:
    """The first `max_batches` batches (all when None), and their number when known (for a progress bar)."""
    if max_batches is not None:
        if not is_int(max_batches) or max_batches < 1:
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        try:
            total = min(len(batches), int(max_batches))  # type: ignore[arg-type]
        except TypeError:
            total = int(max_batches)
        return itertools.islice(batches, int(max_batches)), total
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return batches, total


def progress_bar(iterable: Iterable, *, total: Optional[int], desc: str, enabled: bool = True,
                 log: Optional[Callable[[str], None]] = None, every_s: float = 30.0,
                 unit: str = "batch") -> Iterator:
    """Iterates `iterable`, reporting progress: a tqdm bar (tqdm.auto) when stderr is a terminal or a notebook
    and no `log` is given, else lines 'desc: i/total batch done, r batch/s, s elapsed' passed to `log` (default:
    printed to stderr) at most every `every_s` seconds and once at the end. `enabled=False`: silent."""
    if not enabled:
        yield from iterable
        return
    if log is None:
        from tqdm.auto import tqdm

        bar = tqdm(iterable, total=total, desc=desc, unit=unit, disable=None)  # None: off when not a tty
        if not bar.disable:
            try:
                yield from bar
            finally:
                bar.close()
            return
        bar.close()
        log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    start = last = time.perf_counter()
    i = 0

    def line(now):
        of = f"/{total}" if total is not None else ""
        rate = i / (now - start) if now > start else 0.0
        return f"{desc}: {i}{of} {unit} done, {rate:.2f} {unit}/s, {now - start:.0f} s elapsed"

    for item in iterable:
        yield item
        i += 1
        now = time.perf_counter()
        if now - last >= every_s:
            log(line(now))
            last = now
    log(line(time.perf_counter()))
