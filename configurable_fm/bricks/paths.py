"""Dotted paths for every parameter of a model: `layers.3.mlp.down_proj.kernel`.

A model's parameters as a flat, ordered `{path: array}` dict is the plain-data view that checkpoint
interop, merging and brick sets all work on. `flat_params(model)` reads it; `with_params(model, flat)`
returns a new model with some of it replaced (the input model is left untouched).
"""
from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx


def path_str(path: tuple) -> str:
    """('layers', 3, 'mlp', 'kernel') -> 'layers.3.mlp.kernel'."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def flat_state(model_or_state, filter=nnx.Param) -> dict[str, nnx.Variable]:
    """{dotted path: Variable} for the variables matching `filter` (default: parameters)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, filter)
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def flat_params(model_or_state) -> dict[str, jax.Array]:
    """{dotted path: array} of every parameter, in the model's own order."""
    return {k: v.get_value() for k, v in flat_state(model_or_state).items()}


def param_count(model_or_state) -> int:
    return sum(int(v.size) for v in flat_params(model_or_state).values())


def with_params(model: nnx.Module, new: Mapping[str, jax.Array], *, check_shapes: bool = True) -> nnx.Module:
    """A new model equal to `model` except for the parameters named in `new` (a functional update).

    The new model holds new Variables (the unchanged ones hold the input's immutable arrays), so writing into it in
    place (an optimizer step, `var[...] = x`) never reaches `model`. Raises KeyError naming the unknown paths, and
    ValueError listing shape mismatches.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    by_path = {path_str(p): i for i, (p, _) in enumerate(flat)}
    unknown = sorted(set(new) - set(by_path))
    if unknown:
        raise KeyError(f"no parameter at path(s) {unknown}; the model has e.g. {list(by_path)[:5]}")
    items = list(flat)
    problems = []
    for key, value in new.items():
        p, var = items[by_path[key]]
        if check_shapes and tuple(value.shape) != tuple(var.shape):
            problems.append(f"{key} is {tuple(var.shape)} in the model but {tuple(value.shape)} in the update")
            continue
        items[by_path[key]] = (p, var.replace(value))
    if problems:
        raise ValueError("shape mismatch: " + "; ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(items), rest, copy=True)  # no Variable shared with `model`
