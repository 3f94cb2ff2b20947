"""Interventions: what the model uses instead of the value at a tap point.

    out = intervene(model, {"layers.3.mlp.hidden": mask([5, 17])}, ids)              # zero MLP neurons 5 and 17
    out = intervene(model, {"layers.2.output": add(v, positions=-1)}, ids)           # steer the last token
    _, clean = capture(model, ["layers.*.output"], clean_ids)
    out = intervene(model, {"layers.4.output": patch_from(clean, positions=[3])}, corrupted_ids)   # causal tracing

For a value x at a point whose leading axes are (B, T), and the selected tokens S (`positions`; all when None):
    replace(r):     x'[b, t] = r[b, t] for (b, t) in S (r broadcast to x's shape), x[b, t] elsewhere
    add(v):         x'[b, t] = x[b, t] + v for (b, t) in S (v broadcasts against x[b, t], e.g. (D,))
    mask(j):        x'[b, t, ..., j] = 0 for (b, t) in S and the chosen features j of the last axis
    patch_from(c):  x'[b, t] = c[point][b, t] for (b, t) in S  (c: {point: value} captured from another run)
positions: None (every token); an int or a sequence of ints (those t in every row, negative from the end; a
1-D integer array may be traced); or a boolean array broadcastable to (B, T) (per-row choices, e.g.
`jnp.arange(T) == subject_end[:, None]`). Without positions, replace/add/mask apply to values of any shape.

All are `jnp.where` and arithmetic on traced values: jit-able and differentiable (for add, d x'/d v is 1 on S,
which editing's value optimisation uses). Results keep the point's dtype. A plain function `fn(value) -> value`
is an intervention too. The classes are pytrees (arrays are their leaves), so interventions can be arguments of
jitted functions (reduce_over passes them so).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.analysis.taps import Intervention, TapError
from configurable_fm.checks import is_int


def _concrete_ints(x) -> np.ndarray | None:
    """x as a 1-D numpy integer array when it is a concrete int, sequence of ints or integer array, else None."""
    if isinstance(x, (bool, np.bool_)):
        return None
    if isinstance(x, (int, np.integer)):
        return np.asarray([x], np.int64)
    if isinstance(x, (list, tuple)):
        if all(is_int(i) for i in x):
            return np.asarray(x, np.int64)
        return None
    if isinstance(x, (np.ndarray, jax.Array)) and jnp.issubdtype(x.dtype, jnp.integer):
        try:
            return np.asarray(x).reshape(-1)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None  # traced: handled with jnp
    return None


def token_selection(positions, shape: tuple[int, ...], point: str) -> jax.Array | None:
    """Boolean (B or 1, T, 1, ...) selecting tokens of a value of `shape` (leading (B, T)); None = all."""
    if positions is None:
        return None
    if len(shape) < 2:
        raise TapError(f"positions= needs a value with leading (B, T) axes; {point} is {tuple(shape)}")
    b, t = shape[:2]
    if getattr(positions, "ndim", 0) > 1 and jnp.issubdtype(positions.dtype, jnp.integer):
        raise TapError(f"integer positions for {point} are a 1-D list of token indices (the same in every row), got "
                       f"shape {tuple(positions.shape)}; choose per row with a boolean (B, T) mask")
    idx = _concrete_ints(positions)
    if idx is not None:
        bad = idx[(idx < -t) | (idx >= t)]
        if bad.size:
            raise TapError(f"positions {bad.tolist()} are outside the {t} tokens of {point} {tuple(shape)}")
        sel = np.zeros((1, t), bool)
        sel[0, idx % t] = True
        sel = jnp.asarray(sel)
    else:
        pos = jnp.asarray(positions)
        if jnp.issubdtype(pos.dtype, jnp.integer):  # a traced 1-D integer array: those t in every row
            if pos.ndim > 1:
                raise TapError(f"integer positions for {point} are a 1-D list of token indices (the same in every "
                               f"row), got shape {tuple(pos.shape)}; choose per row with a boolean (B, T) mask")
            sel = jnp.any(jnp.arange(t)[None, :] == (pos.reshape(-1) % t)[:, None], axis=0)[None, :]
        elif pos.dtype == jnp.bool_:
            try:
                target = jnp.broadcast_shapes(pos.shape, (1, t))
            except ValueError:
                target = None
            if target is None or len(target) != 2 or target[0] not in (1, b):
                raise TapError(f"a boolean positions mask of shape {tuple(pos.shape)} does not broadcast to the "
                               f"(B, T) = {(b, t)} of {point}")
            sel = jnp.broadcast_to(pos, target)
        else:
            raise TapError(f"positions for {point} must be ints or a boolean mask, got dtype {pos.dtype}")
    return sel.reshape(sel.shape + (1,) * (len(shape) - 2))


def _where(selection, new, old):
    return new.astype(old.dtype) if selection is None else jnp.where(selection, new.astype(old.dtype), old)


@dataclasses.dataclass(eq=False)
class Replace(Intervention):
    """x' = value on the selected tokens (module docstring)."""

    value: Any
    positions: Any = None

    def apply(self, x, point):
        new = jnp.broadcast_to(jnp.asarray(self.value), x.shape)
        return _where(token_selection(self.positions, x.shape, point), new, x)


