"""Sparse upcycling: a dense llama-family model into a Mixtral-style mixture of experts (models/moe.py SparseMoE).

    moe = upcycle(model, num_experts=8, num_experts_per_tok=2, key=jax.random.key(0))   # exact at initialisation
    moe = upcycle(model, num_experts=8, drop_fraction=0.5, key=jax.random.key(0))        # Drop-Upcycling
    moe = upcycle(model, num_experts=8, router_init="zeros")                             # exact, no key: checks only

Every layer's SwiGLU MLP (gate/up (D, F), down (F, D)) becomes E experts stacked along a leading axis
(gate/up (E, D, F), down (E, F, D)), each a copy of the MLP (Komatsuzaki et al. 2023), plus a router (D, E)
(N(0, 0.02^2) from `key`, the default, or zeros). Attention, norms, embeddings and head are kept. The config
becomes num_experts=E, num_experts_per_tok=k, router=..., architecture="MixtralForCausalLM".

Exactness. The layer computes y = sum_j w_j MLP_{e_j}(x) over the k chosen experts. With identical experts,
y = (sum_j w_j) MLP(x). "topk_softmax" (Mixtral: softmax over the k chosen logits) has sum_j w_j = 1, so the
upcycled model equals the dense one whatever the router (up to float rounding; ties of a zero router choose the
lowest indices, all equal). "softmax_topk" (no renormalisation) scales every MLP output by the sum of the top-k
probabilities: k/E with a zero router. Not exact; allowed because it is the rule some recipes train with.

Symmetry. With identical experts the router gets no gradient (the output does not depend on it). A zero router
sends every token to experts 0..k-1 (ties break to the lowest index) with equal weights, so those k experts
receive identical gradients and stay identical, the others never train, and the router never learns: the
upcycled model stays the dense one. router_init="normal" (the default, still exact) sends tokens to different
experts, whose gradients then differ, and Drop-Upcycling starts them different. router_init="zeros" (a symmetric
saddle that training does not leave) is for checks and analysis.

Drop-Upcycling (Nakamura et al., ICLR 2025; `drop_fraction` r > 0): in every expert of every layer, a random set S
of floor(r F) intermediate units, drawn independently per expert, is re-initialised: the gate and up columns and
the down rows at S are drawn from N(mu, sigma^2), with mu, sigma the mean and standard deviation of the dense
matrix's entries at S (per matrix, as Taishi-N324/Drop-Upcycling's conversions/drop_upcycling.py computes them).
One S per expert for all three matrices, as the paper describes a unit's re-initialisation (the released script
draws a separate set per matrix). The paper's r = 0.5 works best; r = 1 is a full random re-initialisation of the
experts with the dense statistics. Not function-preserving: the experts differ from the start, which is the point
(diversity that plain copies only reach after long training).

Moments (optimizer state, `upcycle_moments`): every expert takes the dense MLP's moments (Drop-Upcycling's
re-initialised units, the same sets S, get 0), the router gets 0 (ops/grow/state.py: the rule).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_int
from configurable_fm.models.structure import rebuild
from configurable_fm.ops.grow.common import (INIT_STD, GrowthError, check_fraction, check_key, llama_config, normal,
                                             permutation)
from configurable_fm.prng import path_key

ROUTERS = ("topk_softmax", "softmax_topk")
ROUTER_INITS = ("zeros", "normal")
_MLP = re.compile(r"^(layers\.\d+\.mlp)\.(gate_proj|up_proj|down_proj)\.kernel$")


def drop_sets(key, num_experts: int, units: int, fraction: float) -> list[np.ndarray]:
    """Drop-Upcycling's re-initialised unit sets S_e (floor(fraction F) of the F units) of experts e = 0..E-1;
    expert e's from fold_in(key, e)."""
    count = int(fraction * units)
    return [permutation(jax.random.fold_in(key, e), units)[:count] for e in range(num_experts)]


def drop_reinit(gate, up, down, num_experts: int, fraction: float, key) -> list[np.ndarray]:
    """Drop-Upcycling's experts from one dense MLP (module docstring): gate/up (D, F) and down (F, D) ->
    (E, D, F), (E, D, F), (E, F, D) numpy arrays, each expert a copy with floor(fraction F) units re-initialised;
    expert e's set S and draws come from fold_in(key, e)."""
    dense = [np.asarray(w) for w in (gate, up, down)]
    f = dense[0].shape[1]
    count = int(fraction * f)
    keys = [jax.random.fold_in(key, e) for e in range(num_experts)]
    chosen = drop_sets(key, num_experts, f, fraction)
    out = []
    for i, (w, unit_axis) in enumerate(zip(dense, (1, 1, 0))):
        units_first = np.moveaxis(w, unit_axis, 0)  # (F, D)
        experts = np.repeat(units_first[None], num_experts, axis=0)  # (E, F, D)
        for e, s in enumerate(chosen):
            if count:
                picked = units_first[s].astype(np.float64)
                mean, std = picked.mean(), picked.std(ddof=1) if picked.size > 1 else 0.0
                draw = normal(jax.random.fold_in(keys[e], i), picked.shape, np.float64)
                experts[e, s] = (mean + std * draw).astype(w.dtype)
        out.append(np.moveaxis(experts, 1, unit_axis + 1))
    return out


