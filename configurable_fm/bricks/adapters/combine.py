"""Combining adapters of one base model into one adapter: PEFT's `add_weighted_adapter`, and an exact alternative.

    m = combine([m1, m2], [0.7, 0.4], "cat")                           # PEFT's semantics (PEFT's default: 'svd')
    m = combine([m1, m2], [1.0, 1.0], "ties", density=0.5)
    m = combine([m1, m2], [1.0, 1.0], "dare_linear", density=0.5, key=jax.random.key(0))
    m, report = combine_exact([m1, m2], [0.7, 0.4], rank=8)           # Σ w_i ΔW_i, re-factorised by SVD
    m, report = combine_exact([m1, m2], [1.0, 1.0], rank=8, method="ties", parameters={"density": 0.5},
                              merge=configurable_fm.ops.merge.merge_deltas)
    report.relative_error        # {module path: ||ΔW − ΔW_k||_F / ||ΔW||_F}
    adapters.merge(m); adapters.save_adapter(m, "out/c"); to_peft(m, "out/peft")   # an adapted model like any

Inputs are models with adapters attached to the same base (from `attach`, `from_peft`, `load_adapter`), or their
adapter state as brick sets (`adapter_bricks(m)`, `load_bricks(dir)`) together with `base=`. Every input must
adapt the same modules, unmerged, with the same base weights; `combine` needs one kind everywhere, `combine_exact`
takes any mix of LoRA, DoRA and IA3. The result is the first input's base with one LoRA adapter per module (scale
1: alpha = rank; IA3 for `combine` of IA3 inputs); inputs are never modified.

Notation, per adapted module (our kernels are (in, out), `y = x W`): adapter i has a_i (in, r_i), b_i (r_i, out)
and scale s_i (alpha / r, or alpha / sqrt(r) with rsLoRA); its update is ΔW_i = s_i a_i b_i (in, out). PEFT's
tensors are the transposes: lora_A = a_iᵀ (r, in), lora_B = b_iᵀ (out, r), ΔW_torch = s_i B_i A_i (out, in).
Weights w_1..w_N (one per input; one input needs none: w = 1).

`combine`: PEFT 0.21.2's LoraModel.add_weighted_adapter (and IA3Model's), combination by combination:

    cat        a' = [w_1 s_1 a_1 | ... | w_N s_N a_N] (in, Σ r_i),  b' = [b_1; ...; b_N] (Σ r_i, out)
               ΔW' = a' b' = Σ_i w_i ΔW_i exactly, at rank Σ r_i.
    linear, ties, dare_linear, dare_ties, magnitude_prune  (factor by factor; the ranks must be equal, r)
               c_i = w_i s_i,  α_i = sign(c_i) sqrt|c_i|,  β_i = sqrt|c_i|
               a' = F(a_1..a_N; α)  (in, r),   b' = F(b_1..b_N; β)  (r, out)
               so for linear  ΔW' = (Σ_i α_i a_i)(Σ_j β_j b_j) = Σ_i c_i a_i b_i + Σ_{i≠j} α_i β_j a_i b_j:
               NOT the weighted sum of the updates (the cross terms a_i b_j remain; equal for N = 1 only).
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd  (on the products)
               M = F(ΔW_1..ΔW_N; w) in PEFT's (out, in) orientation, M = U S Vᵀ (SVD), k = svd_rank (default:
               the largest r_i; k <= min(in, out)):  lora_B' = U_k S_k (out, k),  lora_A' = V_kᵀ (k, in);
               with svd_clamp q: h = quantile_q(entries of lora_B' and lora_A') (linear interpolation, as
               torch.quantile), both clamped to [−h, h]. Ours: a' = V_k (in, k), b' = (U_k S_k)ᵀ (k, out).

F is PEFT's merge_utils over a stack of same-shape tensors x_1..x_N with weights λ (`peft_merge`):

    linear / svd (task_arithmetic)    F = Σ_i λ_i x_i
    magnitude_prune                   F = Σ_i λ_i P(x_i),   P keeps the k = int(d·n) largest |x| of the tensor's
                                      n entries (k = 0 keeps none; density d >= 1 keeps all)
    dare_linear                       F = Σ_i λ_i D(x_i),   D(x) = m ⊙ x / d, m ~ Bernoulli(d) per entry
    ties / dare_ties                  x̂_i = P(x_i) (ties) or D(x_i) (dare_ties); σ = +1 where Σ_i x̂_i >= 0 (else
                                      −1) with majority_sign_method 'total', Σ_i sign(x̂_i) >= 0 with 'frequency';
                                      M_i = [sign(x̂_i) = σ];  F = Σ_i λ_i M_i x̂_i / max(1, Σ_i M_i)

The combined adapter has scale 1 at every module (PEFT's new config: r = lora_alpha = its rank). One input is
always combined 'linear' (PEFT's rule), whatever `combination` says. IA3 adapters (PEFT's IA3Model's method, no
combination types): l' = Σ_i w_i l_i, combination 'linear' only, the same feedforward side in every input.

Deviations from PEFT 0.21.2, on purpose:
* rsLoRA: PEFT copies use_rslora from the first adapter into the new config, so its combined adapter computes
  sqrt(R)·ΔW' (scale R / sqrt(R)); a bug, fixed upstream (huggingface/peft#3449). Here the scale is 1, as intended;
  the factors are PEFT's.
* DARE's random drop uses jax.random with an explicit `key` (per module, factor and input: fold_in(fold_in(key,
  crc32(path/factor)), i)): the same distribution as torch.bernoulli, never the same draws.
* SVD: torch's LAPACK picks the sign of each singular pair arbitrarily; ours are normalised (the entry of largest
  |·| of each column of U is positive), so the factors equal PEFT's up to the sign of each rank-one component
  and the product (and the model) is the same; with svd_clamp the quantile may then differ.
* Ties in magnitude (magnitude_prune, ties) keep the lower flat index in PEFT's orientation of the factors
  (lora_A (r, in), lora_B (out, r)) and in (out, in) for the products (torch.topk's order among equal values is
  unspecified).
* PEFT combines adapters that target different modules (an input that lacks a module is left out there) and
  silently mishandles DoRA (the new adapter keeps a freshly initialised magnitude; huggingface/peft#3761):
  both are AdapterErrors here; combine_exact combines DoRA adapters by their weight changes.

`combine_exact`: ΔW_i as each adapter's actual change of the kernel (LoRA: s_i a_i b_i; DoRA, IA3: merged −
base), combined with a merge method (default task_arithmetic: ΔW = Σ_i w_i ΔW_i; 'linear': divided by Σ_i w_i;
any task-vector method of configurable_fm.ops.merge through `merge=merge_deltas`, which the caller passes because
bricks sit below ops in the layer order), then the best rank-k approximation ΔW ≈ a' b' (truncated SVD,
Eckart–Young; a' = U_k Σ_k^½, b' = Σ_k^½ V_kᵀ), with the relative Frobenius error ||ΔW − a'b'||_F / ||ΔW||_F
of every module in the returned CombineReport.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.adapters.core import adapted_modules, check_mergeable, detach
from configurable_fm.bricks.adapters.experts import refuse_expert_loras
from configurable_fm.bricks.adapters.io import attach_bricks
from configurable_fm.bricks.adapters.modules import AdaptedLinear, AdapterError, AdapterParam
from configurable_fm.bricks.brickset import BrickSet
from configurable_fm.bricks.deltas import Delta, Dense, low_rank
from configurable_fm.bricks.paths import flat_state
from configurable_fm.checks import is_finite_real, is_int, is_real
from configurable_fm.interop.peft import attach_built

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_COMBINATIONS = tuple(c for c in COMBINATIONS if c.endswith("svd"))
DENSITY_COMBINATIONS = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude_prune")))
ELECTION_COMBINATIONS = tuple(c for c in COMBINATIONS if "ties" in c)
MAJORITY_SIGN_METHODS = ("total", "frequency")
# peft_merge's rules: PEFT's merge_utils functions (task_arithmetic is PEFT's name for 'linear' and 'svd').
RULES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
EXACT_NATIVE = ("task_arithmetic", "linear")  # combine_exact's methods that need no `merge` engine
_MAX_LISTED = 8


# ------------------------------------------------------------------------------------------ PEFT's merge_utils
def _rule(combination: str) -> str:
    """The merge_utils function of a combination type."""
    name = combination[:-len("_svd")] if combination.endswith("_svd") else combination
    return "task_arithmetic" if name in ("linear", "svd") else name


def _magnitude_prune(x: jax.Array, k: int | None) -> jax.Array:
    """PEFT's magnitude_based_pruning: x ⊙ mask of the k largest |x| (ties: lower flat index); None: all."""
    if k is None:
        return x
    n = int(x.size)
    if k == 0:
        return x * jnp.zeros_like(x)
    _, idx = jax.lax.top_k(jnp.abs(x).reshape(-1), k)
    mask = jnp.zeros((n,), x.dtype).at[idx].set(1.0)
    return x * mask.reshape(x.shape)


