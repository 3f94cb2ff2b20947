"""Element-selective merge kernels: nearswap, arcee_fusion, ram, ramplus_tl, and passthrough (with scale).

Each kernel follows mergekit 0.1.5 (``mergekit/merge_methods/<name>.py``) to float32 rounding, in the notation
of shared/research/merging.md section 1.3: base ``b`` (shape ``S``), inputs ``xs`` stacked ``(N, *S)``,
task vectors ``τ_i = x_i - b``, per-model parameters ``(N,)`` float32, shared parameters scalars. Computed and
returned in float32. The kernels are pure and wrapped in ``jax.jit`` (an eager call compiles once per shape; inside
another jit they inline); ``compute_dtype`` and ``arcee_fusion``'s ``sample_size`` are static.

``compute_dtype`` None (the default) is the float32 arithmetic above. ``'float16'`` | ``'bfloat16'`` reproduces
mergekit run in that dtype (precision.py: ``r`` rounds to it after each op torch does in it; inputs are already
representable in it):

* nearswap: d = r(|b − x|) clamped below by r(1e-6); mergekit's ``t / d`` is torch's ``d.reciprocal() * t``, so
  w = r(r(1/d) · t); y = r(r(w x) + r(r(1 − w) b)).
* arcee_fusion: importance, softmaxes, log, KL sum and threshold all in the dtype (every op rounded; the softmax
  and the KL sum rounded once each), so the mask differs from the float32 one; the result is float32, as mergekit's
  (it multiplies by a float32 mask): y = b + r(x − b) · mask, computed in float32 (``result_dtype="float32"``).
  torch's softmax uses its own float32 exp, so about 1 softmax value in 10^4–10^5 rounds the other way; the row's
  KL then moves by an ulp and an entry whose importance lies that close to the threshold may flip.
* ram: τ = r(x − b), |τ| > r(ε), shared entries r(τ / c), y = r(b + r(Σ_i ...)).
* ramplus_tl: τ, the ε test and the shared entries r(τ / c) as in ram; λ_i is float32 (integer counts over a float32
  clamp), so the unique entries τ λ_i, the sum over models and y = b + Σ are float32 and the result is float32,
  as mergekit's (``result_dtype="float32"``; without inputs it returns the base).
* passthrough: y = r(x · scale).

Importing this module registers the methods in ``configurable_fm.ops.merge.registry``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.merge.kernel_inputs import as_f32, check_kernel_inputs
from configurable_fm.ops.merge.precision import Arithmetic
from configurable_fm.ops.merge.registry import REQUIRED, MergeMethod, RowChunks, register

F32 = jnp.float32
ARCEE_FUSION_SAMPLE = 1_000_000  # mergekit's _QUANTILE_SAMPLE_SIZE


# --------------------------------------------------------------------------------------------------- nearswap
@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def nearswap(base, xs, *, key=None, t, compute_dtype=None):
    """NearSwap, mergekit ``nearswap``: take the other model where it is close to the base.

        w = clamp(t / max(|b - x|, 1e-6), 0, 1);   y = w x + (1 - w) b

    (entries within t of the base move fully to x; far ones stay near b). xs (1, *S), t scalar (may be traced).
    compute_dtype: module docstring.
    """
    check_kernel_inputs("nearswap", base, xs, base_use="required", n_min=1, n_max=1)
    a = Arithmetic.of(compute_dtype)
    b = as_f32(base)
    x = as_f32(xs[0])
    t = as_f32(t)
    d = jnp.maximum(a.r(jnp.abs(b - x)), a.r(1e-6))  # torch's clamp rounds its bound to the tensor's dtype
    if a.reduced:
        w = a.r(a.r(1 / d) * t)  # torch's `t / d` for a Python scalar t: d.reciprocal() * t
    else:
        w = t / d
    w = jnp.clip(w, 0.0, 1.0)
    return a.r(a.r(w * x) + a.r(a.r(1 - w) * b))


# ----------------------------------------------------------------------------------------------- arcee_fusion
def _quantile_indices(n: int) -> np.ndarray:
    """mergekit's indices into the sorted values: int(q (n-1)) for q = 0.25, 0.5, 0.75, computed in float32."""
    q = np.array([0.25, 0.5, 0.75], np.float32)
    return (q * np.float32(n - 1)).astype(np.int64)


def arcee_importance(b, x, a: Arithmetic = Arithmetic()):
    """imp = |x - b| · KL(softmax(x) ‖ softmax(b)), softmax and KL over the last axis (1e-8 added to both
    distributions), the per-row KL broadcast over the row. b, x (*S) float32 -> (*S); `a` rounds each torch op."""
    r = a.r
    p = r(r(jax.nn.softmax(x, axis=-1)) + 1e-8)
    q = r(r(jax.nn.softmax(b, axis=-1)) + 1e-8)
    kl = r(jnp.sum(r(p * r(jnp.log(r(p / q)))), axis=-1, keepdims=True))
    return r(r(jnp.abs(x - b)) * kl)


