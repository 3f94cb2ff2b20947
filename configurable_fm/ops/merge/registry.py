"""The table of merge methods: how each is called, which inputs and parameters it takes.

A method is a per-tensor kernel

    kernel(base, xs, *, key, **params) -> y
        base: the base model's tensor (shape S) or None when the method ignores/omits it
        xs:   the other inputs stacked, (N, *S) (mergekit's order of `models:` minus the base)
        key:  a jax PRNG key for randomised methods (derived from (seed, tensor path, ...)), else None
        params: per-model parameters as float32 arrays (N,) and shared parameters as Python scalars
        y:    the merged tensor (S), float32 (the caller casts to the output dtype)

Kernels are pure and jit-able (parameters that change control flow are static); tree-level functions and
the streaming executor call them tensor by tensor.

Every kernel also takes `compute_dtype` (None: float32 arithmetic; 'float16' | 'bfloat16': mergekit's rounding
in that dtype, see precision.py); the executor passes it only when it is not None. `result_dtype` says what
mergekit returns for float16/bfloat16 inputs when the config sets no `out_dtype`: "compute" (the inputs' dtype)
or "float32" (arcee_fusion and ramplus_tl promote to float32 inside).

`chunks` says whether a large tensor may be merged in blocks instead of in one call, with the same result bit
for bit (execute.py does it above its byte threshold, CHUNK_BYTES, to bound the float32 temporaries): None
(the default) means never; see `RowChunks`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping, Optional

BaseUse = Literal["required", "optional", "ignored"]
REQUIRED = object()  # a parameter default meaning "must be given"


def _always(params: Mapping[str, Any], shape: tuple) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class RowChunks:
    """How a kernel runs over blocks of a tensor, giving the whole-tensor result bit for bit.

    The kernel must be elementwise apart from its statistic: entry i of the result depends on entry i of the
    inputs (across the models) alone, whatever the shape it is given; the executor merges blocks of rows
    (axis 0), on the CPU of the flattened tensor (execute.RowBlocks).
    statistic: None when that is all; otherwise `statistic(blocks, **params) -> {name: array}` computes the
      tensor-global quantities the kernel needs (e.g. each task vector's magnitude threshold) over the whole
      tensor, block by block: `blocks.fold(fn, init)` runs `acc = fn(acc, base_block (float32 or None),
      xs_block (N, rows, ...) float32, first_row)` over the blocks in order, `blocks.sample(entries)` gives
      every k-th row; `blocks.size`, `blocks.row_size`, `blocks.n_inputs` describe the tensor. The kernel is
      then called once per block with those arrays and `chunk_start` (the flat index of the block's first
      entry) added to its parameters.
    accepts(params, shape) -> bool: False when these parameters (static ones; per-model arrays may be traced)
      or this shape need the whole tensor at once (e.g. an l1 rescale: a global norm).
    """

    statistic: Optional[Callable[..., Mapping[str, Any]]] = None
    accepts: Callable[[Mapping[str, Any], tuple], bool] = _always


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Callable[..., Any]
    base: BaseUse
    min_inputs: int = 1  # non-base inputs
    max_inputs: int | None = None
    per_model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name -> default (or REQUIRED)
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    randomized: bool = False
    doc: str = ""
    result_dtype: Literal["compute", "float32"] = "compute"
    chunks: Optional[RowChunks] = None
    # bake(params, size) -> True when these resolved parameters, on a tensor of `size` entries, must reach the
    # kernel as constants rather than traced float32 arrays (execute.KernelCache): where a traced count would
    # differ from mergekit's int(d·n) in double precision, or a check on the values would be skipped
    bake: Optional[Callable[[Mapping[str, Any], int], bool]] = None
    # shared real-valued parameters the kernel takes as traced float32 scalars (it converts them to float32 before
    # any arithmetic and never branches on them in Python), so one compiled function serves every value: a depth
    # gradient (slerp's t over the layers) compiles once per tensor shape, not once per layer
    traced_scalars: tuple[str, ...] = ()


METHODS: dict[str, MergeMethod] = {}

# The task-vector methods: y = b + f(x_1 - b, ..., x_N - b) with f(0, ..., 0) = 0 (their kernels see only the
# differences), so they merge deltas as well as models (deltas.merge_deltas) and give the base, y = b + 0, where
# every input equals it (execute.merge_tensor then skips the kernel).
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                       "della_linear", "della", "sce")


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    from configurable_fm.ops.merge import methods  # noqa: F401  (importing registers every method)

    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {sorted(METHODS)}") from None
