"""Fast per-tensor executor for streaming merges: cached fused kernels, a read-ahead thread, planned shards.

    groups = [TensorGroup(name, shape, out_dtype, read=..., params=P.resolve_for_tensor(...), key=...), ...]
    files = merge_to_shards(get_method("ties"), groups, out_dir, limit=parse_size("2GB"), load_dtype=None)

One output tensor y = cast_out(kernel(cast_f32(cast_load(b)), stack_i cast_f32(cast_load(x_i)), key, **params)).
`merge_tensor` is the only implementation of this per-tensor step: tree.merge / tree.merge_task call it too.
* the whole function (load casts, stack, kernel, output cast) is one `jax.jit` per (method, scalar parameters,
  load dtype, output dtype), compiled once per input shape/dtype and reused for every tensor with the same setting
  (`KernelCache`, least recently used functions dropped beyond `maxsize`); per-model parameter arrays and the
  scalars a method declares traceable (slerp's and nearswap's t, the task-vector methods' lambda) are traced
  arguments (`traced_parameters`: a depth gradient of them compiles once), other scalars baked in as constants
  (a gradient of one compiles once per distinct value), and a kernel that needs its arrays concrete gets them
  baked in as well;
* inputs are read by `PreadStore` (os.preadv of each tensor's bytes into a fresh buffer: no memory map, so file
  pages never count in the process's RSS, and the read releases the GIL) on a read-ahead thread (a pool of
  `READ_WORKERS_ACCELERATOR` on an accelerator), at most `prefetch` groups ahead of the one being merged, and
  moved to the device there (host -> device overlaps compute on an accelerator);
* the output layout is planned up front from the groups' names, shapes and dtypes (a new shard when the next
  tensor would push the current one past `limit` bytes), so every shard's header is written first and each
  result is written at its offset by a writer thread as soon as it is ready: no shard is ever held in memory
  (large shards with O_DIRECT through a small staging buffer: host_io.ShardFile);
* on the CPU, a tensor whose float32 inputs exceed `CHUNK_BYTES` is merged in blocks (MergeMethod.chunks: elementwise
  methods, and those whose tensor-global statistic, e.g. the TIES magnitude threshold, is computed block by
  block first), bit for bit as whole; its float32 temporaries then scale with the block, not the tensor.
Host memory: about (prefetch + 1) x the inputs of the largest group + (write_queue + 1) x the largest output,
plus the kernel's float32 temporaries (of one block for a blocked tensor).
"""
from __future__ import annotations

import collections
import contextlib
import concurrent.futures as cf
import dataclasses
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from configurable_fm.checks import is_real
from configurable_fm.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, read_index
from configurable_fm.ops.merge.host_io import (HOST_ALIGNMENT, IO_CHUNK, ShardFile,  # noqa: F401 (re-exported)
                                               aligned_empty)
from configurable_fm.ops.merge.registry import TASK_VECTOR_METHODS, MergeMethod
from configurable_fm.ops.merge.staging import StagingPool, host_empty

SAFETENSORS_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16), "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def is_float(dtype) -> bool:
    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


# --------------------------------------------------------------------------------------------------- reading
def _read_header(file: Path) -> tuple[dict, int]:
    """(header {name: {dtype, shape, data_offsets}}, offset of the data section) of one safetensors file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: too short for a safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read the safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has an unsupported entry {info!r}")
        begin, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        if end - begin != want or data_start + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} has offsets {begin}..{end} for {want} bytes in a file "
                                  f"of {size} bytes (truncated or corrupt)")
    return header, data_start


def _pread_into(fd: int, buf: np.ndarray, offset: int, what: str) -> None:
    view = memoryview(buf.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + IO_CHUNK]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{what}: unexpected end of file after {done} of {len(view)} bytes")
        done += n


class PreadStore(Mapping[str, np.ndarray]):
    """Read-only {tensor name: numpy array} over a safetensors file or a sharded HF directory, without mmap.

    `store[name]` reads the tensor's bytes with os.preadv into a new array (one copy from the page cache; the
    GIL is released during the read), 64-byte aligned (`aligned_empty`: put on the CPU device without a copy),
    or into the staging arena active on the calling thread (`staging.host_empty`: merge_groups on a GPU).
    Headers are parsed once; a tensor whose offsets do not fit its file raises CheckpointError naming the file and
    the tensor. `shape(name)` and `dtype(name)` read nothing.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            if (path / SINGLE_FILE).exists():  # before an index, as transformers (and TensorStore) look
                files, weight_map = [path / SINGLE_FILE], None
            elif (path / INDEX_FILE).exists():
                weight_map = read_index(path / INDEX_FILE)
                files = sorted({path / f for f in weight_map.values()})
            else:
                raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
        elif path.exists():
            files, weight_map = [path], None
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        self._entries: dict[str, tuple[Path, int, np.dtype, tuple]] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"index {path / INDEX_FILE} names a missing shard {file.name}")
            header, start = _read_header(file)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if weight_map is None or Path(path / weight_map.get(name, "")) == file:
                    self._entries[name] = (file, start + info["data_offsets"][0],
                                           SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise CheckpointError(f"{path}: the index lists tensors its shards lack: {missing[:10]}")
            self._entries = {k: self._entries[k] for k in weight_map}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            file, offset, dtype, shape = self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint") from None
        out = host_empty(shape, dtype)
        _pread_into(self._fd(file), out, offset, f"{file}: tensor {name!r}")
        return out

    def shape(self, name: str) -> tuple:
        return self._entries[name][3]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][2]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001: interpreter shutdown
            pass


# ------------------------------------------------------------------------------------------------- kernels
_PLAIN = (bool, int, float, str, type(None))


