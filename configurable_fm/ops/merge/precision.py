"""Merge arithmetic in a reduced precision, as mergekit 0.1.5 does it (its YAML's `dtype:`).

mergekit casts every input to the config's `dtype` (or, without one, keeps the stored dtype) and runs each merge
method's torch code on those tensors, so a float16 or bfloat16 merge rounds after every operation. The kernels
here compute in float32 by default (`compute_dtype=None`): the inputs are cast up, the method runs in float32, and
the result is rounded once at the end. Given `compute_dtype="float16"` or `"bfloat16"`, a kernel reproduces
mergekit's rounding instead:

* values are still held in float32 arrays, but rounded to the compute dtype wherever mergekit's torch code
  produces a float16/bfloat16 tensor: `Arithmetic.r(x)`;
* torch's CPU kernels evaluate an elementwise op on float16/bfloat16 tensors in float32 ("opmath") and round the
  result once, so the torch op `a ∘ b` is `r(a ∘ b)` here (a and b already representable, the float32 result is
  the exact IEEE one for + − × ÷ and sqrt);
* reductions (`sum`, `mean`, `norm`) accumulate in float32 and round once at the end: `r(Σ ...)`;
* a Python scalar s in such an op enters as float32 (opmath), not rounded to the compute dtype:
  `r(a · f32(s))`; a tensor built from Python numbers (`torch.tensor(weights, dtype=...)`) is rounded:
  `Arithmetic.const`; a scalar compared with (`<`) or clamped against a reduced tensor is rounded to its dtype
  first; a float32 0-dim tensor is cast to the reduced dtype when it is the left operand of an op with a reduced
  tensor, and enters unrounded as the right one;
* XLA rewrites a division by a broadcast operand into a multiplication by the reciprocal (two roundings):
  divisions go through `Arithmetic.div`, which keeps the quotient correctly rounded; and it contracts a float32
  x · y + z into a fused multiply-add (or not) on its own terms: `Arithmetic.mul` keeps a product rounded on its own
  (torch's `a * x + b * y`, slerp), `Arithmetic.fma` rounds x · y + z once (torch's `addcmul_`, linear);
* where mergekit itself computes in float32 (linear, slerp: they upcast), the kernel ignores the compute dtype.

Rounding is round-to-nearest-even, float16 subnormals kept (`jax.lax.reduce_precision` flushes them, so values
below 2^-14 are rounded on the 2^-24 grid explicitly), overflow to ±inf. XLA may keep float32 excess precision
across a chain of float16 ops (it removes convert pairs), which is why the rounding is explicit
(`reduce_precision` and a rounding on the subnormal grid are never simplified away).

What stays different from mergekit (documented, measured in tests/ops/merge/test_reduced_precision.py):
transcendental functions (acos, sin, exp, log) come from XLA's float32 implementations rather than torch's, so a
result that lands within one float32 ulp of a rounding boundary of the compute dtype can round the other way;
sums of many terms are accumulated in a different order (float32, so this matters only where the float32 sums
differ); ties in magnitude, far more common in float16 than in float32, are ordered as in the float32 path
(lower flat index first) where torch's unstable sort orders them arbitrarily above 16 elements.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
MODES = ("mergekit",) + COMPUTE_DTYPES  # what cfm-merge --compute_dtype takes
_FORMATS = {"float16": (5, 10, 2.0 ** -14, 2.0 ** 24), "bfloat16": (8, 7, None, None)}


def compute_dtype_name(dtype) -> Optional[str]:
    """'float16' | 'bfloat16' for a reduced compute dtype, None for float32 arithmetic (None, 'float32', float32,
    float64: float64 inputs are computed in float32 by the kernels, as jax does without x64)."""
    if dtype is None:
        return None
    try:
        d = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}") from None
    if d == np.dtype(np.float16):
        return "float16"
    if d == np.dtype(ml_dtypes.bfloat16):
        return "bfloat16"
    if d in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}")


def resolve(mode, load_dtype, stored_dtypes) -> Optional[str]:
    """The compute dtype of one tensor: `mode` None | 'float32' (float32 arithmetic), 'float16' | 'bfloat16'
    (that dtype), or 'mergekit' (mergekit 0.1.5's rule: the config's `dtype` when given (`load_dtype`), else the
    inputs' stored dtype when they share one; inputs of different float dtypes are promoted by torch, to float32
    for float16 with bfloat16). Returns 'float16' | 'bfloat16', or None for float32 arithmetic."""
    if mode is None or mode == "float32":
        return None
    if mode != "mergekit":
        name = compute_dtype_name(mode)
        if name is None:
            raise ValueError(f"compute dtype must be 'mergekit' or one of {COMPUTE_DTYPES}, got {mode!r}")
        return name
    if load_dtype is not None:
        return compute_dtype_name(load_dtype)
    stored = {np.dtype(d) for d in stored_dtypes}
    return compute_dtype_name(stored.pop()) if len(stored) == 1 else None


def round_to(x: jax.Array, dtype: str) -> jax.Array:
    """float32 x rounded to the nearest `dtype` value ('float16' | 'bfloat16'), kept as float32."""
    exponent_bits, mantissa_bits, smallest_normal, inv_ulp = _FORMATS[dtype]
    y = jax.lax.reduce_precision(x, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)
    if smallest_normal is None:
        return y
    sub = jnp.round(x * inv_ulp) * (1.0 / inv_ulp)  # float16 subnormals: multiples of 2^-24, half to even
    return jnp.where(jnp.abs(x) < smallest_normal, sub, y)


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """How a kernel rounds: `dtype` None (float32 arithmetic: r is the identity) or 'float16' | 'bfloat16'."""

    dtype: Optional[str] = None

    @staticmethod
    def of(compute_dtype) -> "Arithmetic":
        return Arithmetic(compute_dtype_name(compute_dtype))

    @property
    def reduced(self) -> bool:
        return self.dtype is not None

    def r(self, x):
        """x (float32) rounded to the compute dtype: the result of one torch op in that dtype."""
        x = jnp.asarray(x, jnp.float32)
        return x if self.dtype is None else round_to(x, self.dtype)

    def div(self, x, y):
        """x / y as torch computes it: the correctly rounded float32 quotient (then r() as for any op). XLA rewrites a
        division by a broadcast operand (a norm per row, a scalar, a constant) into a multiplication by the
        reciprocal, which rounds twice; in the reduced mode the divisor is materialised at the result's shape
        behind an optimization barrier, which XLA does not look through. Float32 arithmetic keeps the plain
        division (and so its results as before). Not rounded: wrap in r() where torch rounds."""
        if self.dtype is None:
            return x / y
        shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y))
        y = jnp.broadcast_to(jnp.asarray(y, jnp.float32), shape)
        return jnp.broadcast_to(x, shape) / jax.lax.optimization_barrier(y)

    def mul(self, x, y):
        """x · y rounded to float32 on its own, as torch computes a product before adding it (XLA would contract
        x · y + z into one fused multiply-add, rounding once). In the reduced mode the product sits behind an
        optimization barrier; float32 arithmetic keeps the plain product (and so its results as before)."""
        return x * y if self.dtype is None else jax.lax.optimization_barrier(x * y)

    def fma(self, x, y, z):
        """x · y + z rounded once to float32, as torch's `addcmul_` (a fused multiply-add on the CPU). JAX has no
        fma and XLA contracts only some of the chain's terms, so in the reduced mode it is computed in float64
        (exact for a float16/bfloat16 x times a float32 y; the float64 sum rounded to float32). Float32 arithmetic
        keeps x · y + z as XLA compiles it."""
        if self.dtype is None:
            return x * y + z
        with jax.enable_x64(True):
            d = jnp.float64
            return (jnp.asarray(x, jnp.float32).astype(d) * jnp.asarray(y, jnp.float32).astype(d)
                    + jnp.asarray(z, jnp.float32).astype(d)).astype(jnp.float32)

    def const(self, value):
        """A tensor made from Python numbers in the compute dtype (`torch.tensor(v, dtype=...)`): concrete values
        are rounded from double precision, traced ones (already float32) from float32."""
        if self.dtype is None:
            return jnp.asarray(value, jnp.float32)
        if isinstance(value, jax.core.Tracer):
            return self.r(value)
        target = np.float16 if self.dtype == "float16" else ml_dtypes.bfloat16
        return jnp.asarray(np.asarray(value, np.float64).astype(target).astype(np.float32))
