"""Sharding by logical axis names: one rules table maps the names parameters carry onto mesh axes.

Every parameter records a logical name per dimension in its `out_sharding` metadata (see models/layers.py:
`q_proj.kernel` is ('embed', 'heads')). A rules table maps each logical name onto zero, one or several mesh
axes of a ('data', 'fsdp', 'tensor') mesh; `partition_spec` turns one parameter's names and shape into a
`PartitionSpec`, `shard_model` places every parameter accordingly.

DEFAULT_RULES:

    logical name   mesh axes           what it is
    ------------   -----------------   --------------------------------------------------------------
    batch          ('data', 'fsdp')    batch dimension of activations and inputs
    embed          'fsdp'              model width D (FSDP: weights sharded along D, gathered per use)
    vocab          'tensor'            vocabulary V of the embedding table and the output head
    heads          'tensor'            query heads x head dim (q_proj out, o_proj in; fused qkv)
    kv_heads       'tensor'            key/value heads x head dim (k_proj, v_proj out)
    mlp            'tensor'            FFN hidden width F
    experts        None                expert index E of stacked MoE weights (and the router's output)
    norm           None                normalisation scales and biases
    layers         None                a stacked-layers axis (scan over layers)
    positions      None                learned position embeddings' position axis
    length         None                sequence dimension of activations
    head_dim       None                per-head dimension H

So q_proj.kernel (embed, heads) -> P('fsdp', 'tensor'), down_proj.kernel (mlp, embed) -> P('tensor', 'fsdp'),
the MoE experts' gate_proj (experts, embed, mlp) -> P(None, 'fsdp', 'tensor'), RMSNorm weight -> P(None).
For expert parallelism use e.g. `{**DEFAULT_RULES, 'experts': 'tensor', 'mlp': None}`.

Resolution of one dimension of size n with logical name a (`partition_spec`):
  * a is None -> replicated; a not in the rules -> ValueError naming a;
  * mesh axes of rules[a] that the mesh lacks, or that an earlier dimension already uses, are skipped;
  * the remaining axes are kept in order while their product of sizes divides n; an axis that does not
    divide is dropped (that dimension is then replicated over it), never an error.

Meshes are built with explicit `AxisType.Auto` axes (`make_mesh`), so the compiler propagates shardings
(GSPMD) whatever JAX's default axis type is.
"""
from __future__ import annotations

import math
import types
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: Mapping[str, MeshAxes] = types.MappingProxyType({
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "experts": None,
    "norm": None,
    "layers": None,
    "positions": None,
    "length": None,
    "head_dim": None,
})

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A device mesh with Auto axes. One entry of `shape` may be -1: it takes the remaining devices.

    Uses the first prod(shape) devices of `devices` (default: all of `jax.devices()`).
    """
    shape, axis_names = [int(s) for s in shape], tuple(axis_names)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} and axis names {axis_names} differ in length")
    devices = list(jax.devices() if devices is None else devices)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be >= 1, with at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {len(devices)} devices are not a multiple of {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices; only {len(devices)} given")
    # Sizes positionally: the first parameter is `axis_shapes` in jax 0.10 and `axis_sizes` from 0.11.
    return jax.make_mesh(tuple(shape), axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices[:math.prod(shape)])


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def partition_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dimensions have the names `logical_axes` (see module doc)."""
    logical_axes, shape = tuple(logical_axes), tuple(shape)
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    sizes = dict(mesh.shape)  # {axis name: size}; a concrete or an abstract mesh
    used: set[str] = set()
    spec = []
    for name, n in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} (of an array {shape} with axes {logical_axes}) has no "
                             f"sharding rule; rules cover {sorted(rules)}")
        kept, product = [], 1
        for axis in _as_tuple(rules[name]):
            if axis not in sizes or axis in used or n % (product * sizes[axis]):
                continue
            kept.append(axis)
            product *= sizes[axis]
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _logical_axes(var: nnx.Variable) -> tuple | None:
    names = var.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model_or_state, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> nnx.State:
    """The model's state (all variables) with each value replaced by its `NamedSharding`.

    Variables without logical names (`out_sharding` metadata) are replicated. Works on abstract models
    (`nnx.eval_shape`) too, e.g. for a checkpoint restore target.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def sharding(var: nnx.Variable) -> nnx.Variable:
        names = _logical_axes(var)
        value = var.get_value()
        shape = value.shape if hasattr(value, "shape") else np.shape(value)  # arrays or ShapeDtypeStructs
        spec = P() if names is None else partition_spec(names, shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> nnx.Module:
    """A new model whose variables are placed on `mesh` as the rules say; `model` itself is unchanged."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh, rules)
    placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())),
                          state, shardings, is_leaf=_is_var)
    return nnx.merge(graphdef, placed)


def shard_batch(batch, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES):
    """Places every array of `batch` (an array or a pytree of them) with its leading dimension on
    rules['batch'] (('data', 'fsdp') by default, dropping axes that do not divide it), the rest replicated."""
    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        spec = partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(place, batch)


def global_batch(batch, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES):
    """This process's rows of a batch -> global arrays whose leading (batch) dimension is sharded over
    rules['batch'] (('data', 'fsdp') by default, dropping axes that do not divide it), the rest replicated.

    `batch` is an array or a pytree of them, every one with the same number of local rows R; process p's rows
    become global rows [p*R, (p+1)*R) (jax.make_array_from_process_local_data), so with one process this is
    `shard_batch`. Scalars are replicated.
    """
    def place(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        spec = partition_spec(("batch",) + (None,) * (x.ndim - 1), global_shape, mesh, rules)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, global_shape)

    return jax.tree.map(place, batch)
