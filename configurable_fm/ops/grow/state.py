"""Growing the optimizer state with the parameters (MSG's rule), so that training continues after growth.

    g = grow_steps(model, [("width", dict(hidden_size=48)), ("depth", dict(method="llama_pro", num_layers=4))])
    g.model                                     # the grown model (as grow_width / grow_depth / upcycle give it)
    mu = g.moments(old_mu)                      # {path: array} shaped like the old parameters -> like the new ones
    new_state = grow_opt_state(opt_state, tx.init(new_params), g.moments)   # or tx.init(new_params): a reset

Each step's moment map is the operator's own index map in "gather" mode (width.widen_moments,
depth.deepen_moments, upcycle.upcycle_moments; the plan is computed once and drives both the parameters and the
moments), so no layout is derived twice.

## The rule (MSG, Yao et al. 2024: m and v copied into the old slice, zeros elsewhere, the step count kept)
A growth operator maps every parameter entry of the grown model either to a source entry it copies (possibly
scaled), or marks it new. For every optimizer tensor shaped like a parameter (Adam's first and second moments m and
v, or any statistic keyed by the parameter's path):

    m'[t] = m[src(t)],  v'[t] = v[src(t)]     if entry t copies source entry src(t) (no scaling)
    m'[t] = v'[t] = 0                         if entry t is new

and scalars (Adam's count, the schedule's count) are kept. Copies: width "exact"'s kept entries and duplicated kv
heads, every entry of hypercloning's tiles (each tile gets the copied moments), stack / dus layers, the experts of
an upcycled MLP. New: zero-extension (the pad scheme's new stream entries in every tensor, also the new rows of
stream readers, whose parameters copy rows), new FFN units and heads, new kv heads, identity / llama_pro blocks
(also where llama_pro copies the parameters), the router, Drop-Upcycling's re-initialised units. A parameter of the
grown model that the map does not produce (e.g. one trainable only after growth) gets the fresh optimizer's value.

Why no scaling. Where the operator scales a copy (W' = c W, e.g. hypercloning's 1/n and 1/sqrt(n)), the gradient
of the copy at the grown point is a multiple of the source's, g' = c' g, on every batch; the moments of those
gradients would be (c' m, c'^2 v), and Adam's direction m / (sqrt(v) + eps) is invariant under that up to eps. So
copying is the gradient-consistent rule for Adam-type optimizers (not for SGD momentum). That argument covers
scaled copies whose gradient follows the source's (hypercloning's tiles, stacked layers); it does not cover two
copies this rule also makes: a kv head that width "exact" duplicates gets the gradient of its own query heads only
(a share of the source's), and an upcycled expert that of the tokens routed to it. There copying is MSG's
heuristic, not an invariance. What stays open (the research notes: no paper evaluates it):
- the update's size relative to a scaled-down parameter (lr |W'| / |W| ratios: a learning-rate question, muP-like);
- new entries whose gradient at the grown point is not zero: the output weights of new units and heads (their
  activations copy live ones), the new stream columns of writers, every weight of llama_pro's copied blocks. Zero
  moments there are MSG's choice; copying the source's would also be consistent for the first.
  (Entries whose gradient is zero at the grown point get zero moments either way: new readers' rows read zeros,
  the inputs of units with zero outputs get no gradient.)
- bias correction: with the count kept, a new entry's first updates are (1 - b1^k) / sqrt(1 - b2^k) times lr
  (k steps after growth: about 3.2 for b1 = 0.9, b2 = 0.999, for hundreds of steps), where a fresh Adam's are
  about 1. A re-warmed learning rate (train/optim.py, optimizer.rewarm_at) damps this; "reset" avoids it.
Tensors keyed by parameter paths that are parameter-like (an EMA of the weights, schedule-free's z) would need
the parameter map, not this one; the optimizers of train/optim.py have none.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.grow.common import GrowthError, check_key, llama_config
from configurable_fm.ops.grow.depth import deepen_moments, depth_sources, grow_depth
from configurable_fm.ops.grow.upcycle import upcycle, upcycle_moments
from configurable_fm.ops.grow.width import plan_width, widen, widen_moments

OPS = ("width", "depth", "upcycle")
OPTIMIZER_MODES = ("copy", "reset")

MomentMap = Callable[[Mapping[str, Any]], dict]


@dataclasses.dataclass(frozen=True)
class Growth:
    """A grown model and the map of its growth on parameter-shaped tensors (moments): {old path: array} (any
    subset of the old parameters) -> {new path: numpy array}."""

    model: Any
    moments: MomentMap


def growth(model, op: str, *, key=None, **kwargs) -> Growth:
    """One growth step: op 'width' (grow_width's keyword arguments), 'depth' (grow_depth's) or 'upcycle'
    (upcycle's), with its moment map (module docstring)."""
    if op not in OPS:
        raise GrowthError(f"growth: op={op!r} is unknown; choose one of {list(OPS)}")
    cfg = llama_config(model, f"grow {op}")
    if op == "width":
        noise = kwargs.pop("noise", 0.0)
        plan = plan_width(cfg, **kwargs)
        return Growth(widen(model, plan, key=key, noise=noise), lambda m: widen_moments(m, cfg, plan))
    if op == "depth":
        plan = depth_sources(cfg.num_layers, **kwargs)
        return Growth(grow_depth(model, **kwargs, key=key), lambda m: deepen_moments(m, plan))
    grown = upcycle(model, **kwargs, key=key)  # checks the arguments and the key first
    fraction = float(kwargs.get("drop_fraction", 0.0))
    key = check_key(key, "upcycle", "drop_fraction") if fraction else None
    return Growth(grown, lambda m: upcycle_moments(m, kwargs["num_experts"], drop_fraction=fraction, key=key))


def grow_steps(model, steps: Sequence[tuple[str, Mapping[str, Any]]], *, seed: int = 0, log=None) -> Growth:
    """`model` grown by `steps` [(op, kwargs), ...] in order (stages/grow.py's checked steps), step i with the key
    fold_in(key(seed), i); the moment maps composed in the same order."""
    maps: list[MomentMap] = []
    for i, (op, kw) in enumerate(steps):
        if log is not None:
            log(f"grow: {op} {dict(kw)}")
        g = growth(model, op, key=jax.random.fold_in(jax.random.key(seed), i), **dict(kw))
        model = g.model
        maps.append(g.moments)

    def moments(m):
        for f in maps:
            m = f(m)
        return dict(m)

    return Growth(model, moments)


def _is_table(x) -> bool:
    return isinstance(x, Mapping)


def grow_opt_state(state, fresh, moments: MomentMap):
    """The optimizer state `state` (of the source's parameters) grown by `moments` (module docstring: the rule).

    fresh: the same optimizer's init on the grown parameters (tx.init(new_params); it gives the target structure,
    and the value of every entry the map does not produce). Every dict of the state keyed by parameter paths (its
    position in the tree matching a dict of `fresh`) is mapped by `moments`; every other leaf (counts) is kept and
    must have fresh's shape. The result has fresh's tree structure, shapes and dtypes (GrowthError naming the
    entry otherwise)."""
    old_leaves, old_def = jax.tree.flatten(state, is_leaf=_is_table)
    new_leaves, new_def = jax.tree.flatten(fresh, is_leaf=_is_table)
    if len(old_leaves) != len(new_leaves) or [_is_table(x) for x in old_leaves] != [_is_table(x) for x in new_leaves]:
        raise GrowthError(f"grow_opt_state: the state's structure {old_def} is not that of the fresh state {new_def}"
                          " (a different optimizer?)")
    out = []
    for i, (old, new) in enumerate(zip(old_leaves, new_leaves)):
        if not _is_table(new):
            if np.shape(old) != np.shape(new):
                raise GrowthError(f"grow_opt_state: optimizer leaf {i} is {np.shape(old)} in the state but "
                                  f"{np.shape(new)} in the fresh state; only parameter-keyed tensors grow")
            out.append(old)
            continue
        grown = moments({k: v for k, v in old.items() if hasattr(v, "shape")})
        table = {}
        for k, v in new.items():
            if k not in grown or not hasattr(v, "shape"):
                table[k] = v  # a parameter with no source (or a placeholder such as optax's MaskedNode)
                continue
            g = grown[k]
            if tuple(g.shape) != tuple(v.shape):
                raise GrowthError(f"grow_opt_state: {k} is {tuple(g.shape)} after the moment map but the grown "
                                  f"parameter is {tuple(v.shape)}")
            table[k] = jnp.asarray(np.asarray(g, dtype=v.dtype))
        out.append(type(new)(table) if isinstance(new, dict) else table)
    return jax.tree.unflatten(new_def, out)
