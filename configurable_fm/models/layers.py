"""Small building blocks shared by every model family.

Every parameter is an `nnx.Param` whose metadata `out_sharding` holds its *logical* axis names
(`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `experts`, ...). `configurable_fm.sharding` maps them
onto mesh axes through one rules table; nothing here needs a mesh (eager sharding is off per variable).

Shapes: `x_BxTxD` is batch x time x model width; a kernel is `(in, out)` (Flax convention, the transpose
of torch's `nn.Linear.weight`).

Every module's `__call__` is `@tapped` (models/taps.py): its input and output are the tap points
`<path>.input` and `<path>.output` of configurable_fm.analysis (capture and intervention); free otherwise.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.models.one_token import matmul
from configurable_fm.models.taps import active as taps_active, tapped

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A parameter that carries its logical axis names (one per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def normal(rngs: nnx.Rngs, shape: Sequence[int], dtype, std: float = 0.02) -> jax.Array:
    return std * jax.random.normal(rngs.params(), tuple(shape), dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: (in, out) with logical axes `axes`."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None, std: float = 0.02):
        self.kernel = param(normal(rngs, (in_features, out_features), param_dtype, std), axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[-1:]) if use_bias else None
        self.dtype = dtype

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = matmul(x.astype(dtype), kernel.astype(dtype))  # jnp.dot, or a one-token kernel (models/one_token.py)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


_FUSE_PROJECTIONS: contextvars.ContextVar[bool] = contextvars.ContextVar("configurable_fm_fuse_projections",
                                                                         default=False)


@contextlib.contextmanager
def fuse_projections(enabled: bool = True) -> Iterator[None]:
    """Forwards traced inside the block run the projections that share an input (llama's q/k/v, gate/up) as one
    matmul each (`project`, `fused_linears`). `models.generation` enters it for models on one device; a model
    whose kernels are split over devices keeps them apart (the fused output would be resharded at every step).
    The flag is read while tracing and is not part of jax.jit's cache key: enter it inside the jitted function
    (a function traced once outside the block keeps its unfused program, and the other way round)."""
    token = _FUSE_PROJECTIONS.set(bool(enabled))
    try:
        yield
    finally:
        _FUSE_PROJECTIONS.reset(token)


def project(linears: Sequence[nnx.Module], x: jax.Array) -> list[jax.Array]:
    """[m(x) for m in linears]: one call each, or `fused_linears` inside a `fuse_projections()` block."""
    return fused_linears(linears, x) if _FUSE_PROJECTIONS.get() else [m(x) for m in linears]


def fused_linears(linears: Sequence[nnx.Module], x: jax.Array) -> list[jax.Array]:
    """[m(x) for m in linears] as one matmul: x @ [K_1 | K_2 | ...] (+ [b_1 | b_2 | ...]), split back by columns.

    Taken when every module is a plain `Linear` (its exact type: adapters and other subclasses compute more than
    x @ K + b), all share one compute dtype and bias presence, and no tap context is active (each Linear's input
    and output are tap points); otherwise each module is called in turn. The same products column by column: one
    kernel where a batch-1 decode step on an H200 runs 2.3-3.8 us reduction kernels per projection (BENCHMARKS,
    the decode profile). The concatenation is `matmul`'s: XLA fuses it into the product's reduction or hoists it
    out of a decode loop as loop-invariant (checked in the compiled CPU program of `generate`), and the one-token
    kernels read each K_i in place (a concatenated copy written every step cost 7.9 us per layer at the 1B shape
    on an H100: not hoisted there once the product was a custom call).
    Shapes: x (..., D_in); kernel i (D_in, D_i); out i (..., D_i).
    """
    plain = all(type(m) is Linear for m in linears) and not taps_active()
    if plain:
        dtypes = {m.dtype or jnp.result_type(x, m.kernel[...]) for m in linears}
        plain = len(dtypes) == 1 and len({m.bias is None for m in linears}) == 1
    if not plain or len(linears) < 2:
        return [m(x) for m in linears]
    (dtype,) = dtypes
    y = matmul(x.astype(dtype), [m.kernel[...].astype(dtype) for m in linears])  # x @ [K_1 | K_2 | ...]
    if linears[0].bias is not None:
        y = y + jnp.concatenate([m.bias[...].astype(dtype) for m in linears])
    splits = np.cumsum([m.kernel.shape[1] for m in linears])[:-1]
    return jnp.split(y, splits, axis=-1)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed). `attend` gives tied output logits without sharing a Variable."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=None, axes: Axes = ("vocab", "embed"), std: float = 0.02):
        self.embedding = param(normal(rngs, (num_embeddings, features), param_dtype, std), axes)
        self.dtype = dtype

    @tapped
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(self.dtype or table.dtype)

    def attend(self, x_BxTxD: jax.Array) -> jax.Array:
        table = self.embedding[...]
        dtype = self.dtype or jnp.result_type(x_BxTxD, table)
        return jnp.einsum("btd,vd->btv", x_BxTxD.astype(dtype), table.astype(dtype))


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as transformers does)."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.weight = param(jnp.ones((features,), param_dtype), ("norm",))
        self.eps = eps

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, computed in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.weight = param(jnp.ones((features,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((features,), param_dtype), ("norm",))
        self.eps = eps

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class CausalLM(nnx.Module):
    """The call shared by decoder families, which define `hidden_states(ids, ...) -> (h, cache)` and `logits(h)`.

    `model(ids_BxT)` -> logits (B, T, V); with `cache=` -> (logits, new cache).
    """

    @tapped
    def __call__(self, ids_BxT, *, attention_mask=None, positions=None, cache=None):
        h, new_cache = self.hidden_states(ids_BxT, attention_mask=attention_mask, positions=positions, cache=cache)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None