@dataclasses.dataclass(eq=False)
class Add(Intervention):
    """x' = x + vector on the selected tokens (module docstring)."""

    vector: Any
    positions: Any = None

    def apply(self, x, point):
        v = jnp.asarray(self.vector)
        try:
            fits = jnp.broadcast_shapes(x.shape, v.shape) == tuple(x.shape)
        except ValueError:
            fits = False
        if not fits:
            raise TapError(f"add: a vector of shape {tuple(v.shape)} does not broadcast into {point} "
                           f"{tuple(x.shape)} (it must fit its trailing axes, e.g. {tuple(x.shape[2:])})")
        new = x + v.astype(x.dtype)
        return _where(token_selection(self.positions, x.shape, point), new, x)


@dataclasses.dataclass(eq=False)
class Mask(Intervention):
    """x'[..., j] = 0 for the chosen features j of the last axis, on the selected tokens (module docstring)."""

    neurons: Any
    positions: Any = None

    def apply(self, x, point):
        f = x.shape[-1] if x.ndim else 0
        idx = _concrete_ints(self.neurons)
        if idx is not None:
            bad = idx[(idx < -f) | (idx >= f)]
            if bad.size:
                raise TapError(f"mask: neurons {bad.tolist()} are outside the last axis ({f}) of {point} "
                               f"{tuple(x.shape)}")
            chosen = np.zeros((f,), bool)
            chosen[idx % f] = True
            chosen = jnp.asarray(chosen)
        else:
            n = jnp.asarray(self.neurons)
            if jnp.issubdtype(n.dtype, jnp.integer):
                chosen = jnp.zeros((f,), bool).at[n.reshape(-1)].set(True)
            elif n.dtype == jnp.bool_:
                chosen = n
            else:
                raise TapError(f"mask: neurons for {point} must be indices or a boolean mask, got dtype {n.dtype}")
        try:
            chosen = jnp.broadcast_to(chosen, x.shape)
        except ValueError:
            raise TapError(f"mask: a neuron mask of shape {tuple(chosen.shape)} does not broadcast into {point} "
                           f"{tuple(x.shape)}") from None
        sel = token_selection(self.positions, x.shape, point)
        if sel is not None:
            chosen = chosen & sel
        return jnp.where(chosen, jnp.zeros((), x.dtype), x)


@dataclasses.dataclass(eq=False)
class PatchFrom(Intervention):
    """x' = captured[point] on the selected tokens (module docstring)."""

    captured: Mapping[str, Any]
    positions: Any = None

    def apply(self, x, point):
        if point not in self.captured:
            raise TapError(f"patch_from: {point} was not captured; the captured points are {list(self.captured)}")
        other = jnp.asarray(self.captured[point])
        if other.shape != x.shape:
            raise TapError(f"patch_from: {point} is {tuple(x.shape)} in this run but {tuple(other.shape)} in the "
                           "captured one")
        return _where(token_selection(self.positions, x.shape, point), other, x)


for _cls, _fields in ((Replace, ["value", "positions"]), (Add, ["vector", "positions"]),
                      (Mask, ["neurons", "positions"]), (PatchFrom, ["captured", "positions"])):
    jax.tree_util.register_dataclass(_cls, data_fields=_fields, meta_fields=[])


def replace(value, positions=None) -> Replace:
    """The point's value becomes `value` (broadcast to its shape) on the selected tokens."""
    return Replace(value, positions)


def add(vector, positions=None) -> Add:
    """`vector` is added to the point's value (broadcast over the leading axes) on the selected tokens."""
    return Add(vector, positions)


def mask(neurons, positions=None) -> Mask:
    """Zeroes the chosen features of the last axis: indices (int, list, integer array) or a boolean mask that
    broadcasts against the value (e.g. (F,), or (E, F) for MoE hidden), on the selected tokens."""
    return Mask(neurons, positions)


def patch_from(captured: Mapping[str, Any], positions=None) -> PatchFrom:
    """Each matched point takes its value from `captured` ({point: value} of another run, e.g. from capture)."""
    return PatchFrom(dict(captured), positions)