def _random_prune(x: jax.Array, density: jax.Array, key: jax.Array) -> jax.Array:
    """PEFT's random_pruning with rescale: (x ⊙ m) / d, m ~ Bernoulli(d) per entry (for d < 1)."""
    mask = jax.random.bernoulli(key, density, x.shape).astype(x.dtype)
    return (x * mask) / density.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("rule", "keep", "majority_sign_method"))
def _merge_core(stack, lam, density, keys, *, rule: str, keep: int | None, majority_sign_method: str):
    """peft_merge on stack (N, *S) float32 with weights lam (N,), the density (dare) and keys (N,) (dare), the
    count `keep` of magnitude pruning (None: no pruning; static, so that one compilation serves every density
    with the same count) -> (*S) float32."""
    n = stack.shape[0]
    xs = [stack[i] for i in range(n)]
    if rule in ("magnitude_prune", "ties"):
        xs = [_magnitude_prune(x, keep) for x in xs]
    elif keys is not None:
        xs = [_random_prune(x, density, keys[i]) for i, x in enumerate(xs)]
    stack = jnp.stack(xs)
    weighted = stack * lam.reshape((n,) + (1,) * (stack.ndim - 1))
    if rule not in ("ties", "dare_ties"):
        return jnp.sum(weighted, axis=0)
    sign = jnp.sign(stack)
    stat = jnp.sum(stack if majority_sign_method == "total" else sign, axis=0)
    agree = sign == jnp.where(stat >= 0, 1.0, -1.0)
    mixed = jnp.sum(weighted * agree, axis=0)
    return mixed / jnp.maximum(jnp.sum(agree.astype(jnp.float32), axis=0), 1.0)


