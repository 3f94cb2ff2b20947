"""What the growth operators share: the llama check at the boundary, the PRNG key check, init statistics.

    cfg = llama_config(model, "grow_width")     # ConfigError unless a consistent llama-family model
    k = prng.path_key(key, "layers.3.mlp.up_proj.kernel", "noise")   # depends on (key, path, purpose) only
"""
from __future__ import annotations

import numpy as np

from configurable_fm.checks import is_real
from configurable_fm.errors import ConfigError
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import check_consistent, extension_specs
from configurable_fm.prng import as_key, numpy_generator

# The family's initialiser (models.layers.normal): what freshly built kernels are drawn from.
INIT_STD = 0.02


class GrowthError(ConfigError):
    """A growth target or option that the operator cannot honour; the message says which and why."""


def llama_config(model, op: str) -> LlamaConfig:
    """`model.cfg` when `model` is a llama-family model whose tree agrees with its config; GrowthError naming the
    problem otherwise (models.InconsistentModel for a tree that disagrees with its config)."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, LlamaConfig):
        raise GrowthError(f"{op}: needs a llama-family model (model.cfg a LlamaConfig); got {type(model).__name__} "
                          f"with cfg {type(cfg).__name__}")
    check_consistent(model, op)
    specs = extension_specs(model)
    if specs:
        raise GrowthError(f"{op}: the model has extension modules ({', '.join(s['path'] for s in specs)}) whose "
                          "parameters no growth rule covers; merge or remove them first")
    return cfg


def check_key(key, op: str, why: str):
    """`key` as a typed PRNG key (prng.as_key: a typed key, raw uint32[2] key data or an int seed); GrowthError saying
    what needs it (`why`) when it is None or something else."""
    return as_key(key, GrowthError, op, f"{why} needs a PRNG key: pass key=jax.random.key(seed)")


def normal(key, shape, dtype=np.float32) -> np.ndarray:
    """Standard normal numpy samples of `shape` driven by the jax PRNG `key` (a numpy Generator seeded with the
    key's data): deterministic in the key, and no XLA compilation per shape."""
    return numpy_generator(key).standard_normal(tuple(shape)).astype(dtype)


def fresh(path: str, shape, dtype, key) -> np.ndarray:
    """A newly built model's value for the parameter at `path`: unit norm gains (paths ending in `norm.weight`),
    zero biases, N(0, INIT_STD^2) kernels and embeddings drawn from `key` (numpy, of `dtype`)."""
    shape = tuple(shape)
    if path.endswith("norm.weight"):
        return np.ones(shape, dtype)
    if path.endswith(".bias"):
        return np.zeros(shape, dtype)
    return (INIT_STD * normal(key, shape)).astype(dtype)


def permutation(key, n: int) -> np.ndarray:
    """A random permutation of range(n) driven by the jax PRNG `key`."""
    return numpy_generator(key).permutation(n)


def check_fraction(value, name: str, op: str, *, low_open: bool = False) -> float:
    if not is_real(value):
        raise GrowthError(f"{op}: {name} must be a number in {'(0' if low_open else '[0'}, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value if low_open else 0.0 <= value) or value > 1.0 or np.isnan(value):
        raise GrowthError(f"{op}: {name}={value} must lie in {'(0' if low_open else '[0'}, 1]")
    return value
