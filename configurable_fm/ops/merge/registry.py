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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

BaseUse = Literal["required", "optional", "ignored"]
REQUIRED = object()  # a parameter default meaning "must be given"


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


METHODS: dict[str, MergeMethod] = {}


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