@functools.partial(jax.jit, static_argnames=("sample_size", "compute_dtype"))
def arcee_fusion(base, xs, *, key=None, sample_size: int = ARCEE_FUSION_SAMPLE, compute_dtype=None):
    """Arcee Fusion, mergekit ``arcee_fusion``: keep only the most important changes of the other model.

        imp = |x - b| · KL(softmax(x) ‖ softmax(b))            (per row over the last axis, see arcee_importance)
        q_k = sort(imp)[int(k (n - 1))]  for k = 0.25, 0.5, 0.75  (no interpolation; float32 products)
        y = b + (x - b) · [imp ≥ q_.5 + 1.5 (q_.75 - q_.25)]

    When n = imp.size exceeds ``sample_size`` (mergekit: 10^6, static), the quantiles are taken over
    ``sample_size`` entries drawn uniformly *with replacement* (as mergekit's torch.randint), here with the
    explicit ``key`` (jax.random.randint), so the threshold is reproducible from (seed, tensor path) but not
    bit-equal to mergekit's torch draw; for n ≤ sample_size the result is deterministic and ``key`` unused.
    The threshold is sensitive to rounding: entries with imp within float32 rounding of it may flip.
    xs (1, *S); a 0-d tensor is treated as a 1-element row. compute_dtype: module docstring (the result stays
    float32 in every mode).
    """
    check_kernel_inputs("arcee_fusion", base, xs, base_use="required", n_min=1, n_max=1)
    a = Arithmetic.of(compute_dtype)
    b = as_f32(base)
    x = as_f32(xs[0])
    shape = b.shape
    if b.ndim == 0:
        b, x = b.reshape(1), x.reshape(1)
    imp = arcee_importance(b, x, a)
    flat = imp.reshape(-1)
    n = flat.size
    if n > sample_size:
        if key is None:
            raise ValueError(
                f"arcee_fusion: a tensor of {n} elements (> sample_size={sample_size}) needs a PRNG key to "
                "subsample the importance scores for the quantiles"
            )
        flat = flat[jax.random.randint(key, (sample_size,), 0, n)]
    ordered = jnp.sort(flat)
    q1, median, q3 = (ordered[int(i)] for i in _quantile_indices(flat.size))
    threshold = a.r(median + a.r(1.5 * a.r(q3 - q1)))
    mask = (imp >= threshold).astype(F32)
    return (b + a.r(x - b) * mask).reshape(shape)  # float32: mergekit's mask is a float32 tensor


# -------------------------------------------------------------------------------------------- ram, ramplus_tl
def _ram_parts(b, xs, epsilon, a: Arithmetic):
    """τ (N, n) with entries |τ| ≤ ε zeroed, the nonzero mask (N, n), contributor counts c (n,), and the shared
    entries' averaged part τ [c > 1] / c (N, n), rounded by `a` (torch: a half tensor over an integer one)."""
    tv = a.r(xs - b).reshape(xs.shape[0], -1)
    nonzero = jnp.abs(tv) > a.r(epsilon)  # torch compares with the scalar rounded to the tensor's dtype
    counts = jnp.sum(nonzero, axis=0)
    tv = tv * nonzero
    shared = a.r(a.div(tv * (counts > 1).astype(F32), jnp.maximum(counts, 1).astype(F32)))
    return tv, nonzero, counts, shared


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def ram(base, xs, *, key=None, epsilon: float = 1e-5, compute_dtype=None):
    """Reinforced Agent Merging (arXiv 2601.13572), mergekit ``ram``.

        nz_i = |τ_i| > ε;  c = Σ_i nz_i;  y = b + Σ_i τ_i nz_i ([c = 1] + [c > 1]/c)

    (entries changed by one model are taken whole, entries changed by several are averaged over those).
    xs (N ≥ 0, *S); with no input the base is returned. compute_dtype: module docstring.
    """
    check_kernel_inputs("ram", base, xs, base_use="required", n_min=0)
    a = Arithmetic.of(compute_dtype)
    b = as_f32(base)
    xs = as_f32(xs)
    if xs.shape[0] == 0:
        return b
    tv, _, counts, shared = _ram_parts(b, xs, epsilon, a)
    merged = a.r(jnp.sum(a.r(tv * (counts == 1).astype(F32) + shared), axis=0))
    return a.r(b + merged.reshape(b.shape))


def _overlap_counts(nonzero, counts) -> jax.Array:
    """(#shared_i, #unique_i) (2, N) int32: the entries model i changes that other models change too / alone."""
    return jnp.stack([jnp.sum(nonzero & (counts > 1), axis=1), jnp.sum(nonzero & (counts == 1), axis=1)])


