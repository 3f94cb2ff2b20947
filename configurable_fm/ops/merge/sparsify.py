"""Sparsifiers of task vectors, as in mergekit 0.1.5 (`mergekit/sparsify.py`), in jit-able JAX.

Notation (merging.md 1.3): a task vector δ (any shape S, n elements), density d, computed in float32.

- ``magnitude`` (TIES trim): keep the k = max(1, int(d·n)) entries of largest |δ| over the flattened tensor.
- ``magnitude_outliers`` (Model Breadcrumbs, 0.1.5 window): target = int(d·n), n_top = int(γ·n),
  n_bot = max(0, n − target − n_top); sort |δ| ascending and keep ranks [n_bot, n_bot + target).
- ``random`` (DARE): keep each entry with probability d, mask ~ Bernoulli(d).
- ``della_magprune`` (DELLA MagPrune): per row (axis 1 of a >=2-D tensor, the whole tensor if 1-D), rank |δ|
  ascending (1..m); p = (d − ε) + 2ε·(rank − 1)/(m − 1); mask ~ Bernoulli(p). Requires 0 < d − ε, d + ε < 1.

Common rules: d ≥ 1 returns δ unchanged (no mask, no rescale); d ≤ 0 returns zeros (mergekit 0.1.5 does this for
magnitude and della; for random/outliers it follows from the empty mask, except that mergekit raises for a negative
DARE density and keeps an odd window for a negative breadcrumbs density: we return zeros).

Reduced precision (precision.py; `arith=` of rescale_masked / sparsify_core): the masks are the same (ranks of the
rounded values), the l1 rescaling is rounded as mergekit does it in the compute dtype.

Rescaling the kept entries, m = δ ⊙ mask:
- ``"l1"`` (mergekit's `rescale: true`): m · ‖δ‖₁/‖m‖₁, skipped when either norm < 1e-7;
- ``"inv_p"`` (the DARE/DELLA papers): m / p with p the keep probability (d; DELLA's per-entry p);
- ``None``: m.

Ties in magnitude. Ranks are taken in a *stable* order: among equal |δ| the lower flattened index ranks first
(descending order for ``magnitude``: it is kept first; ascending for the others), on the CPU (radix), GPU
(sampled bracket) and small-tensor (sorted) paths alike. The flat index is that of the tensor the kernel is given,
so the canonical order of a model's parameter is fixed by the caller: the HF/torch layout (a Linear weight
(out, in) row-major, each expert its own tensor), which is what the streaming merge reads and what tree.merge gives
the kernels for nnx models (tree.merge_in_hf_layout); the in-memory and streamed merges therefore keep the same
entries. mergekit uses torch's unstable CPU sort (`torch.argsort`), which is stable (and so identical to this) for
tensors of at most 16 elements, but orders ties arbitrarily above that; with distinct magnitudes the results are
identical at every size.

Blocks. A tensor merged in blocks (execute.py's row blocks, for memory) resolves each window over the whole tensor
first (`window_cuts`: the radix histograms summed over the blocks, the tie cut found block by block) and then masks
every block on its own (`rank_window_mask_at`): the same entries, by the same stable order, as rank_window_mask.

Counts. mergekit computes int(d·n) in Python double precision. Kernels get densities as float32 arrays; when they
are concrete (not traced by jit), the decimal the user wrote is recovered from the float32 (its shortest repr,
e.g. 0.58) and the count is computed exactly as mergekit does. When densities are traced (passed as jit
arguments) the count is trunc(f32(d)·f32(n)) in float32, which can differ by one in rare cases (d=0.58, n=50:
28 in mergekit, 29 in float32). Pass densities concretely (close over them) for bit-exact agreement.

`int8_mask` in mergekit only changes the dtype of masks (memory); it has no effect on results here.
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.merge.precision import Arithmetic

FLOAT32 = Arithmetic()
SparsifyMethod = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Rescale = Optional[Literal["l1", "inv_p"]]
SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
RANDOM_METHODS = ("random", "della_magprune")
L1_EPS = 1e-7


def normalize_rescale(rescale) -> Rescale:
    """mergekit's boolean `rescale` (True -> "l1", False -> None) or an explicit "l1" | "inv_p" | None."""
    if rescale is None or rescale is False:
        return None
    if rescale is True:
        return "l1"
    if isinstance(rescale, str) and rescale.lower() in ("l1", "inv_p"):
        return rescale.lower()  # type: ignore[return-value]
    if isinstance(rescale, str) and rescale.lower() in ("none", "false"):
        return None
    raise ValueError(f"parameter rescale must be 'l1', 'inv_p', None or a bool, got {rescale!r}")


def concrete(x) -> Optional[np.ndarray]:
    """`x` as a numpy array when it is concrete, None when it is a tracer."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def as_double(x) -> Optional[np.ndarray]:
    """Concrete values as float64, recovering the decimal a float32 was rounded from (float32(0.7) -> 0.7)."""
    arr = concrete(x)
    if arr is None:
        return None
    if arr.dtype == np.float64 or arr.dtype.kind in "iub":
        return arr.astype(np.float64)
    f32 = arr.astype(np.float32)
    return np.vectorize(lambda v: float(str(np.float32(v))), otypes=[np.float64])(f32) if f32.size else f32.astype(
        np.float64
    )


def trunc_count(frac, n: int) -> jax.Array:
    """int(frac · n) as mergekit computes it (Python double, truncation toward zero), int32, frac's shape.

    Exact when `frac` is concrete; trunc(f32(frac)·f32(n)) when traced (see the module docstring)."""
    d = as_double(frac)
    if d is not None:
        return jnp.asarray(np.clip(np.trunc(d * float(n)), -(2**31), 2**31 - 1).astype(np.int32))
    return jnp.trunc(jnp.asarray(frac, jnp.float32) * jnp.float32(n)).astype(jnp.int32)


def magnitude_window(density, n: int):
    """The rank window [0, k) of `magnitude` (ranks in descending |δ|), k = max(1, int(d·n))."""
    k = jnp.maximum(trunc_count(density, n), 1)
    return jnp.zeros_like(k), k


def outliers_window(density, gamma, n: int):
    """The rank window [n_bot, n_bot + target) of `magnitude_outliers` (ranks in ascending |δ|)."""
    target = trunc_count(density, n)
    n_top = trunc_count(gamma, n)
    n_bot = jnp.maximum(0, n - target - n_top)
    return n_bot, n_bot + target


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (the usual sign flip; -0.0 is made +0.0 first, NaN sorts last)."""
    x = x.astype(jnp.float32)
    b = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


