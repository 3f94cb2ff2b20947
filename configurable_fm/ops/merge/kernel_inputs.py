"""Input handling shared by the per-tensor merge kernels (geometric.py, selective.py): float32 casts and the
trace-time checks of (base (S), xs (N, *S)) that name the method and the offending input."""
from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def as_f32(x) -> jax.Array:
    """x as a float32 jax array."""
    return jnp.asarray(x).astype(F32)


def check_kernel_inputs(name: str, base, xs, *, base_use: str, n_min: int, n_max: int | None = None):
    """Shape checks at trace time (static shapes); messages name the method and the offending input."""
    if xs.ndim < 1:
        raise ValueError(f"{name}: xs must be stacked (N, *S), got shape {xs.shape}")
    n = xs.shape[0]
    if n < n_min or (n_max is not None and n > n_max):
        want = f"exactly {n_min}" if n_min == n_max else f"at least {n_min}" if n_max is None else f"{n_min}..{n_max}"
        raise ValueError(f"{name}: needs {want} non-base input(s), got {n}")
    if base_use == "required" and base is None:
        raise ValueError(f"{name}: needs a base tensor")
    if base is not None and base_use != "ignored" and tuple(base.shape) != tuple(xs.shape[1:]):
        raise ValueError(f"{name}: base has shape {tuple(base.shape)} but the inputs have {tuple(xs.shape[1:])}")