def peft_merge(xs: Sequence[jax.Array], weights: Sequence[float], rule: str = "task_arithmetic", *,
               density: float | None = None, majority_sign_method: str = "total",
               key: jax.Array | None = None) -> jax.Array:
    """One of PEFT's merge_utils functions on same-shape tensors x_1..x_N (float32) with weights λ (module
    docstring: F). rule: 'task_arithmetic' | 'ties' | 'dare_linear' | 'dare_ties' | 'magnitude_prune'.

    PEFT's semantics, which differ from the mergekit methods of the same names in ops.merge: ties divides by the
    number of agreeing entries (not their weights) and elects the sign on the unweighted tensors; pruning keeps
    int(d·n) entries (not max(1, ·)); DARE rescales by 1/d (not an L1 ratio). The dare rules draw x_i's mask
    from fold_in(key, i). Returns float32 of the tensors' shape (jitted per rule, kept count and shape)."""
    if rule not in RULES:
        raise AdapterError(f"peft_merge: unknown rule {rule!r}; the rules are {list(RULES)}")
    n = len(xs)
    if n == 0 or len(weights) != n:
        raise AdapterError(f"peft_merge: {len(weights)} weight(s) for {n} tensor(s)")
    if rule != "task_arithmetic" and density is None:
        raise AdapterError(f"peft_merge: rule {rule!r} needs a density")
    random = rule in ("dare_linear", "dare_ties") and density < 1
    if random and key is None:
        raise AdapterError(f"peft_merge: rule {rule!r} drops entries at random and needs key= (a jax PRNG key)")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise AdapterError(f"peft_merge: majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, got "
                           f"{majority_sign_method!r}")
    stack = jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
    lam = jnp.asarray(np.asarray(weights, np.float64).astype(np.float32))  # torch.tensor(weights): float32
    keys = jnp.stack([jax.random.fold_in(key, i) for i in range(n)]) if random else None
    pruned = rule in ("magnitude_prune", "ties") and density < 1
    keep = int(float(density) * int(np.prod(stack.shape[1:]))) if pruned else None  # int(d·n) in Python, as PEFT
    return _merge_core(stack, lam, jnp.float32(1.0 if density is None else density), keys, rule=rule, keep=keep,
                       majority_sign_method=majority_sign_method)


@functools.partial(jax.jit, static_argnames=("k", "clamp"))
def _svd_factors(m_t: jax.Array, k: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """PEFT's SVD step on M (out, in): (lora_A' = V_kᵀ (k, in), lora_B' = U_k S_k (out, k)), the sign of each
    singular pair fixed (module docstring), optionally clamped at the `clamp` quantile."""
    u, s, vt = jnp.linalg.svd(m_t, full_matrices=False)
    u, s, vt = u[:, :k], s[:k], vt[:k]
    pivot = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None, :], axis=0)[0]
    flip = jnp.where(pivot < 0, -1.0, 1.0).astype(u.dtype)
    b_t, a_t = (u * flip[None, :]) * s[None, :], vt * flip[:, None]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b_t.reshape(-1), a_t.reshape(-1)]), clamp)
        b_t, a_t = jnp.clip(b_t, -hi, hi), jnp.clip(a_t, -hi, hi)
    return a_t, b_t


