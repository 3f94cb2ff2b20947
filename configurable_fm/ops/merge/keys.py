"""PRNG keys for randomised merges, derived from (seed, tensor path, model index).

A key depends only on what it names, never on the order in which tensors or models are visited:

    path_key  = wrap(blake2b_64(f"{seed}\\x00{path}"))       # threefry2x32 key from 2 little-endian uint32 words
    model_key = fold_in(path_key, model_index)                # model_index: position of the input in `xs`

so a merge run twice, streamed in another order, sharded differently or restarted half-way draws the same masks.
Kernels receive `path_key` as `key=` and fold in the model index themselves (`model_keys`), hence
`model_keys(tensor_key(seed, path), n)[i] == tensor_key(seed, path, i)`.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.checks import is_int


def _path_words(seed: int, path: str) -> np.ndarray:
    if not is_int(seed):
        raise TypeError(f"tensor_key: seed must be an int, got {type(seed).__name__} {seed!r}")
    if not isinstance(path, str):
        raise TypeError(f"tensor_key: path must be a str, got {type(path).__name__} {path!r}")
    digest = hashlib.blake2b(f"{int(seed)}\x00{path}".encode("utf-8"), digest_size=8).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.uint32)


def tensor_key(seed: int, path: str, model_index: int | None = None) -> jax.Array:
    """A typed threefry PRNG key for tensor `path` (and input `model_index`) under `seed`.

    The path is hashed with blake2b (stable across processes, platforms and Python versions, unlike `hash`);
    `model_index` (an int >= 0, the input's position in `xs`) is folded in with `jax.random.fold_in`.
    """
    key = jax.random.wrap_key_data(jnp.asarray(_path_words(seed, path)), impl="threefry2x32")
    if model_index is None:
        return key
    if not is_int(model_index) or model_index < 0:
        raise ValueError(f"tensor_key: model_index must be an int >= 0, got {model_index!r} (tensor {path!r})")
    return jax.random.fold_in(key, int(model_index))


@functools.partial(jax.jit, static_argnums=1)
def model_keys(key: jax.Array, n: int) -> jax.Array:
    """The n per-input keys `fold_in(key, i)`, i = 0..n-1, stacked (jit-able; `key` typed or raw uint32[2])."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