_BLOCK = 4096  # block length of the tie resolution (< 2^16: two counts are packed in one uint32)


_HIST_SPLIT = 2  # independent scatters over halves of the data, then added: XLA:CPU runs them concurrently


def _histogram(idx: jax.Array, bins: int) -> jax.Array:
    """Counts (bins,) int32 of idx (1-D int32, all in [0, bins)), by scatter-adds over `_HIST_SPLIT` slices."""
    n = idx.shape[0]
    cuts = sorted({n * c // _HIST_SPLIT for c in range(_HIST_SPLIT + 1)})
    total = jnp.zeros(bins, jnp.int32)
    for a, b in zip(cuts[:-1], cuts[1:]):
        total = total + jnp.zeros(bins, jnp.int32).at[idx[a:b]].add(1, mode="promise_in_bounds")
    return total


_LOCATE_GROUP = 256  # bins located directly; more are grouped (`_locate_rows`)


def _locate_rows(counts: jax.Array, r: jax.Array):
    """For bin counts (m, B) (int32, >= 0) and ranks r (m,), one row of counts per rank: the bin j_i holding
    rank r_i, i.e. the largest j in [0, B] with Σ counts[i, :j] <= r_i (B when r_i >= Σ counts[i]; 0 when
    r_i < 0), and that count before it, Σ counts[i, :j_i].

    Up to 256 bins directly: the inclusive prefix sums by a triangular masked sum (no cumulative sum, no loop:
    XLA:CPU compiles scans and loops slowly), j = #(prefix sums <= r). More bins in groups of 256: the group
    holding r (the same, on the groups' sums), then the bin inside it."""
    rows, n_bins = counts.shape
    iota = jnp.arange(min(n_bins, _LOCATE_GROUP), dtype=jnp.int32)
    if n_bins <= _LOCATE_GROUP:
        inclusive = jnp.sum(jnp.where(iota[None, :, None] >= iota[None, None, :], counts[:, None, :], 0), axis=2,
                            dtype=jnp.int32)  # (m, B): Σ counts[:, :k + 1]
        j = jnp.sum(inclusive <= r[:, None], axis=1, dtype=jnp.int32)
        return j, jnp.sum(jnp.where(iota[None, :] < j[:, None], counts, 0), axis=1, dtype=jnp.int32)
    size = _LOCATE_GROUP
    groups = -(-n_bins // size)
    padded = jnp.pad(counts, ((0, 0), (0, groups * size - n_bins))).reshape(rows, groups, size)
    g, before = _locate_rows(jnp.sum(padded, axis=2, dtype=jnp.int32), r)
    inside = jnp.take_along_axis(padded, jnp.minimum(g, groups - 1)[:, None, None], axis=1)[:, 0]  # (m, size)
    i, more = _locate_rows(inside, r - before)
    last = g >= groups  # r is past the total
    return (jnp.where(last, n_bins, jnp.minimum(g * size + i, n_bins)),
            jnp.where(last, before, before + more))


def _locate(counts: jax.Array, r: jax.Array):
    """`_locate_rows` for one row of counts (B,) shared by the ranks r (m,)."""
    return _locate_rows(jnp.broadcast_to(counts, (r.shape[0], counts.shape[0])), r)


_HIGH = 1 << 16  # bins of either radix digit (the high and the low 16 bits of a key)


def _radix_high(keys: jax.Array) -> jax.Array:
    """First radix pass: the histogram (2^16,) int32 of the keys' high 16 bits."""
    return _histogram((keys >> 16).astype(jnp.int32), _HIGH)


def _radix_low(keys: jax.Array, bucket: jax.Array) -> jax.Array:
    """Second radix pass: the histograms (2, 2^16) int32 of the low 16 bits of the keys whose high 16 bits are
    bucket[0], bucket[1] (one scatter for both)."""
    high = (keys >> 16).astype(jnp.int32)
    low = (keys & jnp.uint32(0xFFFF)).astype(jnp.int32)
    trash = 2 * _HIGH
    idx = jnp.where(high == bucket[0], low, jnp.where(high == bucket[1], low + _HIGH, trash))
    h = _histogram(idx, trash + 1)
    return jnp.stack([h[:_HIGH], jnp.where(bucket[0] == bucket[1], h[:_HIGH], h[_HIGH:trash])])


def _radix_values(low: jax.Array, bucket: jax.Array, below: jax.Array, ranks: jax.Array):
    """The values t (2,) uint32 of ranks (2,) from their buckets (2,), #(keys < bucket) (2,) and the buckets'
    low-digit histograms (2, 2^16); and #(keys < t) (2,)."""
    j, more = _locate_rows(low, ranks - below)
    return (bucket.astype(jnp.uint32) << 16) | j.astype(jnp.uint32), below + more


def _select_radix(keys: jax.Array, ranks: jax.Array):
    """Values t (2,) uint32 of ranks (2,) (0-based, in [0, n)) in ascending `keys`, and #(keys < t) (2,), by a
    two-pass radix select: a 2^16-bin histogram of the high 16 bits gives each rank's bucket; a second one of
    the low 16 bits of the entries in those buckets (one histogram per rank, one pass) the exact value."""
    bucket, below = _locate(_radix_high(keys), ranks)
    return _radix_values(_radix_low(keys, bucket), bucket, below, ranks)


def _nth_equal(keys: jax.Array, t: jax.Array, block_counts: jax.Array, s: jax.Array) -> jax.Array:
    """Flat indices (2,) of the s_j-th (0-based) entry equal to t_j (n if there are at most s_j), for the two
    thresholds t (2,) and their per-block counts (2, blocks): the block from the counts, then the position
    inside that one block."""
    n = keys.shape[0]
    size = min(_BLOCK, n)
    b, before = _locate_rows(block_counts, s)
    begin = jnp.minimum(b, block_counts.shape[1] - 1) * size
    start = jnp.minimum(begin, n - size)  # the last block may be short: read the last `size` entries
    rows = jnp.stack([jax.lax.dynamic_slice_in_dim(keys, start[j], size) for j in range(2)])
    pos = start[:, None] + jnp.arange(size, dtype=jnp.int32)
    p, _ = _locate_rows(((rows == t[:, None]) & (pos >= begin[:, None])).astype(jnp.int32), s - before)
    return jnp.where(b >= block_counts.shape[1], n, start + p)


def _tie_cuts(keys: jax.Array, t: jax.Array, s: jax.Array):
    """`_nth_equal` for the two thresholds t (2,) and counts s (2,), with one packed pass for both's block counts;
    and the number of entries equal to each threshold (2,)."""
    n = keys.shape[0]
    size = min(_BLOCK, n)
    m = n // size * size

    def packed(k):
        return (k == t[0]).astype(jnp.uint32) + ((k == t[1]).astype(jnp.uint32) << 16)

    counts = jnp.sum(packed(keys[:m].reshape(-1, size)), axis=1, dtype=jnp.uint32)
    if m < n:
        counts = jnp.concatenate([counts, jnp.sum(packed(keys[m:]), dtype=jnp.uint32)[None]])
    per = jnp.stack([(counts & jnp.uint32(0xFFFF)).astype(jnp.int32), (counts >> 16).astype(jnp.int32)])
    return _nth_equal(keys, t, per, s), jnp.sum(per, axis=1, dtype=jnp.int32)


def _window_from_cuts(keys: jax.Array, idx: jax.Array, t: jax.Array, cut: jax.Array, nonempty) -> jax.Array:
    """The rank window as a mask, from its values t (2,) and tie cuts (2,): an entry equal to t[0] is kept from
    flat index cut[0] on, one equal to t[1] below cut[1]; idx: the entries' flat indices (keys' shape)."""
    above_lo = (keys > t[0]) | ((keys == t[0]) & (idx >= cut[0]))
    below_hi = (keys < t[1]) | ((keys == t[1]) & (idx < cut[1]))
    return above_lo & below_hi & nonempty


def _select_sorted(keys: jax.Array, ranks: jax.Array):
    """`_select_radix`'s values t and #(keys < t) from one sort of the keys and a binary search: cheaper for
    tensors of at most `_SAMPLE` entries (norms, biases, test tensors), where the radix select's 2^16-bin
    histograms cost more than the tensor."""
    ordered = jnp.sort(keys)
    t = ordered[ranks]
    return t, jnp.searchsorted(ordered, t, side="left").astype(jnp.int32)


def _window_selected(select, keys: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """rank_window_mask on flat keys with the values of ranks lo and hi − 1 from `select` (`_select_sorted` or
    `_select_radix`), then the tie cut from block counts. A handful of O(n) passes (the selection's, one block
    reduction, the mask), no cumulative sum over n. (The row blocks of a large tensor take `window_cuts`, the same
    steps block by block.)"""
    n = keys.shape[0]
    ranks = jnp.stack([jnp.minimum(lo, n - 1), jnp.clip(hi - 1, 0, n - 1)])
    t, below = select(keys, ranks)
    cut, _ = _tie_cuts(keys, t, jnp.stack([lo, hi]) - below)  # equal to t_lo: kept from cut[0]; t_hi: below cut[1]
    return _window_from_cuts(keys, jnp.arange(n, dtype=jnp.int32), t, cut, lo < hi)


_window_sorted = functools.partial(_window_selected, _select_sorted)  # any platform, up to _SAMPLE entries
_window_radix = functools.partial(_window_selected, _select_radix)  # CPUs: radix select


_SAMPLE = 1 << 16  # keys drawn (uniformly, with replacement) to bracket a rank before counting (`_sample_bracket`)
_BRACKET_SIGMAS = 6.0  # half-width of the bracket in standard deviations of the sample's rank
_SPLITS = 7  # thresholds counted per rank in one pass of `_select_refine` (an 8-fold narrowing; measured best, below)
_MAX_KEY = np.uint32(0xFFFFFFFF)


def _sample_bracket(keys: jax.Array, ranks: jax.Array):
    """Key ranges [a, b] (m,) uint32 each likely to hold the value of rank r (m,) in ascending `keys` (n,).

    From the sorted keys of s = 2^16 entries drawn uniformly with replacement (fixed positions, a function of n):
    the value of rank r sits at the sample's rank c = r·s/n, give or take σ = √(s·q(1−q)) (q = r/n; the count
    of sample keys below it is Binomial(s, q)), so [sample[c − 6σ], sample[c + 6σ]] holds it unless a
    6-sigma event happened (or the tail is cut: a side past the sample's ends is the whole key range's end).
    (rank_window_mask sorts tensors of at most s entries instead: `_window_sorted`.)"""
    n = keys.shape[0]
    pos = np.random.default_rng(n).integers(0, n, _SAMPLE).astype(np.int32)
    sample = jnp.sort(keys[pos])
    q = ranks.astype(jnp.float32) / jnp.float32(n)
    centre = q * _SAMPLE
    sigma = jnp.sqrt(_SAMPLE * q * (1 - q)) + 1.0
    ia = jnp.floor(centre - _BRACKET_SIGMAS * sigma).astype(jnp.int32)
    ib = jnp.ceil(centre + _BRACKET_SIGMAS * sigma).astype(jnp.int32)
    a = jnp.where(ia < 0, jnp.uint32(0), sample[jnp.clip(ia, 0, _SAMPLE - 1)])
    b = jnp.where(ib > _SAMPLE - 1, jnp.uint32(_MAX_KEY), sample[jnp.clip(ib, 0, _SAMPLE - 1)])
    return a, b


def _counts_below(keys: jax.Array, thresholds: jax.Array) -> jax.Array:
    """#(keys < c) (m,) int32 for each c of thresholds (m,) uint32, in one pass over keys: a variadic reduction
    with m sums, which XLA fuses with the comparisons into one kernel (no (n, m) array, no scatter)."""
    ops = tuple((keys < thresholds[i]).astype(jnp.int32) for i in range(thresholds.shape[0]))
    sums = jax.lax.reduce(ops, tuple(jnp.int32(0) for _ in ops), lambda a, b: tuple(x + y for x, y in zip(a, b)),
                          (0,))
    return jnp.stack(sums)


def _select_refine(keys: jax.Array, ranks: jax.Array, done: jax.Array):
    """The values t (m,) uint32 of ranks (m,) (0-based, in [0, n)) in ascending `keys`, and #(keys < t) (m,),
    by narrowing a key range [lo, hi] known to hold the rank (#(keys < lo) <= r < #(keys <= hi)); rows where
    `done` (m,) are skipped (garbage).

    The range starts at `_sample_bracket`'s, checked by one pass (#(keys < a), #(keys <= b)), or at the whole key
    range where the check fails. Each round is one pass counting the keys below K thresholds spread evenly over
    (lo, hi] (`_counts_below`; K = `_SPLITS`); the rank lies between the last threshold whose count is <= r and
    the next, which is the new range: a (K + 1)-fold narrowing per pass, exact once the range is narrower than
    K + 1 keys. Only fused count reductions, no scatter, no cumulative sum. K = 7 is the fastest measured (an
    H100, 2026-12-06, the selection alone on 22 x 11.5M keys: a pass costs the memory's bandwidth, ~0.32 ms,
    with 1 to 8 counts in its reduction, 0.37 ms with 9, 0.42 ms with 11; a bracket of 2^20-2^22 keys takes 21
    passes and 9.8 ms with K = 1, 11 and 6.3 ms with K = 3, 7 and 4.9 ms with K = 7 or 8, 6 and 5.2 ms with
    K = 11; benchmarks/ties_select_2026-12-06/README.md); the whole range ~11 passes."""
    m = ranks.shape[0]
    a, b = _sample_bracket(keys, ranks)
    counts = _counts_below(keys, jnp.concatenate([a, b + 1]))  # b + 1 wraps to 0 at the largest key: n below
    below_a, upto_b = counts[:m], jnp.where(b == _MAX_KEY, keys.shape[0], counts[m:])
    hit = (below_a <= ranks) & (ranks < upto_b)
    lo = jnp.where(hit, a, jnp.uint32(0))
    hi = jnp.where(done, lo, jnp.where(hit, b, jnp.uint32(_MAX_KEY)))
    below = jnp.where(hit, below_a, 0)
    split = jnp.arange(1, _SPLITS + 1, dtype=jnp.uint32)

    def narrowing(state):
        lo, hi, _ = state
        return jnp.any(hi > lo)

    def round_(state):
        lo, hi, below = state
        step = (hi - lo) // (_SPLITS + 1) + 1  # thresholds c_j = lo + min(j·step, hi − lo), j = 1..K: in (lo, hi]
        c = lo[:, None] + jnp.minimum(split[None, :] * step[:, None], (hi - lo)[:, None])  # (m, K), no overflow
        counts = _counts_below(keys, c.reshape(-1)).reshape(m, _SPLITS)  # nondecreasing in j
        k = jnp.sum(counts <= ranks[:, None], axis=1)  # the rank is in [c_k, c_{k+1}) (c_0 = lo)
        prev = jnp.maximum(k - 1, 0)[:, None]
        new_lo = jnp.where(k > 0, jnp.take_along_axis(c, prev, axis=1)[:, 0], lo)
        new_below = jnp.where(k > 0, jnp.take_along_axis(counts, prev, axis=1)[:, 0], below)
        new_hi = jnp.where(k < _SPLITS, jnp.take_along_axis(c, jnp.minimum(k, _SPLITS - 1)[:, None], axis=1)[:, 0] - 1,
                           hi)
        moving = hi > lo
        return jnp.where(moving, new_lo, lo), jnp.where(moving, new_hi, hi), jnp.where(moving, new_below, below)

    lo, _, below = jax.lax.while_loop(narrowing, round_, (lo, hi, below))
    return lo, below


def _window_refine(keys: jax.Array, lo: jax.Array, hi: jax.Array, lo_is_zero: bool = False) -> jax.Array:
    """rank_window_mask on flat keys for GPUs: `_select_refine` for each side of the window that needs a
    selection (the low side not when lo is 0 by construction), then the tie cut from block counts
    (`_tie_cuts`, one pass). O(n) passes, all fused reductions: the sample, the bracket's check, the narrowing
    rounds (8-fold narrowings of the bracket), the block counts, the mask."""
    n = keys.shape[0]
    ranks = jnp.stack([jnp.minimum(lo, n - 1), jnp.clip(hi - 1, 0, n - 1)])
    settled = jnp.stack([lo <= 0, hi >= n]) | (lo >= hi)  # sides that select nothing
    sides = (1,) if lo_is_zero else (0, 1)
    t_sel, below_sel = _select_refine(keys, ranks[jnp.asarray(sides)], settled[jnp.asarray(sides)])
    t = jnp.array([0, _MAX_KEY], jnp.uint32).at[jnp.asarray(sides)].set(t_sel)
    below = jnp.zeros(2, jnp.int32).at[jnp.asarray(sides)].set(below_sel)
    t = jnp.where(settled, jnp.array([0, _MAX_KEY], jnp.uint32), t)
    cut, _ = _tie_cuts(keys, t, jnp.stack([lo, hi]) - below)
    cut = jnp.where(settled, jnp.array([0, n], jnp.int32), cut)
    return _window_from_cuts(keys, jnp.arange(n, dtype=jnp.int32), t, cut, lo < hi)


@functools.partial(jax.jit, static_argnames=("lo_is_zero",))
def rank_window_mask(v: jax.Array, lo, hi, *, lo_is_zero: bool = False) -> jax.Array:
    """Mask (shape of v) of the entries whose rank r in the stable ascending order of v.ravel() has lo <= r < hi.

    Stable: equal values rank by flattened index. No sort over large tensors, O(n): with t_lo, t_hi the values
    of rank lo and hi − 1 (selection on order-preserving uint32 keys), an entry has r >= lo iff v > t_lo, or
    v == t_lo and #(v < t_lo) + #(entries == t_lo before it) >= lo; symmetrically r < hi at t_hi. The tied entry
    at a cut is found from per-block counts, then inside one block. Three selections with identical results:
    up to 2^16 entries `_window_sorted` (a sort of the keys); above, chosen by the platform at lowering time, on
    CPU `_window_radix` (two 2^16-bin histograms of all keys give t and #(v < t)), elsewhere `_window_refine` (a
    sampled bracket, then narrowed 8-fold a pass by count reductions).
    lo, hi: int scalars, may be traced; lo_is_zero (static): the caller's lo is always 0 (a top-k window), so
    the GPU selection skips that side."""
    keys = _order_keys(v.reshape(-1))
    n = keys.shape[0]
    if n == 0:
        return jnp.zeros(v.shape, bool)
    lo = jnp.clip(jnp.asarray(lo, jnp.int32), 0, n)
    hi = jnp.clip(jnp.asarray(hi, jnp.int32), 0, n)
    gpu = functools.partial(_window_refine, lo_is_zero=lo_is_zero)
    if n <= _SAMPLE:
        mask = _window_sorted(keys, lo, hi)
    else:
        mask = jax.lax.platform_dependent(keys, lo, hi, cpu=_window_radix, default=gpu)
    return mask.reshape(v.shape)


class WindowCuts(NamedTuple):
    """rank_window_mask's window [lo, hi) over a whole tensor, resolved by `window_cuts` (for one tensor; batched
    over models in window_cuts' result), and where a block of that tensor starts: the mask of a block is then
    elementwise (`rank_window_mask_at`). t (2,) uint32: the keys of ranks lo and hi − 1; cut (2,) int32: entries
    equal to t[0] are kept from this flat index on, those equal to t[1] below it; nonempty: lo < hi; start: the
    flat index of the block's first entry."""

    t: jax.Array
    cut: jax.Array
    nonempty: jax.Array
    start: jax.Array | int = 0


_SLOTS = 6  # radix buckets whose low digits the first pass counts too (around a sample's estimates)
SAMPLE_ENTRIES = 1 << 18  # entries per key vector in that sample (callers take every k-th row / entry)


def _scatter_counts(counts: jax.Array, idx: jax.Array) -> jax.Array:
    """counts (bins,) int32 plus the histogram of idx (1-D int32 in [0, bins)): one scatter-add into `counts`
    (in place when it is a loop's carry; no index normalisation, which jnp's .at[] would materialise)."""
    return jax.lax.scatter_add(counts, idx[:, None], jnp.ones(idx.shape, jnp.int32),
                               jax.lax.ScatterDimensionNumbers((), (0,), (0,)),
                               mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


_WINDOW = 64  # sample buckets scored for each rank (`_predicted_buckets`)


def _predicted_buckets(sample: jax.Array, ranks: jax.Array, n: int, settled: jax.Array) -> jax.Array:
    """(M, _SLOTS) int32: the radix buckets (high 16 bits) most likely to hold the ranks (M, 2) of the window
    sides that are not `settled` (M, 2) (-1: none). sample (M, m): keys of m entries drawn evenly. A rank r
    sits near rank r·m/n of the sample, give or take σ = √(m·q(1−q)) (q = r/n); a bucket holding the sample's
    ranks [a, b) scores Φ((b − r·m/n)/σ) − Φ((a − r·m/n)/σ) (its chance of holding r), over the _WINDOW
    buckets from the sample's rank r·m/n − 4σ (or centred on r·m/n when those do not reach r·m/n + 4σ); the
    _SLOTS best of both sides are taken. Sparse buckets beside a spike of equal values (bf16 task vectors) are
    then passed over for the spike, which holds the rank far more often."""
    m = sample.shape[1]
    q = ranks.astype(jnp.float32) / jnp.float32(n)
    centre = q * m
    sigma = jnp.sqrt(jnp.float32(m) * q * (1 - q)) + 0.5
    hist = jnp.stack([_histogram((k >> 16).astype(jnp.int32), _HIGH) for k in sample])
    at = jnp.clip(jnp.floor(jnp.stack([centre - 4 * sigma, centre + 4 * sigma, centre], axis=-1)), 0, m - 1)
    located, below = jax.vmap(_locate)(hist, at.astype(jnp.int32).reshape(at.shape[0], -1))
    first, last, est = (v[..., 0] for v in jnp.split(located.reshape(at.shape), 3, axis=-1))  # (M, 2) buckets
    start = jnp.where(last - first < _WINDOW, first, est - _WINDOW // 2)
    buckets = start[..., None] + jnp.arange(_WINDOW, dtype=jnp.int32)  # (M, 2, W)
    inside = (buckets >= 0) & (buckets < _HIGH)
    counts = jnp.where(inside, jnp.take_along_axis(hist[:, None, :], jnp.clip(buckets, 0, _HIGH - 1), axis=2), 0)
    offset = jnp.sum(jnp.where(jnp.arange(_HIGH) < start[..., None], hist[:, None, :], 0), axis=2, dtype=jnp.int32)
    tri = jnp.arange(_WINDOW)[:, None] > jnp.arange(_WINDOW)[None, :]  # [k, i]: i before k
    lo_rank = (offset[..., None] + jnp.sum(jnp.where(tri, counts[..., None, :], 0), axis=3)).astype(jnp.float32)
    z = lambda r: jax.scipy.special.ndtr((r - centre[..., None]) / sigma[..., None])  # noqa: E731
    score = jnp.where(inside, z(lo_rank + counts) - z(lo_rank), -1.0)
    score = jnp.where(settled[..., None], -1.0, score).reshape(score.shape[0], -1)  # (M, 2W); settled: none
    buckets = buckets.reshape(score.shape)
    picks = []
    for _ in range(_SLOTS):  # the _SLOTS highest scores of both sides (rounds of argmax: no sort to compile)
        i = jnp.argmax(score, axis=1)
        picks.append(jnp.where(jnp.take_along_axis(score, i[:, None], axis=1)[:, 0] >= 0,
                               jnp.take_along_axis(buckets, i[:, None], axis=1)[:, 0], -1))
        score = jnp.where(jnp.arange(score.shape[1]) == i[:, None], -2.0, score)
    pred = jnp.stack(picks, axis=1)
    return jnp.where((pred >= 0) & (pred < _HIGH), pred, -1)


def _first_pass_index(keys: jax.Array, pred: jax.Array) -> jax.Array:
    """Bins of the first pass: an entry in the predicted bucket pred[s] (the first such s) counts in slot s's
    low-digit histogram, bin (s + 1)·2^16 + its low 16 bits; any other in its high-digit bin."""
    high = (keys >> 16).astype(jnp.int32)
    idx = high
    for slot in reversed(range(pred.shape[0])):
        idx = jnp.where(high == pred[slot], (slot + 1) * _HIGH + (keys & jnp.uint32(0xFFFF)).astype(jnp.int32), idx)
    return idx


def window_cuts(fold, lo, hi, n: int, sample: Optional[jax.Array] = None) -> WindowCuts:
    """The windows [lo_j, hi_j) of M key vectors (ascending order-preserving uint32 keys, `_order_keys`) of n
    entries each, resolved from their blocks, so that a block's mask needs only that block (rank_window_mask_at).
    lo, hi: (M,) int. fold(fn, init) runs acc = fn(acc, keys (M, m) uint32, start) over the blocks in order
    (start: the flat index of the block's first entry, int32) and returns acc.

    The radix select of `_select_radix`, its histograms summed over the blocks, in one pass where `sample`
    (M, m) (keys of entries drawn evenly, e.g. every k-th row) predicts the buckets of the window's ranks: the
    first pass then counts the high digits of all entries and the low digits of those in the predicted
    buckets; a second pass (the low digits of the actual buckets) runs only when a prediction missed. A side
    of the window at 0 or n needs no selection. Then, only where the window boundary splits a run of equal
    keys, the tie cut of `_tie_cuts`, block by block (one more pass). Returns WindowCuts with t, cut (M, 2)
    and nonempty (M,); the masks are those of rank_window_mask, bit for bit, whatever the sample."""
    lo = jnp.clip(jnp.asarray(lo, jnp.int32), 0, n)
    hi = jnp.clip(jnp.asarray(hi, jnp.int32), 0, n)
    n_keys = lo.shape[0]
    rows = jnp.arange(n_keys)
    ranks = jnp.stack([jnp.minimum(lo, n - 1), jnp.clip(hi - 1, 0, n - 1)], axis=1)  # (M, 2)
    settled = jnp.stack([lo <= 0, hi >= n], axis=1) | (lo >= hi)[:, None]  # sides that select nothing
    pred = (jnp.full((n_keys, _SLOTS), -1, jnp.int32) if sample is None
            else _predicted_buckets(sample, ranks, n, settled))

    def first_pass(acc, keys, start):  # one histogram per key vector in the carry (a stacked one is copied)
        return tuple(_scatter_counts(acc[j], _first_pass_index(k, pred[j])) for j, k in enumerate(keys))

    counts = jnp.stack(fold(first_pass, tuple(jnp.zeros(_HIGH * (1 + _SLOTS), jnp.int32) for _ in range(n_keys))))
    low_pred = counts[:, _HIGH:].reshape(n_keys, _SLOTS, _HIGH)
    high = counts[:, :_HIGH]
    for slot in range(_SLOTS):  # the predicted buckets' entries were counted by their low digits
        high = high.at[rows, jnp.maximum(pred[:, slot], 0)].add(
            jnp.where(pred[:, slot] >= 0, jnp.sum(low_pred[:, slot], axis=1), 0))
    bucket, below = jax.vmap(_locate)(high, ranks)  # vmapped over the key vectors: compiled once, not M times
    match = pred[:, None, :] == bucket[:, :, None]  # (M, 2, _SLOTS); the first match holds the counts
    low = jnp.take_along_axis(low_pred, jnp.argmax(match, axis=2)[..., None], axis=1)  # (M, 2, 2^16)

    def second_pass():
        return fold(lambda acc, keys, start: acc + jax.vmap(_radix_low)(keys, bucket),
                    jnp.zeros((n_keys, 2, _HIGH), jnp.int32))

    low = jax.lax.cond(jnp.all(match.any(axis=2) | settled), lambda: low, second_pass)
    t, below = jax.vmap(_radix_values)(low, bucket, below, ranks)
    t = jnp.where(settled, jnp.array([0, 0xFFFFFFFF], jnp.uint32), t)  # every key >= t[0], <= t[1]
    s = jnp.stack([lo, hi], axis=1) - below  # the cut is at the s-th entry equal to t (0-based)
    ties = jnp.take_along_axis(low, (t & jnp.uint32(0xFFFF)).astype(jnp.int32)[..., None], axis=2)[..., 0]
    # s <= 0: every entry equal to t is at or after the cut (cut 0 keeps the same entries); s >= ties: none is
    # (cut n); else the s-th one is found below, block by block.
    split = (s > 0) & (s < ties) & ~settled
    cut = jnp.where(settled, jnp.array([0, n], jnp.int32), jnp.where(s <= 0, 0, n)).astype(jnp.int32)

    def find(acc, keys, start):
        cut, rest, found = acc
        pos, count = jax.vmap(_tie_cuts)(keys, t, jnp.maximum(rest, 0))
        hit = ~found & (pos < keys.shape[1])
        return jnp.where(hit, start + pos, cut), rest - count, found | hit

    cut = jax.lax.cond(jnp.any(split), lambda: fold(find, (cut, s, ~split))[0], lambda: cut)
    return WindowCuts(t, cut, lo < hi)


def rank_window_mask_at(v: jax.Array, cuts: WindowCuts) -> jax.Array:
    """rank_window_mask's mask for the block `v` of a tensor whose window `cuts` resolved (one tensor's
    WindowCuts, `start` the block's flat offset): the entries of the block, bit for bit, of the whole mask."""
    keys = _order_keys(v.reshape(-1))
    idx = jnp.asarray(cuts.start, jnp.int32) + jnp.arange(keys.shape[0], dtype=jnp.int32)
    return _window_from_cuts(keys, idx, cuts.t, cuts.cut, cuts.nonempty).reshape(v.shape)


def magnitude_mask(delta: jax.Array, density) -> jax.Array:
    """Bool mask of the k = max(1, int(d·n)) largest |δ| (ties: lower flat index first). d scalar."""
    lo, hi = magnitude_window(density, delta.size)
    return rank_window_mask(-jnp.abs(delta.astype(jnp.float32)), lo, hi, lo_is_zero=True)


def magnitude_outliers_mask(delta: jax.Array, density, gamma) -> jax.Array:
    """Bool mask of Breadcrumbs' window: drop the int(γ·n) largest |δ| and the smallest, keep int(d·n)."""
    lo, hi = outliers_window(density, gamma, delta.size)
    return rank_window_mask(jnp.abs(delta.astype(jnp.float32)), lo, hi)


def random_mask(key: jax.Array, density, shape) -> jax.Array:
    """DARE mask ~ Bernoulli(d) (bool), drawn from `key`."""
    return _random_mask(key, jnp.asarray(density, jnp.float32), tuple(int(s) for s in shape))


@functools.partial(jax.jit, static_argnums=2)
def _random_mask(key, density, shape):
    return jax.random.bernoulli(key, jnp.clip(density, 0.0, 1.0), shape)


@jax.jit
def della_probabilities(delta: jax.Array, density, epsilon) -> jax.Array:
    """DELLA MagPrune keep probabilities p = (d − ε) + 2ε·(rank − 1)/(m − 1), float32, shape of δ.

    Ranks (1..m) of |δ| ascending along axis 1 (axis 0 for a 1-D tensor; a 0-D tensor is one entry), stable
    (ties: lower index ranks first). A row of one entry (m = 1) gets p = d."""
    a = jnp.abs(delta.astype(jnp.float32))
    axis = 1 if a.ndim >= 2 else 0
    a1 = a.reshape(1) if a.ndim == 0 else a
    m = a1.shape[axis]
    perm = jnp.argsort(a1, axis=axis, stable=True)
    iota = jax.lax.broadcasted_iota(perm.dtype, perm.shape, axis)
    ranks = jnp.put_along_axis(jnp.zeros_like(perm), perm, iota, axis=axis, inplace=False).astype(jnp.float32)  # r-1
    rank_norm = jnp.clip(ranks / jnp.float32(m - 1), 0.0, 1.0) if m > 1 else jnp.full(a1.shape, 0.5, jnp.float32)
    d = jnp.asarray(density, jnp.float32)
    eps = jnp.asarray(epsilon, jnp.float32)
    return ((d - eps) + rank_norm * 2 * eps).reshape(a.shape)


@jax.jit
def della_mask(key: jax.Array, delta: jax.Array, density, epsilon) -> jax.Array:
    """DELLA mask ~ Bernoulli(p) with `della_probabilities` (bool), drawn from `key`."""
    p = della_probabilities(delta, density, epsilon)
    return jax.random.bernoulli(key, jnp.clip(p, 0.0, 1.0), p.shape)


def rescale_masked(delta: jax.Array, mask: jax.Array, rescale: Rescale, keep_prob=None,
                   arith: Arithmetic = FLOAT32) -> jax.Array:
    """m = δ ⊙ mask, rescaled: "l1" -> m·‖δ‖₁/‖m‖₁ (unless a norm < 1e-7); "inv_p" -> m/p; None -> m.

    arith: mergekit's rounding in a reduced dtype (precision.py): the norms, their ratio and the product are
    each rounded, and 1e-7 is compared in that dtype (as torch converts a scalar of a comparison)."""
    r = arith.r
    delta = delta.astype(jnp.float32)
    masked = delta * mask.astype(jnp.float32)
    if rescale is None:
        return masked
    if rescale == "l1":
        before = r(jnp.sum(jnp.abs(delta)))
        after = r(jnp.sum(jnp.abs(masked)))
        eps = arith.const(L1_EPS)
        skip = (before < eps) | (after < eps)
        return jnp.where(skip, masked, r(masked * r(before / jnp.where(skip, 1.0, after))))
    if rescale == "inv_p":
        if keep_prob is None:
            raise ValueError("rescale='inv_p' needs the keep probability")
        p = jnp.broadcast_to(jnp.asarray(keep_prob, jnp.float32), masked.shape)
        return jnp.where(p > 0, r(masked / jnp.where(p > 0, p, 1.0)), 0.0)
    raise ValueError(f"parameter rescale must be 'l1', 'inv_p' or None, got {rescale!r}")


def check_della(density, epsilon, *, what: str = "della_magprune") -> None:
    """mergekit's check 0 < d − ε and d + ε < 1 for every 0 < d < 1 (only when the values are concrete)."""
    d, e = as_double(density), as_double(epsilon)
    if d is None or e is None:
        return
    d, e = np.broadcast_arrays(np.atleast_1d(d), np.atleast_1d(e))
    for i, (di, ei) in enumerate(zip(d.ravel(), e.ravel())):
        if 0 < di < 1 and (di + ei >= 1 or di - ei <= 0):
            raise ValueError(
                f"{what}: model {i}: density ± epsilon must lie in (0, 1), got density={di:g}, epsilon={ei:g}"
            )


@functools.partial(jax.jit, static_argnames=("method", "rescale", "arith"))
def sparsify_core(delta, density, method: SparsifyMethod, window, *, epsilon=None, rescale: Rescale = None,
                  key=None, mask=None, arith: Arithmetic = FLOAT32) -> jax.Array:
    """One task vector with precomputed rank window (lo, hi) (for magnitude/outliers), or the window resolved
    over a whole tensor of which `delta` is a block (WindowCuts: window_cuts); vmap-able over models.

    arith: a reduced compute dtype rounds the rescaling as mergekit on the CPU does: in that dtype for
    magnitude/outliers and for bfloat16 random/della; float16 random/della rescale in float32 (torch.bernoulli
    has no CPU float16 kernel, so mergekit upcasts) and round once."""
    delta = delta.astype(jnp.float32)
    d = jnp.asarray(density, jnp.float32)
    keep_prob = d
    if method in ("magnitude", "magnitude_outliers"):
        v = -jnp.abs(delta) if method == "magnitude" else jnp.abs(delta)
        if mask is not None:
            m = mask
        elif isinstance(window, WindowCuts):  # a block of a tensor, its window resolved over the whole tensor
            m = rank_window_mask_at(v, window)
        else:
            m = rank_window_mask(v, *window, lo_is_zero=method == "magnitude")
    elif method == "random":
        m = _random_mask(key, d, delta.shape) if mask is None else mask
    elif method == "della_magprune":
        if mask is None or rescale == "inv_p":  # an injected mask needs the probabilities only for inv_p
            keep_prob = della_probabilities(delta, d, epsilon)
        m = jax.random.bernoulli(key, jnp.clip(keep_prob, 0.0, 1.0), delta.shape) if mask is None else mask
    else:
        raise ValueError(f"unknown sparsification method {method!r}; known: {SPARSIFY_METHODS}")
    if method in RANDOM_METHODS and arith.dtype == "float16":
        out = arith.r(rescale_masked(delta, m.astype(bool), rescale, keep_prob))
    else:
        out = rescale_masked(delta, m.astype(bool), rescale, keep_prob, arith)
    return jnp.where(d >= 1, delta, jnp.where(d <= 0, 0.0, out))


def window_for(method: SparsifyMethod, density, n: int, gamma=None):
    """Rank windows (lo, hi) for `method` (arrays of density's shape); None for random methods."""
    if method == "magnitude":
        return magnitude_window(density, n)
    if method == "magnitude_outliers":
        if gamma is None:
            raise ValueError("magnitude_outliers needs gamma")
        return outliers_window(density, gamma, n)
    return None


def sparsify(delta: jax.Array, density, method: SparsifyMethod, *, gamma=0.01, epsilon=0.15, rescale=None,
             key: Optional[jax.Array] = None, mask: Optional[jax.Array] = None) -> jax.Array:
    """Sparsify one task vector δ (shape S) as mergekit's `sparsify(...)`; float32 (S).

    density, gamma, epsilon: scalars; rescale: "l1" | "inv_p" | None (or mergekit's bool);
    key: PRNG key for "random"/"della_magprune"; mask: a bool/0-1 mask (S) used instead of the drawn/ranked one.
    """
    if method not in SPARSIFY_METHODS:
        raise ValueError(f"unknown sparsification method {method!r}; known: {SPARSIFY_METHODS}")
    rescale = normalize_rescale(rescale)
    if method in RANDOM_METHODS and mask is None and key is None:
        raise ValueError(f"sparsification {method!r} needs key= (a PRNG key) or mask=")
    if mask is not None and tuple(jnp.shape(mask)) != tuple(delta.shape):
        raise ValueError(f"mask has shape {tuple(jnp.shape(mask))} but the task vector has {tuple(delta.shape)}")
    if method == "della_magprune":
        check_della(density, epsilon)
    window = window_for(method, density, delta.size, gamma)
    return sparsify_core(jnp.asarray(delta), jnp.asarray(density, jnp.float32), method, window,
                         epsilon=None if method != "della_magprune" else jnp.asarray(epsilon, jnp.float32),
                         rescale=rescale, key=key, mask=None if mask is None else jnp.asarray(mask))
