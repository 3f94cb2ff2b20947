"""Input handling shared by the whole-model merges (tree.py, fisher.py, regmean.py): models given as a list or a
{name: model} mapping of nnx modules or flat {path: array} dicts, per-model weights, float32 copies, tensors that are
copied rather than merged."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.merge.tree import MergeInputError, as_flat


def float32_tree(tree):
    """The pytree with its floating leaves cast to float32 (other leaves as they are)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def names_and_flats(models, what: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(names, flat dicts) of a list (named model_0, model_1, ...) or {name: model} mapping of models."""
    if isinstance(models, Mapping):
        names, models = [str(k) for k in models], list(models.values())
    else:
        models = list(models)
        names = [f"model_{i}" for i in range(len(models))]
    if not models:
        raise ValueError(f"{what}: no models given")
    return names, [as_flat(m, f"model {n!r}") for m, n in zip(models, names)]


def model_weights(weights, n: int, what: str) -> np.ndarray:
    """Per-model weights (N,) float64: ones when None; finite, >= 0, with a positive sum."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"{what}: {w.size} weights for {n} models")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{what}: weights must be finite, >= 0 and not all 0, got {list(w)}")
    return w


def copy_exact(path, values, names):
    """An integer/bool tensor: copied when identical in every model, else an error."""
    different = [nm for nm, v in zip(names[1:], values[1:]) if not np.array_equal(np.asarray(v),
                                                                                   np.asarray(values[0]))]
    if different:
        raise MergeInputError(f"{path} is a {np.asarray(values[0]).dtype} tensor (copied, never merged) but "
                              f"differs between {names[0]} and {', '.join(different)}")
    return values[0]
