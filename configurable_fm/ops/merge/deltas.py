"""Merging deltas with the task-vector kernels: a delta is a task vector, merged against a zero base.

    tvs = [deltas.diff(base, a), deltas.diff(base, b)]
    tv = merge_deltas("ties", tvs, parameters={"density": 0.5}, model_parameters=[{"weight": 1.0}, {"weight": 0.5}])
    merged = deltas.apply(base, tv)   # == tree.merge("ties", base, [a, b], same settings) in float32

Every method of the task-vector family (task_vectors.py) computes y = b + F(x_1 − b, ..., x_N − b). With b = 0 and
x_i = d_i, the change of delta i materialized in float32, the kernel returns F(d_1, ..., d_N): the merged task
vector, a Dense term per path. Because `deltas.diff` computes d_i = f32(x_i) − f32(b) exactly as the kernels do,
`apply(base, merge_deltas(m, [diff(base, x_i)], ...))` reproduces `tree.merge(m, base, [x_i], ...)` of flat
{path: array} states (same sparsification masks, same sign election; randomised methods draw the same masks from
`tensor_key(seed, path)`). tree.merge of nnx modules merges in HF layout instead (torch's (out, in) kernels under
HF tensor names, as mergekit does), so there the randomised methods' masks (DARE, DELLA) and DELLA's per-row ranks
differ from these (0.22 at most on a tiny llama; the deterministic methods, e.g. ties, agree).

The per-tensor step and the parameters are tree.merge's own: `params.check_names` / `params.resolve_for_tensor`
(mergekit settings: scalars, depth gradients, {filter, value} entries) and `tree.merge_tensor` (the cached jitted
kernel). Paths are the union of the deltas' paths (first delta's order first); a delta without a path contributes
a zero change there, exactly as an unchanged tensor does in tree.merge. One path is materialized at a time.
Methods that need the models themselves (linear, slerp, ...) are refused; task_arithmetic with normalize=True is
the linear merge of the models expressed on deltas.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence, Union

import jax.numpy as jnp

from configurable_fm.bricks.deltas import Delta, Dense
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.registry import TASK_VECTOR_METHODS, MergeMethod, get_method
from configurable_fm.ops.merge.tree import MergeInputError, merge_tensor


def _json_or_repr(value: Any):
    """`value` if it is JSON data, else its repr (for the merged delta's metadata)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def _named(deltas: Union[Sequence[Delta], Mapping[str, Delta]]) -> tuple[list[str], list[Delta]]:
    if isinstance(deltas, Delta):
        raise TypeError("merge_deltas: give a list (or {name: Delta} mapping) of deltas, not one Delta")
    if isinstance(deltas, Mapping):
        names, items = [str(k) for k in deltas], list(deltas.values())
    else:
        items = list(deltas)
        names = [f"delta_{i}" for i in range(len(items))]
    bad = [f"{n} is a {type(d).__name__}" for n, d in zip(names, items) if not isinstance(d, Delta)]
    if bad:
        raise TypeError(f"merge_deltas: inputs must be Deltas: {', '.join(bad)}")
    if not items:
        raise ValueError("merge_deltas: needs at least one delta")
    return names, items


def _per_delta_settings(method: MergeMethod, model_parameters, names: Sequence[str]):
    """model_parameters as a list in `names` order (tree.merge's conventions: a list, or {name: settings})."""
    if isinstance(model_parameters, Mapping):
        unknown = sorted(set(model_parameters) - set(names))
        if unknown:
            raise P.ParameterError(f"merge_deltas {method.name}: model_parameters for unknown delta(s) {unknown}; "
                                   f"deltas: {list(names)}")
        return [model_parameters.get(n) for n in names]
    if model_parameters is not None and len(model_parameters) != len(names):
        raise P.ParameterError(f"merge_deltas {method.name}: {len(model_parameters)} model_parameters entries for "
                               f"{len(names)} deltas {list(names)}")
    return None if model_parameters is None else list(model_parameters)


def merge_deltas(
    method: Union[str, MergeMethod],
    deltas: Union[Sequence[Delta], Mapping[str, Delta]],
    *,
    parameters: Optional[Mapping[str, Any]] = None,
    model_parameters: Union[Sequence[Optional[Mapping[str, Any]]], Mapping[str, Mapping[str, Any]], None] = None,
    seed: int = 0,
    num_layers: Optional[int] = None,
    kind: str = "task_vector",
    source: Optional[str] = None,
) -> Delta:
    """Merges deltas d_1..d_N with a task-vector method: y_p = kernel(0, stack_i f32(d_i,p), **params_p) per path p.

    method: one of TASK_VECTOR_METHODS (or its MergeMethod). deltas: a list (named delta_0, delta_1, ...) or a
      {name: Delta} mapping, in mergekit's `models:` order. parameters / model_parameters / seed: as tree.merge
      (global settings; one settings dict per delta, or {name: settings}; key = tensor_key(seed, path) for
      randomised methods). num_layers: depth for gradients (default: 1 + the largest `layers.N` index among the
      deltas' paths; pass the model's when the deltas cover only some layers).
    Returns a Delta of Dense float32 terms over the union of paths; kind `kind`, source `source` (default
    'method(name, ...)'), metadata {'merge': {method, inputs, sources, seed, parameters, model_parameters}}.
    Raises ValueError (not a task-vector method, no delta), MergeInputError (shapes differ at a path, all named),
    params.ParameterError (settings).
    """
    m = get_method(method) if isinstance(method, str) else method
    if m.name not in TASK_VECTOR_METHODS:
        raise ValueError(f"merge_deltas: {m.name!r} is not a task-vector method (it needs the models, not their "
                         f"changes); deltas merge with {', '.join(TASK_VECTOR_METHODS)} (task_arithmetic with "
                         "normalize=True is the linear merge)")
    names, items = _named(deltas)
    per_delta = _per_delta_settings(m, model_parameters, names)
    P.check_names(m, parameters, per_delta, names)
    paths = list(dict.fromkeys(p for d in items for p in d))
    problems = []
    for p in paths:
        shapes = {n: tuple(d[p].shape) for n, d in zip(names, items) if p in d}
        if len(set(shapes.values())) > 1:
            problems.append(f"shape mismatch: {p} is " + ", ".join(f"{s} in {n}" for n, s in shapes.items()))
    if problems:
        raise MergeInputError(f"cannot merge deltas {', '.join(names)}:\n  " + "\n  ".join(problems))
    depth = P.num_layers_of(paths) if num_layers is None else num_layers
    terms = {}
    for p in paths:
        shape = next(tuple(d[p].shape) for d in items if p in d)
        inputs = [d[p].materialize(jnp.float32) if p in d else jnp.zeros(shape, jnp.float32) for d in items]
        kwargs = P.resolve_for_tensor(m, p, parameters=parameters, model_parameters=per_delta, model_names=names,
                                      num_layers=depth)
        terms[p] = Dense(merge_tensor(m, p, jnp.zeros(shape, jnp.float32), inputs, kwargs, seed=seed,
                                      out_dtype=jnp.float32))
    metadata = {"merge": {"method": m.name, "inputs": names, "sources": [d.source for d in items], "seed": seed,
                          "parameters": _json_or_repr(dict(parameters or {})),
                          "model_parameters": _json_or_repr(model_parameters)}}
    return Delta(terms, kind=kind, source=source if source is not None else f"{m.name}({', '.join(names)})",
                 metadata=metadata)