def upcycle_moments(moments, num_experts: int, *, drop_fraction: float = 0.0, key=None) -> dict[str, np.ndarray]:
    """Tensors shaped like the dense model's parameters (any subset of the paths, e.g. Adam's mu or nu) mapped as
    `upcycle` maps the parameters, in gather mode: layers.i.mlp.{gate,up,down}_proj.kernel -> layers.i.mlp.experts.
    {gate,up,down}_proj, one copy per expert (zeros at Drop-Upcycling's re-initialised units when drop_fraction >
    0: pass upcycle's `key`), plus a zero layers.i.mlp.router.kernel (D, E) for every MLP present; others kept."""
    out, mlps = {}, {}
    for path, x in moments.items():
        m = _MLP.match(path)
        if m:
            mlps.setdefault(m.group(1), {})[m.group(2)] = np.asarray(x)
        else:
            out[path] = np.asarray(x)
    if drop_fraction:
        key = check_key(key, "upcycle_moments", f"drop_fraction={drop_fraction} (the re-initialised units)")
    for prefix, mlp in mlps.items():
        sets = None
        for name, x in mlp.items():
            y = np.repeat(x[None], num_experts, axis=0)
            if drop_fraction:
                unit_axis = 0 if name == "down_proj" else 1
                sets = sets or drop_sets(path_key(key, prefix, "drop_upcycling"), num_experts, x.shape[unit_axis],
                                         drop_fraction)
                for e, s in enumerate(sets):
                    np.moveaxis(y[e], unit_axis, 0)[s] = 0
            out[f"{prefix}.experts.{name}"] = y
        name, x = next(iter(mlp.items()))
        d = x.shape[1] if name == "down_proj" else x.shape[0]  # gate/up (D, F), down (F, D)
        out[f"{prefix}.router.kernel"] = np.zeros((d, num_experts), x.dtype)
    return out


def upcycle(model, *, num_experts: int, num_experts_per_tok: int = 2, router: str = "topk_softmax",
            router_init: str = "normal", drop_fraction: float = 0.0, key=None):
    """A Mixtral-style MoE copy of a dense llama-family model (module docstring: the math and what is exact).

    num_experts E >= 2 experts per layer, num_experts_per_tok k in 1..E chosen per token; router: "topk_softmax"
    (exact) or "softmax_topk" (scales the MLP by the top-k probability mass); router_init: "normal" (default:
    N(0, 0.02^2) from key, so the experts diverge in training; exact with topk_softmax) or "zeros" (no key; the
    symmetric saddle: the experts stay identical); drop_fraction: Drop-Upcycling's re-initialised fraction
    (needs key; 0 = plain copies). The dense model must have no MLP biases (SparseMoE's experts have none).
    Returns a new consistent model (models.rebuild) without expert capacity (router_capacity_factor None, whatever
    the dense config holds: a capacity drops tokens, and the upcycled model would not be exact; set one afterwards
    with models.rebuild(moe, {"router_capacity_factor": cf}) to train with it); the input is not modified. to_hf
    writes it as MixtralForCausalLM, which cannot express q/k/v biases (a Qwen2-style model upcycles and runs, but
    exports only to orbax)."""
    cfg = llama_config(model, "upcycle")
    if cfg.num_experts:
        raise GrowthError(f"upcycle: the model is already a mixture of {cfg.num_experts} experts; upcycle takes a "
                          "dense model")
    if not is_int(num_experts) or num_experts < 2:
        raise GrowthError(f"upcycle: num_experts must be an int >= 2, got {num_experts!r}")
    if not is_int(num_experts_per_tok) or not 1 <= num_experts_per_tok <= num_experts:
        raise GrowthError(f"upcycle: num_experts_per_tok must be an int in 1..{num_experts}, "
                          f"got {num_experts_per_tok!r}")
    if router not in ROUTERS:
        raise GrowthError(f"upcycle: router={router!r} is unknown; choose one of {list(ROUTERS)}")
    if router_init not in ROUTER_INITS:
        raise GrowthError(f"upcycle: router_init={router_init!r} is unknown; choose one of {list(ROUTER_INITS)}")
    drop_fraction = check_fraction(drop_fraction, "drop_fraction", "upcycle")
    if cfg.mlp_bias:
        raise GrowthError("upcycle: the model has MLP biases (mlp_bias=True) but SparseMoE experts have none")
    if router_init == "normal" or drop_fraction:
        why = " and ".join((["router_init='normal'"] if router_init == "normal" else [])
                           + ([f"drop_fraction={drop_fraction}"] if drop_fraction else []))
        key = check_key(key, "upcycle", why)
    params = flat_params(model)
    out, mlps = {}, {}
    for path, x in params.items():
        m = _MLP.match(path)
        if m:
            mlps.setdefault(m.group(1), {})[m.group(2)] = x
        else:
            out[path] = x
    for prefix, mlp in mlps.items():
        gate, up, down = mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]
        if drop_fraction:
            gate, up, down = drop_reinit(gate, up, down, num_experts, drop_fraction,
                                         path_key(key, prefix, "drop_upcycling"))
        else:
            gate, up, down = (jnp.broadcast_to(w, (num_experts,) + w.shape) for w in (gate, up, down))
        out[f"{prefix}.experts.gate_proj"], out[f"{prefix}.experts.up_proj"] = jnp.asarray(gate), jnp.asarray(up)
        out[f"{prefix}.experts.down_proj"] = jnp.asarray(down)
        shape, dtype = (cfg.hidden_size, num_experts), gate.dtype
        out[f"{prefix}.router.kernel"] = jnp.asarray(
            np.zeros(shape, dtype) if router_init == "zeros" else
            (INIT_STD * normal(path_key(key, prefix, "router"), shape)).astype(dtype))
    # no expert capacity: a capacity drops the assignments over it (uneven under a random router), so the MoE would
    # not compute the dense function; a dense config's router_capacity_factor (inert there) is not carried over
    changes = {"num_experts": int(num_experts), "num_experts_per_tok": int(num_experts_per_tok), "router": router,
               "architecture": "MixtralForCausalLM", "router_capacity_factor": None}
    return rebuild(model, changes, params=out)