def _freeze(value: Any):
    """A hashable, exact stand-in for a resolved parameter value (numpy arrays by dtype, shape and values)."""
    if type(value) in _PLAIN:  # the common cases first: the checks below cost ~10 us a value (abstract classes)
        return (type(value).__name__, value)
    if type(value) is dict:
        return _freeze_map(value)
    if isinstance(value, jax.Array):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, tuple(value.reshape(-1).tolist()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, Mapping):
        return _freeze_map(value)
    if isinstance(value, np.generic):
        return ("np", value.dtype.str, value.item())
    return (type(value).__name__, value)


def _freeze_map(value: Mapping):
    return ("map", tuple(sorted((k, _freeze(v)) for k, v in value.items())))


def traced_parameters(method: MergeMethod, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The resolved parameters a compiled kernel takes as traced arguments rather than constants: the per-model
    float arrays (N,) (weights, densities) and the method's `traced_scalars` given as real numbers, as float32
    0-d arrays (the kernels convert them to float32 first, so the result is bit for bit the constant's). One
    compiled function then serves every value: a depth gradient compiles once per shape, not once per layer."""
    arrays = {k: v for k, v in params.items() if _is_param_array(v)}
    for name in method.traced_scalars:
        if is_real(params.get(name)):
            arrays[name] = np.asarray(params[name], np.float32)
    return arrays


def needs_baking(method: MergeMethod, params: Mapping[str, Any], xs: Sequence) -> bool:
    """Whether `method.bake` asks for these parameters as constants on tensors of xs[0]'s size."""
    return method.bake is not None and bool(xs) and method.bake(params, int(np.prod(np.shape(xs[0]), dtype=np.int64)))


_NEEDS_CONCRETE = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                   jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


CHUNK_BYTES = 8 << 20
"""A tensor whose float32 inputs (every input and the base, as the kernel stacks them) exceed this many bytes is
merged in blocks of at most this size when its method allows it (MergeMethod.chunks), with the same result bit
for bit: the kernel's float32 temporaries then scale with the block, not the tensor (a 1.1B llama's 65.5M-entry
embedding and head with 4 inputs: 1 GB of stacked inputs, several GB of temporaries for ties whole). On the CPU
the blocks are also faster (no fresh multi-GB buffers to fault in; a block's passes stay in cache): 8 MiB
measured best for ties there (4-32 MiB within 25%). KernelCache(chunk_bytes=None) merges every tensor whole, as
`_run` does on an accelerator."""


class KernelCache:
    """Jitted `fused(base, xs_tuple, key, arrays) -> y` per (method, parameters, load dtype, output dtype,
    compute dtype).

    fused: each input cast to `load_dtype` (floating inputs only; mergekit's load dtype) then to float32, the
    inputs stacked (N, *S), `method.kernel(b, xs, key=key, **params)` (plus `compute_dtype=` when it is not
    None: the kernel rounds as mergekit does in that dtype), the result cast to the output dtype.
    Scalar parameters (and strings, flags) are baked in as constants; the per-model parameter arrays (N,)
    (weights, densities: they change with depth under a gradient) and the method's `traced_scalars` are traced
    arguments (`traced_parameters`), so one compiled function serves every layer. A method whose kernel needs
    them concrete (tracing raises a concretization error) gets them baked in too, from then on. jit adds its
    own cache per input shapes/dtypes below that.
    Methods are told apart by identity (two methods of one name, e.g. a test's, never share a function); at
    most `maxsize` functions are kept (least recently used dropped: a long grid does not accumulate code).
    chunk_bytes: tensors whose float32 inputs exceed it are merged in blocks by the same function (`_run`,
    `_merge_by_rows`; default CHUNK_BYTES, None: always whole).
    """

    def __init__(self, maxsize: int = 256, chunk_bytes: Optional[int] = CHUNK_BYTES):
        self.maxsize = int(maxsize)
        self.chunk_bytes = None if chunk_bytes is None else int(chunk_bytes)
        self._fns: "collections.OrderedDict[tuple, tuple[MergeMethod, Callable]]" = collections.OrderedDict()
        self._concrete: dict[int, MergeMethod] = {}  # id -> method (held, so the id stays unique)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fns)

    def get(self, method: MergeMethod, params: Mapping[str, Any], load_dtype, out_dtype,
            compute_dtype: Optional[str] = None, *, bake: bool = False) -> Callable:
        """`call(base, xs_tuple, key) -> y` for this setting (compute_dtype: precision.py; None = float32).
        bake: the parameter arrays are constants of the function (also chosen per call where `method.bake` says
        a tensor needs it)."""
        params = dict(params)
        load_dtype = None if load_dtype is None else np.dtype(load_dtype)
        out_dtype = np.dtype(out_dtype)
        arrays = traced_parameters(method, params)
        with self._lock:
            traced = bool(arrays) and not bake and id(method) not in self._concrete
        if not traced:
            arrays = {}
        static = {k: v for k, v in params.items() if k not in arrays}
        key = (method.name, id(method), _freeze(static), tuple(sorted((k, v.dtype.str, v.shape)
                                                                      for k, v in arrays.items())),
               None if load_dtype is None else load_dtype.str, out_dtype.str, compute_dtype)
        with self._lock:
            entry = self._fns.get(key)
            if entry is None:  # the entry holds the method, so its id cannot be reused while cached
                entry = self._fns[key] = (method, _fused(method, static, load_dtype, out_dtype, compute_dtype,
                                                         chunk_bytes=self.chunk_bytes))
                while len(self._fns) > self.maxsize:
                    self._fns.popitem(last=False)
            else:
                self._fns.move_to_end(key)
        fn = entry[1]
        if not traced:
            return lambda b, xs, k: _run(fn, method, static, b, xs, k, {}, self.chunk_bytes, out_dtype)

        def call(b, xs, k):
            if needs_baking(method, params, xs):
                return self.get(method, params, load_dtype, out_dtype, compute_dtype, bake=True)(b, xs, k)
            try:
                return _run(fn, method, params, b, xs, k, arrays, self.chunk_bytes, out_dtype)
            except _NEEDS_CONCRETE:
                self.needs_concrete(method)
                return self.get(method, params, load_dtype, out_dtype, compute_dtype)(b, xs, k)

        return call


    def needs_concrete(self, method: MergeMethod) -> None:
        """From now on, `method`'s parameter arrays are baked in as constants (its kernel cannot trace them)."""
        with self._lock:
            self._concrete[id(method)] = method

    def get_batched(self, method: MergeMethod, params: Mapping[str, Any], load_dtype, out_dtype,
                    compute_dtype: Optional[str] = None, *, arrays_axis: bool = False) -> Optional[Callable]:
        """`call(bs, xss, keys, arrays) -> ys` over L same-shape tensors at once, one vmapped jitted call:
        bs (L, *S) or None, xss a tuple of N arrays (L, *S), keys (L,) PRNG keys or None, arrays {name: (L, N)}
        the per-tensor traced parameters stacked (`traced_parameters`: (L, N) per-model arrays, (L,) traced
        scalars; the tensors' other parameters must be equal: `params` gives them, its traced ones are ignored).
        y_l = fused(b_l, xs_l, key_l, arrays_l), as `get` computes it per tensor.
        None when the method needs its parameter arrays concrete (it cannot be vmapped over them)."""
        params = dict(params)
        load_dtype = None if load_dtype is None else np.dtype(load_dtype)
        out_dtype = np.dtype(out_dtype)
        arrays = sorted(traced_parameters(method, params))
        with self._lock:
            if id(method) in self._concrete:
                return None
        static = {k: v for k, v in params.items() if k not in arrays}
        key = ("batched", method.name, id(method), _freeze(static), tuple(arrays),
               None if load_dtype is None else load_dtype.str, out_dtype.str, compute_dtype)
        with self._lock:
            entry = self._fns.get(key)
            if entry is None:
                fused = _fused(method, static, load_dtype, out_dtype, compute_dtype, jit=False)  # whole tensors
                entry = self._fns[key] = (method, jax.jit(jax.vmap(fused)))
                while len(self._fns) > self.maxsize:
                    self._fns.popitem(last=False)
            else:
                self._fns.move_to_end(key)
        return entry[1]


def _fused(method: MergeMethod, static: dict, load_dtype, out_dtype, compute_dtype: Optional[str],
           jit: bool = True, chunk_bytes: Optional[int] = None) -> Callable:
    if compute_dtype is not None:
        static = dict(static, compute_dtype=compute_dtype)

    def load(x):
        if load_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(load_dtype)
        return x.astype(jnp.float32)

    def fused(b, xs, key, arrays, dtypes=None, whole=False):
        rows = None if whole else _chunk_rows(method, {**static, **arrays}, b, xs, chunk_bytes)
        if rows is not None:
            return _merge_by_rows(method, {**static, **arrays}, b, xs, key, rows, load, out_dtype, dtypes)
        stacked = (jnp.stack([load(x) for x in xs]) if xs  # no inputs (ram with a base alone): (0, *S)
                   else jnp.zeros((0, *jnp.shape(b)), jnp.float32))
        y = method.kernel(None if b is None else load(b), stacked, key=key, **static, **arrays)
        return jnp.asarray(y).astype(out_dtype)

    return jax.jit(fused, static_argnames=("dtypes", "whole")) if jit else fused


# ------------------------------------------------------------------------------------------------ row blocks
@dataclasses.dataclass(frozen=True)
class RowBlocks:
    """The blocks of rows (axis 0) a large tensor is merged in, as MergeMethod.chunks' statistic sees them (on
    the CPU the tensor is flattened first, `_run`: rows are then entries). `fold(fn, init)` runs acc = fn(acc,
    base block (float32, or None), inputs block (N, rows, ...) float32, first row) over the blocks in order
    (one compiled loop over the full blocks, then the shorter last one) and returns acc; `sample(entries)`
    gives (base, inputs) at every k-th row, about `entries` entries per input (every row if fewer), e.g. to
    estimate a quantile."""

    read: Callable  # (first row, rows) -> (base block or None, stacked inputs block)
    every: Callable  # (step) -> the same at rows 0, step, 2·step, ...
    shape: tuple
    rows: int  # rows per block
    n_inputs: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def row_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def fold(self, fn: Callable, init):
        full, tail = divmod(self.shape[0], self.rows)
        acc = jax.lax.fori_loop(0, full, lambda i, acc: fn(acc, *self.read(i * self.rows, self.rows),
                                                             i * self.rows), init)
        if tail:
            acc = fn(acc, *self.read(full * self.rows, tail), full * self.rows)
        return acc

    def sample(self, entries: int):
        return self.every(max(1, self.size // max(int(entries), 1)))  # rows: R / step · row size ≈ entries


def _chunk_rows(method: MergeMethod, params: Mapping[str, Any], b, xs, chunk_bytes: Optional[int]) -> Optional[int]:
    """Rows per block for this tensor, or None to merge it whole: tensors whose float32 inputs fit in
    chunk_bytes, methods without MergeMethod.chunks (or whose `accepts` refuses these parameters), 0-d and 1-row
    tensors, calls without inputs. Blocks hold at most chunk_bytes of float32 inputs (at least one row); a number
    of rows that divides the tensor's is preferred when one lies within half of that (no shorter last block)."""
    if chunk_bytes is None or method.chunks is None or not xs or (b is None and method.base == "required"):
        return None  # (a missing base: the whole-tensor kernel says so)
    shape = tuple(jnp.shape(xs[0]))
    if not shape or shape[0] < 2:
        return None
    per_row = 4 * int(np.prod(shape[1:], dtype=np.int64)) * (len(xs) + (b is not None))
    if per_row * shape[0] <= chunk_bytes or not method.chunks.accepts(params, shape):
        return None
    rows = max(1, min(shape[0] - 1, chunk_bytes // max(per_row, 1)))
    blocks = -(-shape[0] // rows)  # the fewest blocks; a divisor of the rows within half of `rows` if any
    return next((shape[0] // k for k in range(blocks, 2 * blocks + 1) if shape[0] % k == 0 and
                 shape[0] // k >= (rows + 1) // 2), rows)


def _uint(dtype) -> np.dtype:
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


def _bits(x):
    """x as unsigned integers of its width. XLA:CPU slices and updates those in place, whereas it rewrites a
    bfloat16 dynamic slice or update into a float32 one of the whole tensor (its float normalization), which
    then converts every input whole, outside the loop, and the output whole at every block."""
    return x if x.dtype == _uint(x.dtype) else jax.lax.bitcast_convert_type(x, _uint(x.dtype))


def _merge_by_rows(method: MergeMethod, params: dict, b, xs, key, rows: int, load: Callable, out_dtype,
                   dtypes=None):
    """The fused kernel over blocks of `rows` rows: the method's statistic (if any) over the whole tensor
    first (MergeMethod.chunks.statistic on RowBlocks), then each block merged (the kernel called with the
    statistic's arrays and `chunk_start`, the block's flat offset) and written into the output at its place:
    compiled loops over the inputs' bits (`_bits`). dtypes: None, or (base's dtype, inputs' dtypes) when b and
    xs are given as their bits already (`_run`: a free view on the CPU); the result is then the output's bits."""
    shape = tuple(jnp.shape(xs[0]))
    row_size = int(np.prod(shape[1:], dtype=np.int64))
    b_dtype, x_dtypes = dtypes if dtypes is not None else (None if b is None else b.dtype, [x.dtype for x in xs])

    def block(x, dtype, first, n):
        return load(jax.lax.bitcast_convert_type(jax.lax.dynamic_slice_in_dim(_bits(x), first, n, axis=0), dtype))

    def read(first, n):
        return ((None if b is None else block(b, b_dtype, first, n)),
                jnp.stack([block(x, dt, first, n) for x, dt in zip(xs, x_dtypes)]))

    def every(step):
        def rows_of(x, dtype):
            return load(jax.lax.bitcast_convert_type(_bits(x)[::step], dtype))

        return ((None if b is None else rows_of(b, b_dtype)),
                jnp.stack([rows_of(x, dt) for x, dt in zip(xs, x_dtypes)]))

    blocks = RowBlocks(read, every, shape, rows, len(xs))
    statistic = method.chunks.statistic
    extra = {} if statistic is None else dict(statistic(blocks, **params))

    def merge(out, bb, xb, first):
        kw = params if statistic is None else dict(params, **extra, chunk_start=first * row_size)
        y = jnp.asarray(method.kernel(bb, xb, key=key, **kw)).astype(out_dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, _bits(y), first, axis=0)

    out = blocks.fold(merge, jnp.zeros(shape, _uint(out_dtype)))
    return out if dtypes is not None else jax.lax.bitcast_convert_type(out, out_dtype)


def _host_bits(x):
    """x's bits, flattened, as a jax array on its CPU device without a copy (a numpy view of the buffer put
    back; numpy inputs are put on the default device), or None: x is on an accelerator, traced, or 8 bytes wide
    (jax without x64 would narrow those integers)."""
    dtype = np.dtype(x.dtype)
    if dtype.itemsize > 4 or isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array):
        devices = x.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return None
        return jax.device_put(np.asarray(x).view(_uint(dtype)).reshape(-1), next(iter(devices)))
    if jax.default_backend() != "cpu":
        return None
    return jax.device_put(np.ascontiguousarray(x).view(_uint(dtype)).reshape(-1))


def _on_accelerator(x) -> bool:
    """x is an array that a kernel would run on an accelerator: a jax array on a non-CPU device, or a host array
    or a tracer (an enclosing jit, e.g. tree.merge jitted by the caller) while jax's default backend is not the
    CPU."""
    if isinstance(x, jax.core.Tracer):
        return jax.default_backend() != "cpu"
    if isinstance(x, jax.Array):
        return any(d.platform != "cpu" for d in x.devices())
    return jax.default_backend() != "cpu"


def _run(fn: Callable, method: MergeMethod, params: Mapping[str, Any], b, xs, key, arrays, chunk_bytes, out_dtype):
    """fn(b, xs, key, arrays) (a `_fused` function). A tensor merged in blocks on the CPU gets its inputs as bit
    views (`_host_bits`), flattened (tensors of one size share a compiled function: MergeMethod.chunks' kernels
    are elementwise but for their statistic), and its result viewed back: no input or output is copied whole.
    On an accelerator tensors are merged whole: its memory holds them, and blocks there are a loop of small
    kernels (on an H200 the per-tensor kernels of a 1.1B model were 3-4x slower with them: BENCHMARKS.md)."""
    if _chunk_rows(method, params, b, xs, chunk_bytes) is None:
        return fn(b, xs, key, arrays)
    if _on_accelerator(xs[0]):
        return fn(b, xs, key, arrays, whole=True)
    views = [None if a is None else _host_bits(a) for a in [b, *xs]]
    if any(v is None for v, a in zip(views, [b, *xs]) if a is not None):
        return fn(b, xs, key, arrays)
    dtypes = (None if b is None else np.dtype(b.dtype), tuple(np.dtype(x.dtype) for x in xs))
    bits = fn(views[0], tuple(views[1:]), key, arrays, dtypes=dtypes)
    shape = tuple(jnp.shape(xs[0]))
    return jax.device_put(np.asarray(bits).view(np.dtype(out_dtype)).reshape(shape), next(iter(bits.devices())))


DEFAULT_CACHE = KernelCache()


def output_dtype(stored_dtype, load_dtype=None, out_dtype=None, float32_result: bool = False) -> np.dtype:
    """The dtype stream/tree write for a tensor stored as `stored_dtype`: integer/bool tensors keep theirs;
    floating ones take out_dtype, else float32 when `float32_result` (a method whose mergekit code returns
    float32 from reduced-precision arithmetic: `MergeMethod.result_dtype`, with a reduced compute dtype), else
    the load dtype, else their own, as jax computes it (float64 is float32 unless jax_enable_x64)."""
    stored_dtype = np.dtype(stored_dtype)
    if not is_float(stored_dtype):
        return stored_dtype
    want = (out_dtype if out_dtype is not None else np.float32 if float32_result
            else load_dtype if load_dtype is not None else stored_dtype)
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(want)))


def dtypes_for(method: MergeMethod, stored: Sequence, *, load_dtype=None, out_dtype=None,
               compute_dtype: Optional[str] = None) -> tuple[np.dtype, Optional[str]]:
    """(output dtype, compute dtype) of one tensor whose inputs are stored as `stored` (the reference first):
    the compute dtype by precision.resolve(compute_dtype, load_dtype, stored) (floating tensors only), the
    output dtype by output_dtype (float32 for a method whose mergekit code returns float32 from reduced
    arithmetic, when no out_dtype is given)."""
    from configurable_fm.ops.merge.precision import resolve

    compute = resolve(compute_dtype, load_dtype, stored) if is_float(stored[0]) else None
    return output_dtype(stored[0], load_dtype, out_dtype,
                        float32_result=compute is not None and method.result_dtype == "float32"), compute


def copy_integer(name: str, values: Sequence[Any], names: Sequence[str]):
    """An integer/bool tensor is copied (unchanged, the first value itself) only when every input has the same
    one; else MergeInputError naming the tensor and the inputs that differ from the first."""
    from configurable_fm.ops.merge.tree import MergeInputError

    ref = np.asarray(values[0])
    different = [nm for nm, v in zip(names[1:], values[1:]) if not np.array_equal(np.asarray(v), ref)]
    if different:
        raise MergeInputError(f"{name} is a {ref.dtype} tensor (copied, never merged) but differs between "
                              f"{names[0]} and {', '.join(different)}")
    return values[0]


def unchanged_from_base(method: MergeMethod, base, inputs: Sequence) -> bool:
    """True when `method` is a task-vector method (registry.TASK_VECTOR_METHODS: y = b + f(x_i - b), f(0) = 0) and
    every input equals the base: the same array object, or host (numpy) arrays equal entry for entry with the
    base's shape and dtype. Device arrays that are distinct objects are not compared (that would cost a device
    computation and a transfer): the streaming executor's inputs are host arrays on the CPU and device arrays on
    an accelerator, where every tensor goes through its kernel."""
    if base is None or method.name not in TASK_VECTOR_METHODS or not inputs:
        return False
    if all(x is base for x in inputs):
        return True
    return isinstance(base, np.ndarray) and all(_host_equal(x, base) for x in inputs)


def _host_equal(x, base: np.ndarray, head: int = 256) -> bool:
    """np.array_equal(x, base) for a numpy x of base's shape and dtype, its first `head` entries compared first: a
    fine-tuned tensor differs there already, so the merge's hot path does not pay a full pass over its inputs."""
    return (isinstance(x, np.ndarray) and x.shape == base.shape and x.dtype == base.dtype
            and np.array_equal(x.flat[:head], base.flat[:head]) and np.array_equal(x, base))


def merge_tensor(method: MergeMethod, base, inputs: Sequence, params: Mapping[str, Any], *, out_dtype,
                 load_dtype=None, key: Optional[jax.Array] = None, name: str = "<tensor>",
                 input_names: Optional[Sequence[str]] = None, cache: Optional[KernelCache] = None,
                 compute_dtype: Optional[str] = None):
    """One output tensor: the per-tensor step of tree.merge, tree.merge_task and the streaming executor.

    base: the base's tensor (S) or None (no base, or the method ignores it; pass None then); inputs: the other
    models' tensors, each (S), numpy or jax, stored dtype (cast to `load_dtype` inside the jitted function);
    params: the kernel's resolved keyword arguments (params.resolve_for_tensor); key: tensor_key(seed, name) for
    randomised methods. Floating tensors: y = kernel(f32(b), stack_i f32(x_i) (N, *S), key, **params) cast to
    `out_dtype`, a jax array (dispatched asynchronously); errors of the kernel name the method and the tensor.
    compute_dtype: None (float32 arithmetic) or 'float16' | 'bfloat16', passed to the kernel, which then rounds
    as mergekit does in that dtype (precision.py; precision.resolve picks it per tensor).
    Integer/bool tensors: returned unchanged (`copy_integer`) when identical in every input (base included),
    else MergeInputError; input_names: names of the base (when given) and the inputs, for that message.
    A task-vector method whose inputs all equal the base (`unchanged_from_base`), in float32 arithmetic without a
    load cast and with one entry per input in every per-model parameter array (else the kernel runs and names the
    error), returns f32(b) + 0 cast to `out_dtype` without calling the kernel: the kernel's result, bit for bit.
    """
    ref = base if base is not None else inputs[0]
    if not is_float(ref.dtype):
        values = ([base] if base is not None else []) + list(inputs)
        names = list(input_names) if input_names is not None else (
            (["base"] if base is not None else []) + [f"model_{i}" for i in range(len(inputs))])
        return copy_integer(name, values, names)
    if compute_dtype is not None:  # the inputs are rounded to the compute dtype first, as mergekit loads them
        load_dtype = np.dtype(jnp.dtype(compute_dtype))
    if load_dtype is not None and all(np.dtype(x.dtype) == np.dtype(load_dtype)
                                      for x in ([base] if base is not None else []) + list(inputs)):
        load_dtype = None  # the cast is a no-op: share the function of uncast inputs
    if (compute_dtype is None and load_dtype is None and unchanged_from_base(method, base, inputs)
            and all(len(v) == len(inputs) for v in params.values() if _is_param_array(v))):
        # every task vector is zero: the kernel's y = f32(b) + 0, bit for bit (-0.0 in b becomes +0.0 there too)
        # without running it (a tensor the fine-tunes never touched, e.g. a frozen embedding)
        y = np.asarray(base, np.float32) + np.float32(0) if isinstance(base, np.ndarray) else \
            jnp.asarray(base, jnp.float32) + jnp.float32(0)
        return jnp.asarray(y).astype(out_dtype)
    fn = (cache if cache is not None else DEFAULT_CACHE).get(method, params, load_dtype, out_dtype, compute_dtype)
    try:
        return fn(base, tuple(inputs), key)
    except (ValueError, TypeError) as e:
        try:
            err = type(e)(f"merge {method.name}: tensor {name}: {e}")
        except Exception:  # noqa: BLE001: an exception type that takes other arguments: keep the original
            raise e from None
        raise err from e


def _is_param_array(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim == 1


def merge_stacked(method: MergeMethod, base, inputs: Sequence, params: Sequence[Mapping[str, Any]], *, out_dtype,
                  load_dtype=None, keys: Optional[jax.Array] = None, names: Optional[Sequence[str]] = None,
                  cache: Optional[KernelCache] = None, compute_dtype: Optional[str] = None):
    """L same-shape floating tensors merged in one vmapped call: y (L, *S), y[l] = merge_tensor's result for
    tensor l (same kernel, same arithmetic).

    base: (L, *S) or None; inputs: N arrays (L, *S) (model i's L tensors, stacked); params: L resolved parameter
    mappings, equal in every parameter but the traced ones (a ValueError names the tensors that differ), those
    (`traced_parameters`: per-model arrays (N,), traced scalars) stacked to (L, N) / (L,) and vmapped (a depth
    gradient batches too); keys: (L,) keys for randomised methods.
    One dispatch for the L tensors instead of L: on an accelerator the per-call cost of `merge_tensor` (about
    0.17 ms on an H200) dominates the traffic of a layer's tensor. A method whose kernel needs its parameter
    arrays concrete runs tensor by tensor (merge_tensor) and the results are stacked.
    """
    params = [dict(p) for p in params]
    n = len(params)
    names = list(names) if names is not None else [f"<tensor {i}>" for i in range(n)]
    if n == 0 or len(names) != n:
        raise ValueError(f"merge_stacked: {n} parameter sets for {len(names)} names")
    ref = base if base is not None else inputs[0]
    if ref.shape[0] != n or any(x.shape != ref.shape for x in inputs):
        raise ValueError(f"merge_stacked: inputs {[tuple(x.shape) for x in inputs]} are not all ({n}, ...) "
                         f"stacks of one shape")
    traced = [traced_parameters(method, p) for p in params]
    untraced = [{k: v for k, v in p.items() if k not in t} for p, t in zip(params, traced)]
    static = untraced[0]
    frozen = _freeze(static)
    for name, other in zip(names[1:], untraced[1:]):
        if _freeze(other) != frozen:
            raise ValueError(f"merge_stacked: {names[0]} and {name} have different scalar parameters "
                             f"({static} vs {other}): batch only tensors that share them")
    if compute_dtype is not None:
        load_dtype = np.dtype(jnp.dtype(compute_dtype))
    if load_dtype is not None and all(np.dtype(x.dtype) == np.dtype(load_dtype)
                                      for x in ([base] if base is not None else []) + list(inputs)):
        load_dtype = None
    cache = cache if cache is not None else DEFAULT_CACHE
    bake = any(needs_baking(method, p, [x[0] for x in inputs]) for p in params)
    fn = None if bake else cache.get_batched(method, params[0], load_dtype, out_dtype, compute_dtype)
    if fn is not None:
        arrays = {k: np.stack([t[k] for t in traced]) for k in traced[0]}
        try:
            return fn(base, tuple(inputs), keys, arrays)
        except _NEEDS_CONCRETE:
            cache.needs_concrete(method)
    return jnp.stack([merge_tensor(method, None if base is None else base[i], [x[i] for x in inputs], params[i],
                                   out_dtype=out_dtype, load_dtype=load_dtype,
                                   key=None if keys is None else keys[i], name=names[i], cache=cache,
                                   compute_dtype=compute_dtype) for i in range(n)])


# ------------------------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """Everything needed for one output tensor; `read()` -> (base array or None, [input arrays]) is called on
    the read-ahead thread (so it should do the file reads, e.g. PreadStore lookups). out_dtype: the planned
    output dtype (output_dtype(...)); input_names: the base's (when read() gives one) and the inputs' names,
    for messages; compute_dtype: None (float32 arithmetic) or 'float16' | 'bfloat16' (precision.resolve)."""

    name: str
    shape: tuple
    out_dtype: np.dtype
    read: Callable[[], tuple[Optional[np.ndarray], Sequence[np.ndarray]]]
    params: Mapping[str, Any]
    key: Optional[jax.Array] = None
    input_names: Optional[Sequence[str]] = None
    compute_dtype: Optional[str] = None


class Timers:
    """Busy seconds per stage (summed over threads; stages overlap, so the sum exceeds the wall time)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.bytes[stage] = self.bytes.get(stage, 0) + nbytes

    def summary(self) -> dict:
        return {k: {"s": round(v, 3), "GB": round(self.bytes.get(k, 0) / 1e9, 3)} for k, v in self.seconds.items()}


class Progress:
    """A tqdm bar over the output tensors, its postfix the bytes read and written so far; `update` is called
    by the writer thread after each tensor is written (tqdm serialises its own output)."""

    def __init__(self, total: int, desc: str, total_bytes: Optional[int] = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tensor", desc=desc)
        self.read = self.written = 0
        self.total_bytes = total_bytes
        self._lock = threading.Lock()

    def update(self, name: str, read_bytes: int, written_bytes: int) -> None:
        with self._lock:
            self.read += read_bytes
            self.written += written_bytes
            of = f"/{self.total_bytes / 1e9:.2f}" if self.total_bytes else ""
            self.bar.set_postfix_str(f"read {self.read / 1e9:.2f} GB, written {self.written / 1e9:.2f}{of} GB",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _read_ahead(items: Iterable, load: Callable[[Any], Any], depth: int, workers: int = 1) -> Iterator:
    """Yields load(item) for every item, in order; `load` runs on a pool of `workers` threads (several at once:
    reads and host -> device copies of different items overlap) at most max(depth, workers) items ahead of the one
    the caller holds; exceptions are re-raised here, in order, and no load starts after one has failed (the items
    after it are never reached). Leaving the loop early cancels the loads not yet started (those running finish)."""
    depth = max(int(depth), int(workers), 1)
    pool = cf.ThreadPoolExecutor(int(workers), thread_name_prefix="merge-read-ahead")
    pending: collections.deque = collections.deque()
    failed = threading.Event()

    def guarded(item):  # loads start in item order, so a skipped one comes after the failure the caller sees
        if failed.is_set():
            raise RuntimeError("read-ahead skipped after an earlier load failed")
        try:
            return load(item)
        except BaseException:
            failed.set()
            raise

    try:
        for item in items:
            pending.append(pool.submit(guarded, item))
            if len(pending) > depth:  # `depth` loads submitted beyond the one the caller is given
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


READ_WORKERS_ACCELERATOR = 4
"""Groups read at once when the kernels run on an accelerator (merge_groups' default there; 1 on the CPU, where
the 2-core machine's memory goal allows one group ahead): each worker reads its group's inputs and copies them
to the device, so file reads and host -> device copies of different groups overlap."""


def merge_groups(method: MergeMethod, groups: Iterable[TensorGroup], *, load_dtype=None, prefetch: int = 1,
                 device: Optional[jax.Device] = None, timers: Optional[Timers] = None,
                 cache: Optional[KernelCache] = None, read_workers: Optional[int] = None,
                 staging: Optional[bool] = None) -> Iterator[tuple[str, Any, int]]:
    """Yields (name, y, bytes read) for every group, in order; y is computed (a jax array, or the input itself
    for a copied integer tensor) and its inputs released before it is yielded.

    `read_workers` threads (default: 1 on the CPU, READ_WORKERS_ACCELERATOR on an accelerator) run
    `group.read()` up to max(prefetch, read_workers) groups ahead and put floating inputs on `device` (default:
    jax's default device); the caller's thread runs the cached fused kernel (merge_tensor) and, on an
    accelerator, starts each result's copy to the host (the writer thread waits for it).
    `staging` (default: on for an accelerator, off on the CPU): each worker reads its group into its own reused
    host buffer, page-locked on a CUDA device, and copies it to the device from there (staging.py).
    """
    device = device or jax.devices()[0]
    if read_workers is None:
        read_workers = 1 if device.platform == "cpu" else READ_WORKERS_ACCELERATOR
    if int(read_workers) < 1:
        raise ValueError(f"read_workers must be at least 1, got {read_workers!r}")
    pool = StagingPool(device) if (device.platform != "cpu" if staging is None else staging) else None

    def load(g: TensorGroup):
        with pool.arena() if pool is not None else contextlib.nullcontext():
            return _load_group(g, device, timers, staged=pool is not None)

    try:
        yield from _merge_loaded(method, _read_ahead(groups, load, prefetch, read_workers), device, timers, cache,
                                 load_dtype)
    finally:
        if pool is not None:
            pool.close()


def _load_group(g: TensorGroup, device, timers: Optional[Timers], staged: bool):
    """(g, base, inputs, bytes read): `g.read()`, floating inputs put on `device`, one at a time (each host array is
    dropped once its copy is made, so the group is held about once, not twice). `staged`: the host arrays may be
    views of the thread's staging arena, which the thread's next group overwrites: device copies complete before
    this returns, and arrays that could share the arena's memory are copied out of it first (host arrays kept as
    they are; every array on the CPU, whose client adopts aligned host memory and ignores may_alias=False)."""
    t0 = time.perf_counter()
    b, xs = g.read()
    t1 = time.perf_counter()
    has_base = b is not None
    arrays = ([b] if has_base else []) + list(xs)
    del b, xs
    nbytes = sum(int(np.asarray(a).nbytes) if not isinstance(a, jax.Array) else int(a.nbytes) for a in arrays)
    if all(is_float(a.dtype) for a in arrays):
        for i, a in enumerate(arrays):
            if staged and device.platform == "cpu" and not isinstance(a, jax.Array):
                a = np.array(a, copy=True)
            arrays[i] = jax.device_put(a, device)
            del a
            jax.block_until_ready(arrays[i])
    elif staged:
        arrays = [a if isinstance(a, jax.Array) else np.array(a, copy=True) for a in arrays]
    b, xs = (arrays[0], arrays[1:]) if has_base else (None, arrays)
    if timers is not None:
        timers.add("read", t1 - t0, nbytes)
        timers.add("to_device", time.perf_counter() - t1, nbytes)
    return g, b, list(xs), nbytes


def _merge_loaded(method: MergeMethod, loaded: Iterable, device, timers: Optional[Timers],
                  cache: Optional[KernelCache], load_dtype) -> Iterator[tuple[str, Any, int]]:
    for g, b, xs, nbytes in loaded:
        t0 = time.perf_counter()
        y = merge_tensor(method, b, xs, g.params, out_dtype=g.out_dtype, load_dtype=load_dtype, key=g.key,
                         name=g.name, input_names=g.input_names, cache=cache, compute_dtype=g.compute_dtype)
        if isinstance(y, jax.Array):
            if device.platform != "cpu":
                y.copy_to_host_async()  # the device -> host copy starts now, overlapping the next group's merge
            y = jax.block_until_ready(y)  # the inputs can go now: memory stays at the read-ahead's bound
        del b, xs
        if timers is not None:
            timers.add("compute", time.perf_counter() - t0)
        yield g.name, y, nbytes


# --------------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class _Shard:
    file: str
    header: bytes
    offsets: dict  # name -> absolute byte offset of its data in the file
    size: int  # total file size


def plan_shards(specs: Sequence[tuple[str, tuple, Any]], limit: int,
                metadata: Optional[Mapping[str, str]] = None) -> list[_Shard]:
    """Shards for (name, shape, dtype) specs in order: a new shard when the next tensor would push the current
    one past `limit` bytes (a tensor larger than `limit` gets a shard of its own). Names: model.safetensors for
    one shard, else model-0000k-of-0000n.safetensors. Each header is the safetensors JSON, space-padded to 8 bytes."""
    groups: list[list[tuple[str, tuple, np.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, tuple(int(s) for s in shape), np.dtype(dtype)))
        size += nbytes
    n = len(groups)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shards = []
    for file, group in zip(files, groups):
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        pos = 0
        rel = {}
        for name, shape, dtype in group:
            if dtype not in _CODES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            rel[name] = pos
            pos += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        shards.append(_Shard(file, len(text).to_bytes(8, "little") + text,
                             {k: start + v for k, v in rel.items()}, start + pos))
    return shards


class PlannedShardWriter:
    """Writes planned shards (plan_shards): headers first, then each tensor at its offset from a writer thread.

    add(name, y, read_bytes) queues y (numpy or a dispatched jax array; at most `queue_size` waiting); the writer
    thread waits for it, moves it to the host, checks shape and dtype against the plan, writes it at its offset
    (host_io.ShardFile; `direct`: O_DIRECT past the page cache, by default for shards of at least 64 MiB) and calls
    `on_written(name, read_bytes, bytes written)` when given (e.g. Progress.update). finish() waits
    for every write, checks that every planned tensor was written once, writes the index (several shards) and
    returns the file names. Errors from the writer thread are raised by the next add() or by finish().
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Sequence[tuple[str, tuple, Any]], limit: int, *,
                 queue_size: int = 2, timers: Optional[Timers] = None,
                 on_written: Optional[Callable[[str, int, int], None]] = None, direct: Optional[bool] = None):
        self.out_dir = Path(out_dir)
        self.specs = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype in specs}
        if len(self.specs) != len(specs):
            raise ValueError("PlannedShardWriter: duplicate tensor names in the plan")
        self.shards = plan_shards(specs, limit)
        self.where = {name: (i, off) for i, s in enumerate(self.shards) for name, off in s.offsets.items()}
        self.files = [ShardFile(self.out_dir / s.file, s.size, direct=direct) for s in self.shards]
        for s, f in zip(self.shards, self.files):
            f.write_at(0, s.header)
        self.written: set[str] = set()
        self.timers = timers
        self.on_written = on_written
        self.error: Optional[BaseException] = None
        self.q: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            name, y, read_bytes = item
            try:
                t0 = time.perf_counter()
                arr = np.asarray(jax.block_until_ready(y)) if isinstance(y, jax.Array) else np.asarray(y)
                t1 = time.perf_counter()
                shape, dtype = self.specs[name]
                if arr.shape != shape or arr.dtype != dtype:
                    raise ValueError(f"tensor {name}: result is {arr.shape} {arr.dtype}, planned {shape} {dtype}")
                shard, offset = self.where[name]
                self.files[shard].write_at(offset, np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
                if self.timers is not None:
                    self.timers.add("compute_wait", t1 - t0)
                    self.timers.add("write", time.perf_counter() - t1, arr.nbytes)
                if self.on_written is not None:
                    self.on_written(name, read_bytes, arr.nbytes)
            except BaseException as e:  # noqa: BLE001: re-raised in the caller's thread
                self.error = e

    def add(self, name: str, y, read_bytes: int = 0) -> None:
        if self.error is not None:
            self.close()
            raise self.error
        if name not in self.specs:
            raise KeyError(f"tensor {name!r} is not in the shard plan")
        if name in self.written:
            raise ValueError(f"tensor {name!r} was already written")
        self.written.add(name)
        self.q.put((name, y, read_bytes))

    def close(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        for f in self.files:
            f.close()

    def finish(self) -> list[str]:
        self.close()
        if self.error is not None:
            raise self.error
        missing = [n for n in self.specs if n not in self.written]
        if missing:
            raise ValueError(f"PlannedShardWriter: {len(missing)} planned tensor(s) never written: {missing[:10]}")
        names = [s.file for s in self.shards]
        if len(self.shards) > 1:
            weight_map = {name: s.file for s in self.shards for name in s.offsets}
            total = sum(s.size - len(s.header) for s in self.shards)
            index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            names.append(INDEX_FILE)
        return names


def merge_to_shards(method: MergeMethod, groups: Sequence[TensorGroup], out_dir: str | os.PathLike, *, limit: int,
                    load_dtype=None, prefetch: int = 1, write_queue: int = 2, device: Optional[jax.Device] = None,
                    timers: Optional[Timers] = None, cache: Optional[KernelCache] = None,
                    progress: Optional[Callable[[str, int, int], None]] = None,
                    read_workers: Optional[int] = None, staging: Optional[bool] = None) -> list[str]:
    """Merges every group and writes the results as planned safetensors shards in `out_dir` (an existing,
    preferably temporary directory: on error the partial files stay there); returns the file names written.
    progress(name, bytes read, bytes written) is called from the writer thread after each tensor;
    read_workers, staging: merge_groups'."""
    writer = PlannedShardWriter(out_dir, [(g.name, g.shape, g.out_dtype) for g in groups], limit,
                                queue_size=write_queue, timers=timers, on_written=progress)
    try:
        for name, y, nbytes in merge_groups(method, groups, load_dtype=load_dtype, prefetch=prefetch,
                                            device=device, timers=timers, cache=cache,
                                            read_workers=read_workers, staging=staging):
            writer.add(name, y, nbytes)
    except BaseException:
        writer.close()
        raise
    return writer.finish()