def _ramplus_statistic(chunks, *, epsilon: float = 1e-5, compute_dtype=None, **unused):
    """RowChunks.statistic of ramplus_tl: its tensor-local counts (integers: the same in any order), summed
    over the row blocks."""
    a = Arithmetic.of(compute_dtype)

    def count(acc, b, xs, first):
        _, nonzero, counts, _ = _ram_parts(b, xs, epsilon, a)
        return acc + _overlap_counts(nonzero, counts)

    return {"overlap_counts": chunks.fold(count, jnp.zeros((2, chunks.n_inputs), jnp.int32))}


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def ramplus_tl(base, xs, *, key=None, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5,
               compute_dtype=None, overlap_counts=None, chunk_start=0):
    """RAM+ tensor-local (arXiv 2601.13572), mergekit ``ramplus_tl``: RAM with the unique entries of model i
    scaled by λ_i = 1 + r · clamp(ρ_i, 0, α),  ρ_i = #shared_i / max(#unique_i, ε)  (counted in this tensor):

        y = b + Σ_i τ_i nz_i ([c = 1] λ_i + [c > 1]/c)

    xs (N ≥ 0, *S); r, alpha, epsilon scalars. compute_dtype: module docstring (λ and everything after it stay
    float32, as in mergekit: the result is float32 in every mode). overlap_counts, chunk_start: base and xs
    are a block of rows of a larger tensor (execute.py's row blocks) whose counts (#shared_i, #unique_i)
    (2, N) were taken over the whole tensor (`_ramplus_statistic`).
    """
    del chunk_start  # the counts are all a block needs
    check_kernel_inputs("ramplus_tl", base, xs, base_use="required", n_min=0)
    a = Arithmetic.of(compute_dtype)
    b = as_f32(base)
    xs = as_f32(xs)
    if xs.shape[0] == 0:
        return b
    tv, nonzero, counts, shared = _ram_parts(b, xs, epsilon, a)
    unique = counts == 1
    if overlap_counts is None:
        overlap_counts = _overlap_counts(nonzero, counts)
    shared_counts = overlap_counts[0].astype(F32)
    unique_counts = overlap_counts[1].astype(F32)
    rho = shared_counts / jnp.maximum(unique_counts, as_f32(epsilon))
    lam = 1 + as_f32(r) * jnp.clip(rho, 0.0, alpha)
    merged = jnp.sum(tv * unique.astype(F32) * lam[:, None] + shared, axis=0)
    return b + merged.reshape(b.shape)


# ------------------------------------------------------------------------------------------------ passthrough
@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def passthrough(base, xs, *, key=None, scale=None, compute_dtype=None):
    """Passthrough, mergekit ``passthrough``: y = x, or y = x · scale when a scale is given.

    xs (1, *S); scale None, a scalar or a (1,) array (per-model parameter; a value resolved per tensor, e.g.
    0 for o_proj/down_proj of duplicated layers). The base is ignored. compute_dtype: y = r(x · scale).
    """
    check_kernel_inputs("passthrough", None, xs, base_use="ignored", n_min=1, n_max=1)
    x = as_f32(xs[0])
    if scale is None:
        return x
    s = as_f32(scale)
    if s.size != 1:
        raise ValueError(f"passthrough: parameter 'scale' must be one value for the single input, got shape {s.shape}")
    return Arithmetic.of(compute_dtype).r(x * s.reshape(()))


# --------------------------------------------------------------------------------------------------- registry
register(MergeMethod(
    name="nearswap", kernel=nearswap, base="required", min_inputs=1, max_inputs=1,
    shared={"t": REQUIRED}, traced_scalars=("t",), chunks=RowChunks(),
    doc="move to the other model where it is within t of the base"))
register(MergeMethod(
    name="arcee_fusion", kernel=arcee_fusion, base="required", min_inputs=1, max_inputs=1,
    randomized=True,  # only tensors over 10^6 elements draw a quantile subsample from the key
    result_dtype="float32",  # mergekit: base + delta · (a float32 mask)
    doc="keep the other model's changes whose importance |Δ|·KL exceeds median + 1.5 IQR"))
register(MergeMethod(
    name="ram", kernel=ram, base="required", min_inputs=0,
    shared={"epsilon": 1e-5}, chunks=RowChunks(),
    doc="task vectors: unique changes summed, shared changes averaged"))
register(MergeMethod(
    name="ramplus_tl", kernel=ramplus_tl, base="required", min_inputs=0,
    shared={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    result_dtype="float32",  # mergekit: the unique entries are scaled by a float32 λ
    chunks=RowChunks(statistic=_ramplus_statistic),  # the counts over the whole tensor first
    doc="RAM with unique changes rescaled by the tensor-local overlap ratio"))
register(MergeMethod(
    name="passthrough", kernel=passthrough, base="ignored", min_inputs=1, max_inputs=1,
    per_model={"scale": None}, chunks=RowChunks(),
    doc="copy the single input, optionally times a per-tensor scale"))
