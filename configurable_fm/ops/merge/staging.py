"""Page-locked host staging for the streaming merge's host -> device copies.

Measured on one H200 (2026-12-04, BENCHMARKS.md, "GPU end to end: page-locked staging"; scripts/bench_transfer.py
measures the same): `jax.device_put` of a pageable numpy array moves 4.6-4.7 GB/s per thread, the same array
registered with the CUDA driver (cuMemHostRegister) 27-43 GB/s (24-128 MiB arrays): the copy becomes one DMA.
Reading a tensor from the page cache into memory already touched is also faster than into fresh pages (5.4-6.9
against 3.3-5.3 GB/s, one thread). In a whole merge the reads and copies got ~25% faster; end to end the gain is
within the run-to-run spread, because the kernels' stage and the writer are the bound there now.

So every read worker of `execute.merge_groups` owns one `StagingArena`: one page-aligned host buffer, registered
with the driver once where that is possible, that a tensor group's reads land in and are copied from:

    with pool.arena():                  # this thread's arena becomes the active one
        b, xs = group.read()            # PreadStore allocates through host_empty(): views of the arena
        y = device_put(b, dev) ...; block_until_ready(...)
    # leaving the block resets the arena: the next group's reads overwrite it

`host_empty(shape, dtype)` returns memory of the arena active on the calling thread, or a fresh aligned buffer
(`host_io.aligned_empty`) when none is active or the arena is full. An arena that overflowed grows, when its
group is done, to what the group asked for (at most `max_bytes`), so it holds the largest group after the
first one that size. Arrays that outlive the block must not share the arena's memory: host arrays (e.g. integer
tensors merged as copies) are copied out first, and so is everything put on a CPU device (jax's CPU client adopts
aligned host memory, and jax 0.10 does so even with may_alias=False); a GPU copy never aliases host memory.

Registration (ctypes, the driver's libcuda.so.1; no CUDA toolkit needed): the device's primary context,
CU_MEMHOSTREGISTER_PORTABLE; unregistered when the pool closes, after waiting for any arena still in use. Where
registration is impossible (no libcuda, another accelerator, an error) the arena stays ordinary reused memory.
On the CPU the merge does not stage: jax adopts an aligned host buffer there without copying it.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from configurable_fm.ops.merge.host_io import DIRECT_BLOCK, aligned_empty

LOG = logging.getLogger(__name__)

STAGING_MAX_BYTES = 2 << 30  # one arena never grows past this (a larger group reads its overflow into fresh memory)
_GROW_QUANTUM = 16 << 20  # arena sizes are rounded up to this, so small differences between groups do not regrow
_ACTIVE = threading.local()  # .arena: the StagingArena active on this thread, if any


def host_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised host array for a read: a view of the staging arena active on this thread when it has room,
    else `aligned_empty(shape, dtype)` (module docstring)."""
    arena = getattr(_ACTIVE, "arena", None)
    if arena is not None:
        out = arena.take(shape, dtype)
        if out is not None:
            return out
    return aligned_empty(shape, dtype)


class CudaHostRegistry:
    """Registers host buffers with the CUDA driver (page-locked, portable over contexts) through libcuda.so.1.

    `CudaHostRegistry.open(ordinal)` returns None where the driver cannot be loaded or initialised. `register(buf)`
    returns whether the buffer is now page-locked; `unregister(buf)` undoes it; `close()` releases the primary
    context retained by `open`."""

    PORTABLE = 0x01  # CU_MEMHOSTREGISTER_PORTABLE

    def __init__(self, lib, device: int, context: ctypes.c_void_p):
        self._lib, self._device, self._context = lib, device, context

    @classmethod
    def open(cls, ordinal: int) -> Optional["CudaHostRegistry"]:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return None
        try:
            lib.cuInit.argtypes = [ctypes.c_uint]
            lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
            lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
            lib.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
            lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
            lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        except AttributeError:  # not a CUDA driver
            return None
        device, context = ctypes.c_int(), ctypes.c_void_p()
        if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(device), int(ordinal)) or \
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device):
            return None
        return cls(lib, device.value, context)

    @contextlib.contextmanager
    def _current(self):
        if self._lib.cuCtxPushCurrent_v2(self._context):
            raise OSError("cuCtxPushCurrent failed")
        try:
            yield
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def register(self, buf: np.ndarray) -> bool:
        try:
            with self._current():
                rc = self._lib.cuMemHostRegister_v2(buf.ctypes.data, buf.nbytes, self.PORTABLE)
        except OSError:
            return False
        if rc:
            LOG.debug("cuMemHostRegister of %d bytes failed (CUresult %d); staging in pageable memory",
                      buf.nbytes, rc)
        return rc == 0

    def unregister(self, buf: np.ndarray) -> None:
        with contextlib.suppress(OSError), self._current():
            self._lib.cuMemHostUnregister(buf.ctypes.data)

    def close(self) -> None:
        self._lib.cuDevicePrimaryCtxRelease_v2(self._device)