# ------------------------------------------------------------------------------------------ inputs
def _few(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _weights(weights, n: int, what: str) -> list[float]:
    if weights is None:
        if n == 1:
            return [1.0]
        raise AdapterError(f"{what}: give one weight per adapter ({n} adapters, no weights)")
    try:
        ws = list(weights)
    except TypeError:
        raise AdapterError(f"{what}: weights must be a list of numbers, got {weights!r}") from None
    bad = [w for w in ws if not is_real(w)]
    if bad:
        raise AdapterError(f"{what}: weights must be numbers, got {bad[:4]}")
    if len(ws) != n:
        raise AdapterError(f"{what}: {len(ws)} weight(s) for {n} adapter(s); give one weight per adapter")
    bad = [w for w in ws if not math.isfinite(float(w))]
    if bad:
        raise AdapterError(f"{what}: weights must be finite, got {bad}")
    return [float(w) for w in ws]


def _as_model(x, base, i: int, what: str):
    if isinstance(x, BrickSet):
        if base is None:
            raise AdapterError(f"{what}: input {i} is a brick set (adapter state without its base model); pass "
                               "base= (the model the adapters were trained on)")
        return attach_bricks(base, x)
    if isinstance(x, nnx.Module):
        return x
    raise AdapterError(f"{what}: input {i} is a {type(x).__name__}; give models with adapters attached (attach, "
                       "from_peft, load_adapter) or their adapter_bricks with base=")


def _base_params(model) -> dict[str, jax.Array]:
    """The base model's parameters of an adapted model (the adapters' own leaves left out), by path."""
    return {k: v.get_value() for k, v in flat_state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))).items()}


def _same_base(models: list, what: str) -> None:
    """AdapterError naming the first parameters where an input's base differs from input 0's."""
    ref = _base_params(models[0])
    for i, m in enumerate(models[1:], 1):
        other = _base_params(m)
        if list(other) != list(ref):
            extra = [p for p in other if p not in ref] + [p for p in ref if p not in other]
            raise AdapterError(f"{what}: input {i}'s base model has other parameters than input 0's "
                               f"({_few(extra, 4)}); combine adapters of one base model")
        differ = [p for p, v in ref.items() if other[p] is not v and (
            tuple(np.shape(other[p])) != tuple(np.shape(v)) or not bool(jnp.array_equal(other[p], v)))]
        if differ:
            raise AdapterError(f"{what}: input {i}'s base weights differ from input 0's at {_few(differ, 4)}; "
                               "combine adapters of one base model")


def _inputs(inputs, base, what: str, *, one_kind: bool = True
            ) -> tuple[nnx.Module, list[dict[str, AdaptedLinear]]]:
    """(the common base model, [{module path: adapted module}] per input), every structural check done; with
    `one_kind`, every adapter of every input has the same kind."""
    if isinstance(inputs, (nnx.Module, BrickSet)) or not isinstance(inputs, Sequence) or not inputs:
        raise AdapterError(f"{what}: give a non-empty list of adapted models (or adapter brick sets with base=)")
    models = [_as_model(x, base, i, what) for i, x in enumerate(inputs)]
    modules = []
    for i, m in enumerate(models):
        refuse_expert_loras(m, f"{what}: input {i}")
        found = adapted_modules(m)
        if not found:
            raise AdapterError(f"{what}: input {i} has no adapters (attach them with bricks.adapters.attach or "
                               "from_peft)")
        merged = [p for p, a in found.items() if a.merged]
        if merged:
            raise AdapterError(f"{what}: input {i} has merged adapters at {_few(merged, 4)}; unmerge them first "
                               "(bricks.adapters.unmerge)")
        check_mergeable(found, f"{what}: input {i}")  # bottleneck adapters have no weight change to combine
        modules.append(found)
    ref = list(modules[0])
    for i, found in enumerate(modules[1:], 1):
        if set(found) != set(ref):
            only_i = [p for p in found if p not in modules[0]]
            only_0 = [p for p in ref if p not in found]
            parts = ([f"input {i} adapts {_few(only_i, 4)}, which input 0 does not"] if only_i else []) + \
                    ([f"input 0 adapts {_few(only_0, 4)}, which input {i} does not"] if only_0 else [])
            raise AdapterError(f"{what}: the adapters target different modules: " + "; ".join(parts)
                               + " (combine adapters of the same target modules)")
    for i, found in enumerate(modules if one_kind else ()):
        kinds = sorted({a.kind for a in found.values()})
        if len(kinds) > 1:
            by_kind = {k: [p for p, a in found.items() if a.kind == k] for k in kinds}
            raise AdapterError(f"{what}: input {i} mixes adapter kinds {kinds} ("
                               + "; ".join(f"{k} at {_few(v, 2)}" for k, v in by_kind.items())
                               + "); one adapter has one kind")
    kinds = [next(iter(found.values())).kind for found in modules]
    if one_kind and len(set(kinds)) > 1:
        raise AdapterError(f"{what}: adapters of different kinds cannot be combined: "
                           + ", ".join(f"input {i} is {k}" for i, k in enumerate(kinds)))
    _same_base(models, what)
    return detach(models[0]), [{p: found[p] for p in ref} for found in modules]


