"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA (mergekit's generalized task
arithmetic) and SCE, as per-tensor kernels registered in `registry.METHODS`.

Notation (merging.md 1.3): base b (shape S), inputs x_i stacked as xs (N, *S), task vectors δ_i = x_i − b,
per-model weight w_i and density d_i, computed in float32 unless a reduced compute dtype is given (below).

Generalized task arithmetic (mergekit 0.1.5 `GeneralizedTaskArithmeticMerge.merge_group`):
  1. δ_i ← sparsify(δ_i, d_i, γ_i | ε_i, rescale)                      (sparsify.py; skipped without a sparsifier)
  2. D_i = w_i δ_i                                                     (weights applied before the election)
  3. election (consensus methods only), s = ±1 per entry (+1 where the statistic is >= 0):
       "weighted_sum" (mergekit, TIES "mass"):  s = sign(Σ_i D_i),       M_i = [sign(D_i) == s]
       "sum"          (TIES paper / PEFT "total"): s = sign(Σ_i δ_i),    M_i = [sign(δ_i) == s]
       "weighted_count" (mergekit's unused "count"): s = sign(Σ_i sign(D_i)), M_i = [sign(D_i) == s]
       "count"        (PEFT "frequency"):        s = sign(Σ_i sign(δ_i)),  M_i = [sign(δ_i) == s]
     exact zeros never agree (sign 0 ≠ ±1). mixed = Σ_i M_i D_i, div = Σ_i M_i w_i (divisor="weights", mergekit)
     or Σ_i M_i (divisor="count", PEFT's disjoint mean); div == 0 -> 1.
     Without election: mixed = Σ_i D_i, div = Σ_i w_i (|div| < 1e-8 -> 1) or N (divisor="count").
  4. if normalize: mixed /= div;  mixed *= λ;  y = b + mixed.

Registered methods and mergekit's defaults (consensus, sparsifier, normalize, rescale):
  task_arithmetic (none, none, False, -)      ties (sum, magnitude, True, None)
  dare_linear (none, random, False, "l1")     dare_ties (sum, random, False, "l1")
  breadcrumbs (none, outliers, False, None)   breadcrumbs_ties (sum, outliers, False, None)
  della_linear (none, della, False, "l1")     della (sum, della, True, "l1")
with density = 1, λ = 1, γ = 0.01, ε = 0.15. `int8_mask` is accepted and ignored (memory only in mergekit).
`rescale` takes mergekit's bool (True = "l1") or "l1" | "inv_p" | None.

Reduced precision (`compute_dtype='float16' | 'bfloat16'`, precision.py), as mergekit computes in the YAML's
dtype: δ_i, the sparsifier's l1 rescaling, w_i (rounded from the parameter), D_i, the election's sum, mixed, div,
the quotient, the λ product and b + mixed are each rounded to that dtype; DARE/DELLA's rescaling in float16 is done
in float32 and rounded once (mergekit's CPU path: torch.bernoulli has no float16 kernel there); in float16 the
|div| < 1e-8 guard compares against 1e-8 rounded to float16, i.e. 0 (so weights summing to 0 divide by 0, as in
mergekit). Without compute_dtype every step is float32 and only the caller rounds the result.

Randomised kernels (dare_*, della*) draw the mask of input i from `fold_in(key, i)` (see keys.py), or take the
masks as `masks=` (N, *S) (bool or 0/1), e.g. to reproduce a torch run. A no-input call (N = 0) returns b.

Large tensors (execute.py, registry.RowChunks) are merged in blocks, bit for bit as whole: task_arithmetic is
elementwise; ties, breadcrumbs and breadcrumbs_ties first resolve each task vector's magnitude window over the
whole tensor (`_window_statistic`), then sparsify each block against it (`selection=`, `chunk_start=`); with
rescale="l1" (a whole-tensor norm) and for the random sparsifiers (masks drawn over the whole shape: dare_*,
della*) tensors stay whole. sce (its top-k of the variance and float means over the tensor) stays whole too.
"""
from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.merge import sparsify as sp
from configurable_fm.ops.merge.keys import model_keys
from configurable_fm.ops.merge.precision import Arithmetic
from configurable_fm.ops.merge.registry import REQUIRED, MergeMethod, RowChunks, register

Election = Optional[Literal["weighted_sum", "sum", "weighted_count", "count"]]
Divisor = Literal["weights", "count"]
ELECTIONS = ("weighted_sum", "sum", "weighted_count", "count")
DIVISORS = ("weights", "count")


def _inputs(method: str, base, xs):
    if base is None:
        raise ValueError(f"{method}: a base tensor is required")
    base = jnp.asarray(base).astype(jnp.float32)
    xs = jnp.asarray(xs).astype(jnp.float32)
    if xs.ndim != base.ndim + 1 or tuple(xs.shape[1:]) != tuple(base.shape):
        raise ValueError(
            f"{method}: inputs are stacked as {tuple(xs.shape)} but the base is {tuple(base.shape)}; "
            f"expected (N, {', '.join(map(str, base.shape))})"
        )
    return base, xs


def _per_model(method: str, name: str, value, n: int) -> jax.Array:
    """A per-model parameter as float32 (N,): a scalar broadcasts, else its length must be N."""
    if value is None:
        raise ValueError(f"{method}: parameter {name!r} is required")
    v = jnp.asarray(value, jnp.float32)
    if v.ndim == 0:
        return jnp.broadcast_to(v, (n,))
    if v.shape != (n,):
        raise ValueError(f"{method}: parameter {name!r} has shape {tuple(v.shape)}, expected ({n},), one per model")
    return v


def _keep_source(method: str, name: str, value, n: int):
    """Like _per_model, but keeps a concrete value concrete (exact mergekit counts, see sparsify.trunc_count)."""
    arr = sp.concrete(value)
    if arr is None:
        return _per_model(method, name, value, n)
    if arr.ndim == 0:
        return np.broadcast_to(arr, (n,))
    if arr.shape != (n,):
        raise ValueError(f"{method}: parameter {name!r} has shape {arr.shape}, expected ({n},), one per model")
    return arr


def _sum(terms):
    """Σ over the (static, small) model axis, unrolled: XLA:CPU compiles reductions over a leading axis fused
    with a per-model broadcast into loops orders of magnitude slower; a chain of adds is memory-bound."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _elect(deltas, weighted, election: str, arith: Arithmetic = Arithmetic()):
    """Agreement masks M_i (lists over models) with the elected sign (the statistic rounded as mergekit's sum)."""
    src = weighted if election.startswith("weighted") else deltas
    signs = [jnp.sign(t) for t in src]
    stat = arith.r(_sum(src if election.endswith("sum") else signs))
    majority = jnp.where(stat >= 0, 1.0, -1.0)
    return [sg == majority for sg in signs]


def _windows(method: str, sparsification, density, gamma, n_models: int, size: int):
    """Rank windows (lo, hi) (N,) of the magnitude sparsifiers over a tensor of `size` entries. The counts are
    computed here, outside the jitted core, so that concrete densities give mergekit's exact int(d·n)
    (sparsify.trunc_count); traced ones fall back to float32."""
    d_src = _keep_source(method, "density", density, n_models)
    if sparsification == "magnitude_outliers":
        return sp.window_for(sparsification, d_src, size, _keep_source(method, "gamma", gamma, n_models))
    return sp.window_for(sparsification, d_src, size)


def generalized_task_arithmetic(
    base,
    xs,
    *,
    weight,
    density=1.0,
    gamma=0.01,
    epsilon=0.15,
    normalize: bool = False,
    lam: float = 1.0,
    rescale=None,
    sparsification: Optional[sp.SparsifyMethod] = None,
    election: Election = None,
    divisor: Divisor = "weights",
    key: Optional[jax.Array] = None,
    masks=None,
    method: str = "generalized_task_arithmetic",
    compute_dtype=None,
    selection: Optional[sp.WindowCuts] = None,
    chunk_start=0,
) -> jax.Array:
    """y = b + λ · combine_i(w_i · sparsify(x_i − b)) (module docstring); base (S), xs (N, *S) -> y (S) float32.

    weight, density, gamma, epsilon: per model (N,) or scalars; masks: optional (N, *S) injected sparsity masks;
    compute_dtype: None (float32 arithmetic) or 'float16' | 'bfloat16' (mergekit's rounding, module docstring).
    selection, chunk_start: base and xs are a block of rows of a larger tensor, starting at flat index
    chunk_start, whose magnitude windows `selection` resolved over the whole tensor (`_window_statistic`: the
    row-chunked merge of execute.py); the result is that block of the whole tensor's result, bit for bit.
    """
    base, xs = _inputs(method, base, xs)
    n_models = xs.shape[0]
    if n_models == 0:
        return base
    if election is not None and election not in ELECTIONS:
        raise ValueError(f"{method}: parameter election must be one of {ELECTIONS} or None, got {election!r}")
    if divisor not in DIVISORS:
        raise ValueError(f"{method}: parameter divisor must be one of {DIVISORS}, got {divisor!r}")
    if sparsification is not None and sparsification not in sp.SPARSIFY_METHODS:
        raise ValueError(f"{method}: unknown sparsification {sparsification!r}; known: {sp.SPARSIFY_METHODS}")
    if selection is not None and sparsification not in ("magnitude", "magnitude_outliers"):
        raise ValueError(f"{method}: selection= is for the magnitude sparsifiers, not {sparsification!r}")
    rescale = sp.normalize_rescale(rescale)
    w = _per_model(method, "weight", weight, n_models)
    d = window = eps = keys = None
    if sparsification is not None:
        d = jnp.asarray(_keep_source(method, "density", density, n_models), jnp.float32)
        if selection is not None:
            window = selection._replace(start=jnp.asarray(chunk_start, jnp.int32))
        elif sparsification in ("magnitude", "magnitude_outliers"):
            window = _windows(method, sparsification, density, gamma, n_models, base.size)
        elif sparsification == "della_magprune":
            eps = _per_model(method, "epsilon", epsilon, n_models)
            sp.check_della(_keep_source(method, "density", density, n_models),
                           _keep_source(method, "epsilon", epsilon, n_models), what=method)
        if masks is not None:
            masks = jnp.asarray(masks)
            if tuple(masks.shape) != tuple(xs.shape):
                raise ValueError(f"{method}: masks have shape {tuple(masks.shape)}, expected {tuple(xs.shape)}")
            masks = masks.astype(bool)
        elif sparsification in sp.RANDOM_METHODS:
            if key is None:
                raise ValueError(f"{method}: randomised sparsification {sparsification!r} needs key= or masks=")
            keys = model_keys(key, n_models)
    elif masks is not None:
        raise ValueError(f"{method}: masks= given, but this method has no sparsifier")
    arith = Arithmetic.of(compute_dtype)
    if arith.reduced:
        w = arith.const(w)  # torch.tensor(weights, dtype=deltas.dtype)
    return _gta_core(base, xs, w, d, window, eps, keys, masks, jnp.asarray(lam, jnp.float32),
                     jnp.asarray(normalize, bool), sparsification=sparsification, election=election,
                     divisor=divisor, rescale=rescale, arith=arith)


def _model_window(window, i: int):
    """Model i's window: (lo_i, hi_i), or its WindowCuts (the block's start shared), or None."""
    if window is None:
        return None
    if isinstance(window, sp.WindowCuts):
        return sp.WindowCuts(window.t[i], window.cut[i], window.nonempty[i], window.start)
    return window[0][i], window[1][i]


@functools.partial(jax.jit, static_argnames=("sparsification", "election", "divisor", "rescale", "arith"))
def _gta_core(base, xs, w, d, window, eps, keys, masks, lam, normalize, *, sparsification, election, divisor,
              rescale, arith):
    r = arith.r
    n_models = xs.shape[0]
    deltas = [r(xs[i] - base) for i in range(n_models)]
    if sparsification is not None:
        deltas = [
            sp.sparsify_core(deltas[i], d[i], sparsification, _model_window(window, i),
                             epsilon=None if eps is None else eps[i], rescale=rescale,
                             key=None if keys is None else keys[i], mask=None if masks is None else masks[i],
                             arith=arith)
            for i in range(n_models)
        ]
    weighted = [r(deltas[i] * w[i]) for i in range(n_models)]
    if election is not None:
        agree = [a.astype(jnp.float32) for a in _elect(deltas, weighted, election, arith)]
        mixed = r(_sum([weighted[i] * agree[i] for i in range(n_models)]))
        div = r(_sum([agree[i] * w[i] for i in range(n_models)] if divisor == "weights" else agree))
        div = jnp.where(div == 0, 1.0, div)
    else:
        mixed = r(_sum(weighted))
        div = r(jnp.sum(w)) if divisor == "weights" else jnp.float32(n_models)
        div = jnp.where(jnp.abs(div) < arith.const(1e-8), 1.0, div)
    mixed = jnp.where(normalize, r(mixed / div), mixed)
    return r(base + r(mixed * lam))


def _pop_lambda(method: str, kw: dict) -> float:
    lam = kw.pop("lambda", None)
    lam_ = kw.pop("lambda_", None)
    if lam is not None and lam_ is not None:
        raise ValueError(f"{method}: give 'lambda' or 'lambda_', not both")
    if kw:
        raise TypeError(f"{method}: unknown parameter(s) {sorted(kw)}")
    return 1.0 if lam is None and lam_ is None else (lam if lam is not None else lam_)


def _make_kernel(name: str, sparsification, consensus: bool, default_normalize: bool, default_rescale):
    """A mergekit GTA method as a kernel `f(base, xs, *, key=None, masks=None, weight, density, ...)`."""

    def kernel(base, xs, *, key=None, masks=None, weight=None, density=1.0, normalize=default_normalize,
               rescale=default_rescale, int8_mask=False, election=None, divisor="weights",
               gamma=0.01, epsilon=0.15, compute_dtype=None, selection=None, chunk_start=0, **kw):
        del int8_mask  # mergekit: only the mask dtype (memory); no effect on the result
        lam = _pop_lambda(name, kw)
        if not consensus and election is not None:
            raise ValueError(f"{name}: has no sign election; parameter election={election!r} is not accepted")
        return generalized_task_arithmetic(
            base, xs, weight=weight, density=density, gamma=gamma, epsilon=epsilon, normalize=normalize,
            lam=lam, rescale=rescale, sparsification=sparsification,
            election=(election or "weighted_sum") if consensus else None, divisor=divisor, key=key, masks=masks,
            method=name, compute_dtype=compute_dtype, selection=selection, chunk_start=chunk_start)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = (
        f"{name}: generalized task arithmetic with sparsifier {sparsification!r} and "
        f"{'a TIES sign election (election=, divisor=)' if consensus else 'no election (divisor=)'}; "
        f"defaults normalize={default_normalize}, rescale={default_rescale!r}, density=1, lambda=1. "
        "base (S), xs (N, *S) -> y (S) float32; see the module docstring for the math."
    )
    return kernel


task_arithmetic = _make_kernel("task_arithmetic", None, False, False, None)
ties = _make_kernel("ties", "magnitude", True, True, None)
dare_linear = _make_kernel("dare_linear", "random", False, False, "l1")
dare_ties = _make_kernel("dare_ties", "random", True, False, "l1")
breadcrumbs = _make_kernel("breadcrumbs", "magnitude_outliers", False, False, None)
breadcrumbs_ties = _make_kernel("breadcrumbs_ties", "magnitude_outliers", True, False, None)
della_linear = _make_kernel("della_linear", "della_magprune", False, False, "l1")
della = _make_kernel("della", "della_magprune", True, True, "l1")


def sce(base, xs, *, key=None, select_topk: float = 1.0, int8_mask: bool = False, compute_dtype=None) -> jax.Array:
    """SCE (FuseChat, arXiv 2408.07990), as mergekit 0.1.5 `sce.py`; base (S), xs (N, *S) -> y (S) float32.

    τ_i = x_i − b. Select: if select_topk < 1, keep (for every model) the k = int(f32(nnz(v))·f32(topk)) entries
    of largest population variance v = Var_i(τ_i) (k == 0 or topk <= 0 keeps none; ties: lower flat index first,
    torch.topk's order is unspecified). Elect: M_i = [sign(τ_i) == s], s = sign(Σ_i τ_i) (>= 0 -> +1).
    Weights ω_i = mean(τ_i²)/Σ_j mean(τ_j²) (uniform 1/N if the sum < 1e-6), computed after selection.
    y = b + Σ_i ω_i M_i τ_i / max(Σ_i ω_i M_i, 1e-6). `int8_mask` is ignored (memory only); no per-model weight.
    compute_dtype 'float16' | 'bfloat16': τ, the variance, the energies mean(τ²), their sum and ratios, the
    products, sums and the quotient are each rounded to it, as mergekit computes them (the 1e-6 bounds too).
    """
    del key, int8_mask
    base, xs = _inputs("sce", base, xs)
    if xs.shape[0] == 0:
        return base
    return _sce_core(base, xs, topk=float(select_topk), arith=Arithmetic.of(compute_dtype))


@functools.partial(jax.jit, static_argnames=("topk", "arith"))
def _sce_core(base, xs, *, topk, arith):
    r = arith.r
    n_models = xs.shape[0]
    tv = [r(xs[i] - base) for i in range(n_models)]
    if topk < 1:
        if topk <= 0:
            tv = [jnp.zeros_like(t) for t in tv]
        else:
            mean = _sum(tv) / n_models
            var = r(_sum([jnp.square(t - mean) for t in tv]) / n_models)  # population variance over models
            nnz = jnp.count_nonzero(var)
            k = jnp.trunc(nnz.astype(jnp.float32) * jnp.float32(topk)).astype(jnp.int32)
            sel = sp.rank_window_mask(-jnp.abs(var), 0, k, lo_is_zero=True).astype(jnp.float32)
            tv = [t * sel for t in tv]
    agree = [a.astype(jnp.float32) for a in _elect(tv, tv, "sum", arith)]
    omega = jnp.stack([r(jnp.mean(r(jnp.square(t)))) for t in tv])
    total = r(jnp.sum(omega))
    uniform = r(arith.div(jnp.full_like(omega, 1.0), n_models))
    omega = jnp.where(jnp.abs(total) < 1e-6, uniform, r(arith.div(omega, total)))
    ew = [omega[i] * agree[i] for i in range(n_models)]
    merged = r(_sum([r(tv[i] * ew[i]) for i in range(n_models)]))
    return r(base + r(merged / jnp.maximum(r(_sum(ew)), arith.const(1e-6))))


def _window_statistic(name: str, sparsification):
    """RowChunks.statistic of a magnitude-sparsified method: every task vector's rank window resolved over the
    whole tensor from its blocks (sparsify.window_cuts: one radix pass, its buckets predicted from a sample of
    every k-th row, a second only when that misses; one more where equal magnitudes straddle the cut), the keys
    computed exactly as _gta_core and sparsify_core compute them, the counts as the whole-tensor kernel does."""

    def statistic(chunks, *, density=1.0, gamma=0.01, compute_dtype=None, **unused):
        n_models = chunks.n_inputs
        lo, hi = _windows(name, sparsification, density, gamma, n_models, chunks.size)
        r = Arithmetic.of(compute_dtype).r

        def keys(b, xs):
            deltas = [jnp.abs(r(xs[i] - b).astype(jnp.float32)).reshape(-1) for i in range(n_models)]
            return jnp.stack([sp._order_keys(-a if sparsification == "magnitude" else a) for a in deltas])

        def fold(fn, init):
            return chunks.fold(lambda acc, b, xs, row: fn(acc, keys(b, xs), row * chunks.row_size), init)

        sample = keys(*chunks.sample(sp.SAMPLE_ENTRIES))
        return {"selection": sp.window_cuts(fold, lo, hi, chunks.size, sample=sample)}

    return statistic


def _row_chunks(name: str, sparsification, default_rescale) -> Optional[RowChunks]:
    """How a GTA method runs in row blocks: elementwise without a sparsifier; the magnitude sparsifiers with
    their windows resolved first (not with an l1 rescale: a whole-tensor norm); never the random ones (their
    masks are drawn over the whole tensor's shape)."""
    if sparsification is None:
        return RowChunks()
    if sparsification not in ("magnitude", "magnitude_outliers"):
        return None

    def accepts(params, shape):
        try:
            return params.get("masks") is None and sp.normalize_rescale(params.get("rescale", default_rescale)) != "l1"
        except ValueError:  # the kernel reports it
            return False

    return RowChunks(statistic=_window_statistic(name, sparsification), accepts=accepts)


def _traced_counts_differ(params, size: int) -> bool:
    """MergeMethod.bake of the magnitude sparsifiers: a traced density (gamma) gives the count
    trunc(f32(d)·f32(n)), mergekit int(d·n) in double precision (sparsify.trunc_count); they differ often on
    real tensors (d = 0.3, n = 4096·4096: 5033165 against 5033164), so such parameters are passed as constants."""
    for name in ("density", "gamma"):
        v = params.get(name)
        if v is None:
            continue
        exact = sp.as_double(v)
        if exact is None:
            continue
        traced = np.trunc(np.asarray(exact, np.float32) * np.float32(size))
        if not np.array_equal(np.trunc(exact * float(size)), traced.astype(np.float64)):
            return True
    return False


def _della_invalid(params, size: int) -> bool:
    """MergeMethod.bake of the DELLA methods: a density ± epsilon outside (0, 1) is passed as constants, so
    that the kernel's check (sparsify.check_della, skipped for traced values) raises as mergekit does."""
    try:
        sp.check_della(params.get("density", 1.0), params.get("epsilon", 0.15))
    except ValueError:
        return True
    return False


_GTA_SHARED = {"normalize": None, "rescale": None, "lambda": 1.0, "int8_mask": False}


def _register_gta(kernel, *, sparsification, consensus, normalize, rescale, randomized, doc):
    per_model = {"weight": REQUIRED, "density": 1.0}
    if sparsification == "magnitude_outliers":
        per_model["gamma"] = 0.01
    if sparsification == "della_magprune":
        per_model["epsilon"] = 0.15
    shared = dict(_GTA_SHARED, normalize=normalize, rescale=rescale, divisor="weights")
    if consensus:
        shared["election"] = "weighted_sum"
    bake = {"magnitude": _traced_counts_differ, "magnitude_outliers": _traced_counts_differ,
            "della_magprune": _della_invalid}.get(sparsification)
    register(MergeMethod(name=kernel.__name__, kernel=kernel, base="required", min_inputs=1, per_model=per_model,
                         shared=shared, randomized=randomized, doc=doc,
                         chunks=_row_chunks(kernel.__name__, sparsification, rescale), bake=bake,
                         traced_scalars=("lambda",)))


_register_gta(task_arithmetic, sparsification=None, consensus=False, normalize=False, rescale=None, randomized=False,
              doc="Task arithmetic (Ilharco et al., arXiv 2212.04089): y = b + λ Σ w_i (x_i − b).")
_register_gta(ties, sparsification="magnitude", consensus=True, normalize=True, rescale=None, randomized=False,
              doc="TIES (Yadav et al., arXiv 2306.01708): trim to top-d magnitudes, elect signs, disjoint mean.")
_register_gta(dare_linear, sparsification="random", consensus=False, normalize=False, rescale="l1", randomized=True,
              doc="DARE (Yu et al., arXiv 2311.03099): Bernoulli(d) drop with L1 rescale, weighted sum.")
_register_gta(dare_ties, sparsification="random", consensus=True, normalize=False, rescale="l1", randomized=True,
              doc="DARE-TIES: Bernoulli(d) drop with L1 rescale, TIES sign election.")
_register_gta(breadcrumbs, sparsification="magnitude_outliers", consensus=False, normalize=False, rescale=None,
              randomized=False, doc="Model Breadcrumbs (arXiv 2312.06795): drop top-γ outliers and small entries.")
_register_gta(breadcrumbs_ties, sparsification="magnitude_outliers", consensus=True, normalize=False, rescale=None,
              randomized=False, doc="Model Breadcrumbs with the TIES sign election.")
_register_gta(della_linear, sparsification="della_magprune", consensus=False, normalize=False, rescale="l1",
              randomized=True, doc="DELLA (arXiv 2406.11617) MagPrune with L1 rescale, weighted sum.")
_register_gta(della, sparsification="della_magprune", consensus=True, normalize=True, rescale="l1", randomized=True,
              doc="DELLA MagPrune with L1 rescale and the TIES sign election.")
register(MergeMethod(name="sce", kernel=sce, base="required", min_inputs=1, per_model={},
                     shared={"select_topk": 1.0, "int8_mask": False}, randomized=False,
                     doc="SCE (FuseChat, arXiv 2408.07990): variance select, sign elect, energy-weighted erase."))