class StagingArena:
    """One worker's staging buffer: `take` hands out aligned views of it in order until it is full; `active()`
    makes it the calling thread's arena for `host_empty` and resets (and, after an overflow, grows) it on exit."""

    ALIGN = DIRECT_BLOCK  # every view starts on a 4 KiB boundary

    def __init__(self, registry: Optional[CudaHostRegistry] = None, max_bytes: int = STAGING_MAX_BYTES):
        self._registry, self.max_bytes = registry, int(max_bytes)
        self._buf: Optional[np.ndarray] = None
        self.registered = False
        self._used = self._asked = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.nbytes

    def take(self, shape: Sequence[int], dtype) -> Optional[np.ndarray]:
        """A view of `shape`/`dtype` in the arena, or None when it does not fit (what was asked is remembered)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        span = -(-max(nbytes, 1) // self.ALIGN) * self.ALIGN
        self._asked += span
        if self._buf is None or self._used + span > self._buf.nbytes:
            return None
        out = self._buf[self._used:self._used + nbytes].view(dtype).reshape(tuple(shape))
        self._used += span
        return out

    @contextlib.contextmanager
    def active(self) -> Iterator["StagingArena"]:
        with self._lock:
            if self._closed:  # the pool closed under a late read: that read uses fresh memory
                yield self
                return
            previous = getattr(_ACTIVE, "arena", None)
            _ACTIVE.arena = self
            try:
                yield self
            finally:
                _ACTIVE.arena = previous
                self._reset()

    def _reset(self) -> None:
        asked, self._used, self._asked = self._asked, 0, 0
        if asked <= self.capacity or self.capacity >= self.max_bytes:
            return
        self._release()
        size = min(-(-asked // _GROW_QUANTUM) * _GROW_QUANTUM, self.max_bytes)
        self._buf = aligned_empty((size,), np.uint8, self.ALIGN)
        self._buf[::4096] = 0  # touch every page now, not during a timed read
        self.registered = self._registry is not None and self._registry.register(self._buf)

    def _release(self) -> None:
        if self._buf is not None and self.registered:
            self._registry.unregister(self._buf)
        self._buf, self.registered = None, False

    def close(self) -> None:
        with self._lock:  # waits for a read that is using the arena
            self._closed = True
            self._release()


class StagingPool:
    """One StagingArena per calling thread (`arena()`), registered with the CUDA driver of `device` when
    possible; `close()` waits for arenas in use and unregisters them all. Use as a context manager."""

    def __init__(self, device=None, max_bytes: int = STAGING_MAX_BYTES):
        self._registry = None
        if device is not None and getattr(device, "platform", "") == "gpu":
            self._registry = CudaHostRegistry.open(getattr(device, "local_hardware_id", None) or 0)
        self.max_bytes = max_bytes
        self._arenas: dict[int, StagingArena] = {}
        self._lock = threading.Lock()

    @property
    def pinned(self) -> bool:
        """Whether buffers are page-locked (the CUDA driver was found)."""
        return self._registry is not None

    def arena(self):
        """The calling thread's arena, active for the `with` block (StagingArena.active)."""
        with self._lock:
            arena = self._arenas.setdefault(threading.get_ident(), StagingArena(self._registry, self.max_bytes))
        return arena.active()

    def close(self) -> None:
        with self._lock:
            arenas = list(self._arenas.values())
        for a in arenas:
            a.close()
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def __enter__(self) -> "StagingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
