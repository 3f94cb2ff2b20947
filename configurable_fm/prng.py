"""PRNG keys for the operators that draw at random (growth, MoEfication): a user's key checked once at the boundary,
then one key per (tensor path, purpose), so a draw depends only on what it names, never on the order in which
tensors are visited (DESIGN.md, principle 7).

    key = as_key(key, GrowthError, "grow_width", "noise=0.1 needs a PRNG key: pass key=jax.random.key(seed)")
    k = path_key(key, "layers.3.mlp.up_proj.kernel", "noise")     # fold_in(key, crc32(path + '/' + purpose))
    x = numpy_generator(k).standard_normal((64, 32))              # numpy draws driven by k: no XLA compilation

(The merge methods' keys come from an int seed and a path instead: ops/merge/keys.py.)
"""
from __future__ import annotations

import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.checks import is_int


def as_key(key, error: Callable[[str], Exception], op: str, missing: str) -> jax.Array:
    """`key` as a typed PRNG key: a typed scalar key as is, raw uint32[2] key data wrapped, an int used as a seed
    (jax.random.key(seed)). Raises error(f"{op}: {missing}") when `key` is None (`missing` says what needs the key
    and how to pass it) and error(...) naming what was given for anything else (a bool is not a seed)."""
    if key is None:
        raise error(f"{op}: {missing}")
    if is_int(key):
        return jax.random.key(int(key))
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and getattr(key, "shape", None) == ():
        return key
    if dtype is not None and jnp.issubdtype(dtype, np.uint32) and tuple(key.shape) == (2,):
        return jax.random.wrap_key_data(jnp.asarray(key))
    shape = getattr(key, "shape", None)
    raise error(f"{op}: key must be a PRNG key (jax.random.key(seed)), raw key data uint32[2] or an int seed; got "
                f"{type(key).__name__}{'' if shape is None else f' {tuple(shape)}'}")


def path_key(key: jax.Array, path: str, purpose: str = "") -> jax.Array:
    """The key of one tensor and purpose: fold_in(key, crc32(path + '/' + purpose)); crc32 is stable across
    processes and Python versions (unlike hash)."""
    return jax.random.fold_in(key, np.uint32(zlib.crc32(f"{path}/{purpose}".encode())))


def numpy_generator(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded with the key's data: deterministic in the key, and no XLA program per shape drawn."""
    return np.random.default_rng([int(w) for w in np.asarray(jax.random.key_data(key)).ravel()])
