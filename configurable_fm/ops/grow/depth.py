"""Depth growth of llama-family models: new decoder layers, exact (identity blocks) or by copying (stacking).

    deep = grow_depth(model, method="llama_pro", num_layers=40)            # LLaMA-Pro block expansion: exact
    deep = grow_depth(model, method="identity", positions=[0, 2, 2], key=jax.random.key(0))   # exact
    deep = grow_depth(model, method="stack", factor=4)                     # G_stack: not function-preserving
    deep = grow_depth(model, method="dus", drop=8)                         # SOLAR depth up-scaling: 32 -> 48
    depth_sources(32, method="dus", drop=8)                                # where every new layer comes from

A pre-norm decoder layer computes x + o_proj(attn(norm1(x))) then x + down(mlp(norm2(x))): with o_proj and down_proj
(and their biases; an MoE layer's expert down projections) zero both residual branches add exactly 0, so the layer
is the identity, bit for bit, whatever its other weights (Net2DeeperNet's idea; LLaMA-Pro, Wu et al. 2024). The
norms are NOT zeroed: a zero gain would cut every gradient to the block. At step 0 the zeroed projections get
gradient (their inputs are nonzero); the other weights of the new block start receiving it after one update.

Methods (n source layers; a position p in 0..n means "before source layer p", n = at the end):
- "identity": new blocks at `positions`, or spread evenly to `num_layers` (P = num_layers - n new blocks at
  p_k = floor((k + 1) n / P), k = 0..P-1: after every n/P layers, as LLaMA-Pro). Their input-side weights are
  drawn fresh from `key` like a newly built model's (N(0, 0.02) kernels, unit norm gains, zero biases).
- "llama_pro": the same placement, each new block a copy of the source layer before it (layer 0 for p = 0) with
  o_proj and down_proj zeroed: TencentARC/LLaMA-Pro block_expansion.py when P divides n (32 -> 40: a copy after
  every 4 layers). Exact.
- "stack": G_stack (Du et al. 2024): the whole stack repeated `factor` times, M o M o ... o M, layers
  [0..n-1] * factor. Embedding, final norm and head unchanged. NOT function-preserving (the loss jumps, then
  recovers; the paper's best pre-training speed-up nonetheless).
- "dus": SOLAR depth up-scaling (Kim et al. 2023): two copies, the first keeps layers [0, n - drop), the second
  [drop, n), concatenated: 2 (n - drop) layers (SOLAR: n = 32, drop = 8 -> 48). NOT function-preserving.
The llama config has no per-layer fields (no layer_types): every layer is built from the same config.

Moments (optimizer state, `deepen_moments`): the same plan (depth_sources) in gather mode: a copied layer
(stack, dus) takes its source layer's moments; a new block (identity, llama_pro: the flagged layers) gets 0 in
every tensor, also where llama_pro copies the parameters (ops/grow/state.py says why).
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_int
from configurable_fm.models.structure import rebuild
from configurable_fm.ops.grow.common import INIT_STD, GrowthError, check_key, llama_config, normal
from configurable_fm.prng import path_key

METHODS = ("identity", "llama_pro", "stack", "dus")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
# The parameters (relative to a layer) that write the residual stream: zero in an identity block.
_OUTPUTS = re.compile(r"^(self_attn\.o_proj\.(kernel|bias)|mlp\.down_proj\.(kernel|bias)|mlp\.experts\.down_proj)$")


def _int(name: str, value, low: int) -> int:
    if not is_int(value) or value < low:
        raise GrowthError(f"grow_depth: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _insertions(n: int, num_layers, positions) -> list[int]:
    if positions is None:
        if num_layers is None:
            raise GrowthError("grow_depth: pass num_layers (new layers spread evenly) or positions (where to insert)")
        p = _int("num_layers", num_layers, 0) - n
        if p <= 0:
            raise GrowthError(f"grow_depth: num_layers={num_layers} is not larger than the model's {n} layers")
        return [(k + 1) * n // p for k in range(p)]
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence) or not positions:
        raise GrowthError(f"grow_depth: positions must be a non-empty list of ints in 0..{n}, got {positions!r}")
    bad = [q for q in positions if not is_int(q) or not 0 <= q <= n]
    if bad:
        raise GrowthError(f"grow_depth: positions {bad} are not insertion points 0..{n} (p = before source layer p; "
                          f"{n} = at the end)")
    if num_layers is not None and num_layers != n + len(positions):
        raise GrowthError(f"grow_depth: num_layers={num_layers} disagrees with {len(positions)} positions on "
                          f"{n} layers ({n + len(positions)})")
    return sorted(int(q) for q in positions)


def depth_sources(n: int, *, method: str, num_layers=None, positions=None, factor=None,
                  drop=None) -> list[tuple[int | None, bool]]:
    """For each layer of the grown model: (source layer index or None for a fresh block, whether its output
    projections are zeroed). Same arguments as `grow_depth`, with n the source's number of layers."""
    if method not in METHODS:
        raise GrowthError(f"grow_depth: method={method!r} is unknown; choose one of {list(METHODS)}")
    given = {k for k, v in dict(num_layers=num_layers, positions=positions, factor=factor, drop=drop).items()
             if v is not None}
    allowed = {"identity": {"num_layers", "positions"}, "llama_pro": {"num_layers", "positions"},
               "stack": {"factor"}, "dus": {"drop"}}[method]
    if given - allowed:
        raise GrowthError(f"grow_depth: method={method!r} takes {sorted(allowed)}, not {sorted(given - allowed)}")
    if method == "stack":
        if factor is None:
            raise GrowthError("grow_depth: method='stack' needs factor (how many copies of the stack)")
        return [(i, False) for _ in range(_int("factor", factor, 2)) for i in range(n)]
    if method == "dus":
        if drop is None:
            raise GrowthError("grow_depth: method='dus' needs drop (layers removed from each copy at the seam)")
        m = _int("drop", drop, 0)
        if 2 * m >= n:
            raise GrowthError(f"grow_depth: dus with drop={m} on {n} layers gives 2*({n}-{m}) = {2 * (n - m)} layers, "
                              f"not more than {n}; drop must be < {n / 2:g}")
        return [(i, False) for i in range(n - m)] + [(i, False) for i in range(m, n)]
    plan: list[tuple[int | None, bool]] = []
    inserts = _insertions(n, num_layers, positions)
    for p in range(n + 1):
        plan += [(None if method == "identity" else max(p - 1, 0), True) for q in inserts if q == p]
        if p < n:
            plan.append((p, False))
    return plan