def _lora_spec(path: str, a, b) -> dict:
    """An attach_built spec of a LoRA module with factors a (in, k), b (k, out) and scale 1 (alpha = k)."""
    k = int(a.shape[1])
    return {"path": path, "kind": "lora", "options": {"rank": k, "alpha": float(k), "rslora": False,
                                                       "merged": False},
            "values": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}


def _number(value, name: str, what: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if not is_finite_real(value) or value < lo or value > hi or (lo_open and value == lo):
        where = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise AdapterError(f"{what}: {name} must be a number in {where}, got {value!r}")
    return float(value)


def _factor_key(key, path: str, factor: str):
    return None if key is None else jax.random.fold_in(key, np.uint32(zlib.crc32(f"{path}/{factor}".encode())))


# ------------------------------------------------------------------------------------------ PEFT's combination
def check_options(combination: str, *, density=None, majority_sign_method: str = "total", svd_rank=None,
                  svd_clamp=None, key=None, what: str | None = None) -> tuple[float | None, float | None]:
    """The options of `combine` checked against the combination, before any work (a command line calls it before
    loading models): (density, svd_clamp) as floats; AdapterError naming the option otherwise. `key` only needs
    to be given (not None) for the dare combinations at density < 1."""
    what = what or f"combine(combination={combination!r})"
    if combination not in COMBINATIONS:
        raise AdapterError(f"combine: unknown combination {combination!r}; the combinations are "
                           f"{list(COMBINATIONS)} (PEFT's add_weighted_adapter combination types)")
    if density is not None and combination not in DENSITY_COMBINATIONS:
        raise AdapterError(f"{what}: density applies to {list(DENSITY_COMBINATIONS)}, not to {combination!r}")
    if combination in DENSITY_COMBINATIONS:
        if density is None:
            raise AdapterError(f"{what}: needs density= (the fraction of entries kept, in [0, 1])")
        density = _number(density, "density", what, 0.0, 1.0, lo_open=combination.startswith("dare"))
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise AdapterError(f"{what}: majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, got "
                           f"{majority_sign_method!r}")
    if majority_sign_method != "total" and combination not in ELECTION_COMBINATIONS:
        raise AdapterError(f"{what}: majority_sign_method applies to {list(ELECTION_COMBINATIONS)}, not to "
                           f"{combination!r}")
    for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
        if value is not None and combination not in SVD_COMBINATIONS:
            raise AdapterError(f"{what}: {name} applies to {list(SVD_COMBINATIONS)}, not to {combination!r}")
    if svd_rank is not None and (not is_int(svd_rank) or svd_rank < 1):
        raise AdapterError(f"{what}: svd_rank must be an int >= 1, got {svd_rank!r}")
    if svd_clamp is not None:
        svd_clamp = _number(svd_clamp, "svd_clamp", what, 0.0, 1.0)
    if combination.startswith("dare") and density < 1 and key is None:
        raise AdapterError(f"{what}: DARE drops entries at random; pass key= (a jax PRNG key, e.g. "
                           "jax.random.key(0))")
    return density, svd_clamp


def combine(inputs: Sequence[Any], weights: Sequence[float] | None = None, combination: str = "svd", *,
            density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
            svd_clamp: float | None = None, key: jax.Array | None = None, base: nnx.Module | None = None
            ) -> nnx.Module:
    """One adapter from several, as PEFT's add_weighted_adapter(adapters, weights, combination_type=...): the base
    with a LoRA adapter per module (IA3 for IA3 inputs), scale 1 (module docstring: the math per combination,
    and the deliberate deviations from PEFT 0.21.2).

    inputs: adapted models of one base (or adapter brick sets with `base`), the same modules, LoRA (rsLoRA
      included; ranks and alphas may differ per module and input) or all IA3. weights: one number per input
      (negative allowed; None for one input: 1). combination: one of COMBINATIONS (default 'svd', as PEFT).
    density: the kept fraction for the ties / dare / magnitude_prune combinations, in [0, 1] ((0, 1] for dare,
      whose 1/d rescale PEFT divides by zero at 0); 1 keeps all. majority_sign_method: 'total' | 'frequency'
      (the ties combinations). svd_rank: the rank k of the svd combinations (default the largest rank of any
      input module, which is PEFT 0.22's max(r, *rank_pattern.values()) over the inputs' configs unless a
      rank_pattern lowers every module below its config's r: that r is not kept here, so pass svd_rank=r to
      match PEFT there; <= min(in, out) of every module); svd_clamp: the quantile in [0, 1] for clamping their
      factors. key: a jax PRNG key, required by the dare combinations (density < 1).
    Shapes: a' (in, k), b' (k, out) per module, k = Σ r_i (cat), r (factor-wise), svd_rank (svd).
    AdapterError (nothing built) for: an unknown combination; options that the combination does not use, or bad
    values of them; a weights count that is not the number of inputs; inputs that adapt different modules,
    mix kinds, have merged adapters or different base weights; DoRA adapters (no PEFT combination combines
    their magnitudes: use combine_exact); IA3 adapters with a combination other than 'linear'; unequal ranks at a
    module for a factor-wise combination; svd_rank above min(in, out) of a module.
    """
    what = f"combine(combination={combination!r})"
    density, svd_clamp = check_options(combination, density=density, majority_sign_method=majority_sign_method,
                                       svd_rank=svd_rank, svd_clamp=svd_clamp, key=key)
    base_model, modules = _inputs(inputs, base, what)
    ws = _weights(weights, len(modules), what)
    kind = next(iter(modules[0].values())).kind
    paths = list(modules[0])
    if kind == "dora":
        raise AdapterError(f"{what}: the inputs are DoRA adapters; PEFT's add_weighted_adapter combines the LoRA "
                           "factors only and would keep the new adapter's freshly initialised magnitude, so no PEFT "
                           "combination supports DoRA. combine_exact combines their weight changes (merged − base)")
    if len(modules) == 1:
        combination = "linear"  # PEFT: a single adapter is always combined linearly
    if kind == "ia3":
        if combination != "linear":
            raise AdapterError(f"{what}: the inputs are IA3 adapters, which combine with 'linear' only (PEFT's "
                               "IA3Model.add_weighted_adapter: l = Σ_i w_i l_i)")
        flips = [f"{p} (input {i})" for p in paths for i, mods in enumerate(modules)
                 if mods[p].feedforward != modules[0][p].feedforward]
        if flips:
            raise AdapterError(f"{what}: the IA3 adapters scale different sides (feedforward: inputs, else "
                               f"outputs) at {_few(flips, 4)}; combine adapters of one IA3 configuration")
        specs = [{"path": p, "kind": "ia3", "options": {"feedforward": modules[0][p].feedforward, "merged": False},
                  "values": {"ia3_scale": peft_merge([mods[p].ia3_scale[...] for mods in modules], ws)}}
                 for p in paths]
        return attach_built(base_model, specs)
    if combination in FACTORWISE:
        unequal = [f"{p} has ranks {r}" for p in paths for r in [[mods[p].rank for mods in modules]]
                   if len(set(r)) > 1]
        if unequal:
            raise AdapterError(f"{what}: combines the factors entry by entry and needs equal ranks at every module, "
                               f"but {_few(unequal, 4)} (inputs in order); use 'cat', an '*_svd' combination or "
                               "combine_exact")
    if combination in SVD_COMBINATIONS:
        k = int(svd_rank) if svd_rank is not None else max(m.rank for mods in modules for m in mods.values())
        small = [f"{p} ({modules[0][p].in_features} -> {modules[0][p].out_features})" for p in paths
                 if k > min(modules[0][p].in_features, modules[0][p].out_features)]
        if small:
            raise AdapterError(f"{what}: svd_rank={k} exceeds min(in, out) of {_few(small, 4)}; choose svd_rank <= "
                               f"{min(min(modules[0][p].in_features, modules[0][p].out_features) for p in paths)}")
    rule = _rule(combination)
    specs = []
    for p in paths:
        mods = [m[p] for m in modules]
        if combination == "cat":
            f32 = np.float32
            a = jnp.concatenate([(m.lora_a[...].astype(jnp.float32) * f32(w)) * f32(m.scale)
                                 for m, w in zip(mods, ws)], axis=1)
            b = jnp.concatenate([m.lora_b[...].astype(jnp.float32) for m in mods], axis=0)
        elif combination in FACTORWISE:
            c = [w * m.scale for m, w in zip(mods, ws)]
            alpha = [math.sqrt(abs(ci)) * (1.0 if ci >= 0 else -1.0) for ci in c]  # the sign on A only
            beta = [math.sqrt(abs(ci)) for ci in c]
            options = dict(density=density, majority_sign_method=majority_sign_method)
            a_t = peft_merge([m.lora_a[...].T for m in mods], alpha, rule, key=_factor_key(key, p, "lora_A"),
                             **options)
            b_t = peft_merge([m.lora_b[...].T for m in mods], beta, rule, key=_factor_key(key, p, "lora_B"),
                             **options)
            a, b = a_t.T, b_t.T
        else:
            products = [m.low_rank().materialize(jnp.float32).T for m in mods]  # s_i B_i A_i (out, in)
            m_t = peft_merge(products, ws, rule, density=density, majority_sign_method=majority_sign_method,
                             key=_factor_key(key, p, "delta"))
            a_t, b_t = _svd_factors(m_t, k, svd_clamp)
            a, b = a_t.T, b_t.T
        specs.append(_lora_spec(p, a, b))
    return attach_built(base_model, specs)


# ------------------------------------------------------------------------------------------ the exact combination
@dataclasses.dataclass(frozen=True)
class CombineReport:
    """What combine_exact did, per module path: the rank of the combined adapter, the relative truncation error
    ||ΔW − a'b'||_F / ||ΔW||_F (0 for a zero ΔW) and ||ΔW||_F of the combined change."""

    method: str
    weights: tuple[float, ...]
    rank: dict[str, int]
    relative_error: dict[str, float]
    norm: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)

    def to_dict(self) -> dict:
        """JSON data: the fields plus max_error."""
        return {"method": self.method, "weights": list(self.weights), "max_error": self.max_error,
                "rank": dict(self.rank), "relative_error": dict(self.relative_error), "norm": dict(self.norm)}


