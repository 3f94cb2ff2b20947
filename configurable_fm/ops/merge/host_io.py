"""Host-side I/O helpers of the streaming merge: aligned host buffers and output files written past the page cache.

`aligned_empty`: numpy buffers whose data start at a chosen alignment (jax's CPU client adopts a 64-byte aligned
host buffer without copying it; O_DIRECT needs the device's block alignment).

`ShardFile`: one output file of known size written by positioned writes. Bytes that arrive in file order (the
merge writes every shard front to back: header, then each tensor at its planned offset) go through an aligned
staging buffer and are written with O_DIRECT in whole blocks, bypassing the page cache; the last partial block is
padded with zeros and the file truncated to its size. A write out of order, a file system that refuses O_DIRECT
(EINVAL) or `direct=False` falls back to ordinary buffered `pwrite` for the rest of the file (no direct write
follows a buffered one, so a whole block written directly never overwrites bytes written through the cache).

Why: a buffered write of a new file makes the kernel allocate a page-cache page per 4 KiB and write it back later.
On the 2-core VMs measured here, memory the guest has handed back to its host costs up to ~2.5 s/GB to touch
again, so writing a fresh 2.2 GB output took 2.3-5.9 s buffered and 1.2-1.4 s with O_DIRECT (dd, 2026-12-03,
BENCHMARKS.md); the staged copy costs one memcpy of the output from a buffer that stays resident.
"""
from __future__ import annotations

import errno
import os
from typing import Optional, Sequence

import numpy as np

HOST_ALIGNMENT = 64  # bytes: jax's CPU client adopts a host buffer aligned so without copying it (device_put)
DIRECT_BLOCK = 4096  # bytes: O_DIRECT alignment of buffer address, file offset and length (any logical block <= it)
STAGE_BYTES = 32 << 20  # bytes of the staging buffer of a directly written file (allocated while it is written)
DIRECT_MIN_BYTES = 64 << 20  # files smaller than this are written buffered by default (direct=None)
IO_CHUNK = 1 << 30  # bytes per preadv/pwrite call (Linux moves at most ~2 GiB per call)


def aligned_empty(shape: Sequence[int], dtype, alignment: int = HOST_ALIGNMENT) -> np.ndarray:
    """np.empty(shape, dtype) whose data starts at a multiple of `alignment` bytes. numpy's large allocations start
    16 bytes past a page boundary, and jax.device_put copies such a buffer onto the CPU device; an aligned one it
    adopts as it is (no copy: ~1.3 s of a 1B-parameter linear merge, issue 14). An empty array has no data to
    align."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + IO_CHUNK], offset + done)


class ShardFile:
    """A new file of `size` bytes (created or truncated), written by `write_at(offset, data)`; `close()` writes
    what is staged and leaves the file exactly `size` bytes long.

    direct: True (O_DIRECT where the file system allows it), False (buffered), None (O_DIRECT for files of at least
    DIRECT_MIN_BYTES). `direct_bytes` counts the bytes written past the page cache (0 once fallen back before
    the first block)."""

    def __init__(self, path: str | os.PathLike, size: int, *, direct: Optional[bool] = None,
                 stage_bytes: int = STAGE_BYTES):
        self.path, self.size = os.fspath(path), int(size)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        self.direct_fd: Optional[int] = None
        if direct or (direct is None and self.size >= DIRECT_MIN_BYTES):
            try:
                self.direct_fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                self.direct_fd = None  # a file system without O_DIRECT: buffered writes
        self.stage_bytes = max(DIRECT_BLOCK, stage_bytes // DIRECT_BLOCK * DIRECT_BLOCK)
        self.stage: Optional[np.ndarray] = None  # allocated at the first direct write, freed once the file is done
        self.fill = 0  # bytes staged
        self.written = 0  # bytes written directly (a multiple of DIRECT_BLOCK); the stream's position is written+fill
        self.direct_bytes = 0

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def write_at(self, offset: int, data) -> None:
        """Writes `data` (bytes-like) at `offset`; appended to the direct stream when it continues it."""
        data = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if self.direct and offset == self.written + self.fill:
            if self.stage is None:
                self.stage = aligned_empty((self.stage_bytes,), np.uint8, DIRECT_BLOCK)
            done = 0
            while done < data.size:
                n = min(data.size - done, self.stage.size - self.fill)
                self.stage[self.fill:self.fill + n] = data[done:done + n]
                self.fill += n
                done += n
                if self.fill == self.stage.size and not self._flush_blocks():
                    self._fall_back(direct_refused=True)
                    offset, data = offset + done, data[done:]  # the rest of this write goes buffered
                    break
            else:
                if self.written + self.fill >= self.size:
                    self._finish_direct()  # the whole file is streamed: its tail goes out now, the stage is freed
                return
        self._fall_back()
        _pwrite_all(self.fd, memoryview(data), offset)

    def _flush_blocks(self, pad: bool = False) -> bool:
        """Writes the staged whole blocks (with `pad`: all staged bytes, zero-padded to a block) directly and moves
        the remaining partial block to the front. False, with nothing written or moved, when the file system
        refuses the direct write (EINVAL: e.g. a device whose logical block exceeds DIRECT_BLOCK)."""
        n = self.fill if pad else self.fill // DIRECT_BLOCK * DIRECT_BLOCK
        n_write = -(-n // DIRECT_BLOCK) * DIRECT_BLOCK
        self.stage[n:n_write] = 0  # the padding (empty unless `pad`)
        if n_write:
            try:
                _pwrite_all(self.direct_fd, memoryview(self.stage[:n_write]), self.written)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                return False
        self.direct_bytes += n
        self.stage[:self.fill - n] = self.stage[n:self.fill]
        self.fill, self.written = self.fill - n, self.written + n_write
        return True

    def _finish_direct(self) -> None:
        """Writes the staged bytes (the last block zero-padded) and closes the direct descriptor."""
        if self.fill and not self._flush_blocks(pad=True):
            self._fall_back(direct_refused=True)
        if self.direct:
            os.close(self.direct_fd)
            self.direct_fd, self.stage = None, None

    def _fall_back(self, direct_refused: bool = False) -> None:
        """From here on buffered writes: staged whole blocks still go directly (unless the file system has just
        refused a direct write), the partial rest through the cache."""
        if not self.direct:
            return
        if not direct_refused and self.fill >= DIRECT_BLOCK:
            self._flush_blocks()  # a refusal leaves the blocks staged: they go buffered below
        fd, self.direct_fd = self.direct_fd, None
        try:
            if self.fill:
                _pwrite_all(self.fd, memoryview(self.stage[:self.fill]), self.written)
        finally:
            os.close(fd)
            self.stage, self.fill = None, 0

    def close(self) -> None:
        """Writes what is staged (the last block padded) and truncates the file to `size`; idempotent."""
        if self.fd < 0:
            return
        try:
            if self.direct:
                self._finish_direct()
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.fd = -1