def _fresh(path: str, x, key) -> jax.Array:
    """A newly built model's value for a layer parameter: unit norm gains, zero biases, N(0, 0.02) kernels."""
    if path.endswith("layernorm.weight"):
        return jnp.ones(x.shape, x.dtype)
    if path.endswith(".bias"):
        return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray((INIT_STD * normal(key, x.shape)).astype(x.dtype))


def _by_layer(params) -> tuple[dict[int, dict[str, object]], dict[str, object]]:
    """({layer index: {path within the layer: value}}, {other path: value})."""
    layers: dict[int, dict[str, object]] = {}
    rest = {}
    for path, x in params.items():
        m = _LAYER.match(path)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = x
        else:
            rest[path] = x
    return layers, rest


def deepen_moments(moments, plan: Sequence[tuple[int | None, bool]]) -> dict[str, np.ndarray]:
    """Tensors shaped like the parameters (any subset of the paths, e.g. Adam's mu or nu) mapped by the plan of
    `depth_sources` in gather mode: layer i takes layer plan[i][0]'s tensors, zeros where plan[i][1] (a new block)
    or plan[i][0] is None; tensors outside the layers are kept."""
    layers, rest = _by_layer(moments)
    out = {k: np.asarray(v) for k, v in rest.items()}
    for i, (src, zeroed) in enumerate(plan):
        for rel, x in layers.get(0 if src is None else src, {}).items():
            x = np.asarray(x)
            out[f"layers.{i}.{rel}"] = np.zeros(x.shape, x.dtype) if zeroed or src is None else x
    return out


def grow_depth(model, *, method: str, num_layers: int | None = None, positions: Sequence[int] | None = None,
               factor: int | None = None, drop: int | None = None, key=None):
    """A deeper copy of a llama-family model (module docstring: methods and what is exact).

    identity / llama_pro: `positions` (insertion points in source numbering, repeats allowed) or `num_layers` (the
    target count, new blocks spread evenly); identity needs `key` for the new blocks' fresh weights (the copying
    methods draw nothing and ignore it). stack: `factor` >= 2. dus: `drop` < n/2. Returns a new consistent model
    (models.rebuild); the input is not modified. Layer i of the result is layer depth_sources(...)[i][0] of the
    source (with zeroed output projections where flagged)."""
    cfg = llama_config(model, "grow_depth")
    plan = depth_sources(cfg.num_layers, method=method, num_layers=num_layers, positions=positions, factor=factor,
                         drop=drop)
    if method == "identity":
        key = check_key(key, "grow_depth", "method='identity' (fresh weights for the new blocks)")
    layers, out = _by_layer(flat_params(model))
    for i, (src, zeroed) in enumerate(plan):
        for rel, x in layers[0 if src is None else src].items():
            path = f"layers.{i}.{rel}"
            if zeroed and _OUTPUTS.match(rel):
                value = jnp.zeros(x.shape, x.dtype)
            elif src is None:
                value = _fresh(path, x, path_key(key, path, "identity"))
            else:
                value = x
            out[path] = value
    return rebuild(model, {"num_layers": len(plan)}, params=out)