def _changes(modules: list[dict[str, AdaptedLinear]], what: str) -> list[Delta]:
    """Each input's kernel changes {<module>.kernel: LowRank | Dense} as a Delta; AdapterError for a bias change."""
    out, problems = [], []
    for i, mods in enumerate(modules):
        terms = {}
        for p, m in mods.items():
            change = m.weight_change()
            if "bias" in change:
                problems.append(f"{p} (input {i}, {m.kind})")
            terms[f"{p}.kernel"] = change["kernel"]
        out.append(Delta(terms, kind="adapter", source=f"input_{i}"))
    if problems:
        raise AdapterError(f"{what}: the adapters at {_few(problems, 4)} also change the bias (an output-side IA3 "
                           "adapter scales it), which a LoRA adapter cannot hold; combine them with combine() "
                           "(IA3 'linear') or merge them instead")
    return out


def combine_exact(inputs: Sequence[Any], weights: Sequence[float] | None = None, *, rank: int | None = None,
                  method: str = "task_arithmetic", parameters: Mapping[str, Any] | None = None,
                  merge: Callable[..., Delta] | None = None, seed: int = 0, base: nnx.Module | None = None
                  ) -> tuple[nnx.Module, CombineReport]:
    """The exact alternative to `combine`: combine the updates themselves, then re-factorise (module docstring).

    Per module p (kernel (in, out)): ΔW_i = the change adapter i makes to the kernel (LoRA/rsLoRA: s_i a_i b_i;
    DoRA and IA3: merged − base, float32), then
        task_arithmetic (default)   ΔW = Σ_i w_i ΔW_i
        linear                      ΔW = Σ_i w_i ΔW_i / Σ_i w_i
        any other method            ΔW = merge(method, [ΔW_1..ΔW_N], parameters=parameters,
                                               model_parameters=[{"weight": w_i}], seed=seed)[p.kernel]
    with `merge` = configurable_fm.ops.merge.merge_deltas (or a function of its signature; bricks cannot import
    ops, so the caller passes it): mergekit's task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, della,
    ... on the updates (randomised ones draw from tensor_key(seed, path); sce takes no weights). Then the truncated SVD
    ΔW ≈ a' b', a' = U_k Σ_k^½ (in, k), b' = Σ_k^½ V_kᵀ (k, out), k = min(rank, in, out); rank default Σ_i r_i
    (min(in, out) for a DoRA / IA3 input), which reproduces task_arithmetic and linear up to float rounding.
    Returns (the base with a LoRA adapter of scale 1 per module, CombineReport with the relative Frobenius
    truncation error per module). Inputs as for `combine`, but the kinds may differ (the changes are what is
    combined). AdapterError for: inputs that differ (targets, bases) or have merged adapters; a weights count
    that is not the number of inputs; a bad rank; a method other than task_arithmetic / linear without `merge`;
    parameters for a native method; an output-side IA3 adapter with a bias (a bias change is not low rank); a
    `merge` result that does not cover the modules' kernels.
    """
    what = f"combine_exact(method={method!r})"
    if not isinstance(method, str) or not method:
        raise AdapterError(f"combine_exact: method must be a merge method name, got {method!r}")
    if rank is not None and (not is_int(rank) or rank < 1):
        raise AdapterError(f"{what}: rank must be an int >= 1 (or None: the sum of the input ranks), got {rank!r}")
    if merge is None and method not in EXACT_NATIVE:
        raise AdapterError(f"{what}: only {list(EXACT_NATIVE)} are built in; for {method!r} pass merge="
                           "configurable_fm.ops.merge.merge_deltas (the task-vector methods of ops.merge)")
    if merge is None and parameters:
        raise AdapterError(f"{what}: parameters {sorted(parameters)} need merge= (ops.merge.merge_deltas); the "
                           f"built-in {method!r} takes none")
    if merge is not None and not callable(merge):
        raise AdapterError(f"{what}: merge must be a function like ops.merge.merge_deltas, got {merge!r}")
    base_model, modules = _inputs(inputs, base, what, one_kind=False)
    ws = _weights(weights, len(modules), what)
    paths = list(modules[0])
    changes = _changes(modules, what)
    if merge is None:
        total = sum(ws)
        if method == "linear" and total == 0:
            raise AdapterError(f"{what}: the weights sum to 0; 'linear' divides by their sum")
        norm = 1.0 / total if method == "linear" else 1.0
        combined = {}
        for p in paths:
            acc = None
            for w, d in zip(ws, changes):
                term = d[f"{p}.kernel"].materialize(jnp.float32) * np.float32(w)
                acc = term if acc is None else acc + term
            combined[p] = acc * np.float32(norm) if method == "linear" else acc
    else:
        engine_method, params = (("task_arithmetic", {**dict(parameters or {}), "normalize": True})
                                 if method == "linear" else (method, dict(parameters or {})))
        merged = merge(engine_method, changes, parameters=params, model_parameters=[{"weight": w} for w in ws],
                       seed=seed)
        if not isinstance(merged, Delta):
            raise AdapterError(f"{what}: merge returned a {type(merged).__name__}, not a bricks.deltas.Delta")
        missing = [f"{p}.kernel" for p in paths if f"{p}.kernel" not in merged]
        misshaped = [f"{p}.kernel is {tuple(merged[f'{p}.kernel'].shape)}" for p in paths
                     if f"{p}.kernel" in merged and tuple(merged[f"{p}.kernel"].shape) != tuple(
                         modules[0][p].kernel.get_value().shape)]
        if missing or misshaped:
            raise AdapterError(f"{what}: the merged delta does not fit the modules: "
                               + "; ".join(([f"no term at {_few(missing, 4)}"] if missing else []) + misshaped[:4]))
        combined = {p: merged[f"{p}.kernel"].materialize(jnp.float32) for p in paths}
    specs, ranks, errors, norms = [], {}, {}, {}
    for p in paths:
        mods = [m[p] for m in modules]
        full = min(mods[0].in_features, mods[0].out_features)
        k = rank if rank is not None else sum(m.rank if m.kind == "lora" else full for m in mods)
        factored = low_rank(Delta({p: Dense(combined[p])}), int(k))
        term = factored[p]
        specs.append(_lora_spec(p, term.a, term.b))
        ranks[p] = term.rank
        errors[p] = float(factored.metadata["low_rank"]["relative_error"][p])
        norms[p] = float(jnp.linalg.norm(combined[p]))
    report = CombineReport(method=method, weights=tuple(ws), rank=ranks, relative_error=errors, norm=norms)
    return attach_built(base_model, specs), report
