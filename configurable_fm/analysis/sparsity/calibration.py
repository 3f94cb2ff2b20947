"""Calibration of activation-sparsity thresholds: the distribution of |x| at the input of each targeted Linear,
streamed over token batches, and TEAL's uniform thresholds t_p = the p-quantile of |x| (Liu et al. 2024).

    cal = calibrate(model, batches)                     # default targets: q/k/v/o, gate/up/down of every layer
    thresholds = cal.thresholds(0.5)                    # {path: t}: half of each input's entries have |x| <= t
    sparse = sparsify_activations(model, thresholds)
    cal.fraction_below(thresholds)                      # the calibration data's fraction |x| <= t, per path

Histogram (`AbsHistogram`, a Reduction of analysis/reduce.py, so `reduce_over` accumulates it in one jitted step per
batch and no activation is kept): for LogBins(lo, hi, k) the counts of |x| over the masked-in tokens and all the
input features of a Linear, in n = (hi - lo) k log-spaced bins plus two open ends:
    bin 0        |x| < 2^lo            (zeros and tiny values)
    bin i        2^(lo + (i-1)/k) <= |x| < 2^(lo + i/k),   i = 1..n
    bin n + 1    |x| >= 2^hi           (and inf; NaN is dropped)
The default LogBins(-24, 16, 64) spans 2^-24 .. 2^16 in bins 1.1% wide (2562 int32 counts per Linear); the memory is
independent of the number of tokens, and |x| is binned in float32 whatever the model's dtype.

Quantile (`threshold_from_counts`): with N values and the target count pN, the first bin b whose cumulative count
reaches pN; inside it, the fraction f = (pN - counts below b) / counts[b] is placed geometrically (log-uniform within
the bin): t = 2^(lo + (b - 1 + f)/k); in bin 0, linearly: t = 2^lo f. p = 0 gives t = 0 (only exact zeros are
zeroed: the dense model). The error of the achieved fraction on the calibration data is at most the mass of one bin
(in practice far less: the interpolation places it inside the bin). A quantile beyond 2^hi is an error (raise hi).
TEAL's own code builds a linear-bin histogram of the signed x (1% outliers in the two end bins) and takes
icdf(0.5 + p/2), assuming a zero-mean symmetric distribution; the |x| histogram needs no symmetry.

Inputs that several Linears read (llama's q/k/v_proj read one normed x, gate/up_proj another) are found by tracing
the forward once (`shared_inputs`: the same traced array reaches their `.input` points) and histogrammed once; the
Linears that share it get the same thresholds for the same sparsity.

With score='weighted' (module.py: a_i = |x_i| * ||W_i||) or 'scaled' (a_i = |x_i| * s_i, `scales` {path: s}, e.g.
fisher.fisher_scales) each Linear's scores are histogrammed apart (the weight rows, or scales, differ even where the
input is shared), at the `.score` point of a copy of the model whose targets are SparseLinears with threshold -inf
(every entry kept: the dense model's outputs), and the thresholds are on that scale (`Calibration.score` and
`Calibration.scales` say which; pass them to sparsify_activations).

The distribution is measured on the model given (a dense one, as TEAL does): in a model sparsified everywhere, the
inputs of later layers shift a little, so the fraction achieved there drifts from p (`measure.evaluate` reports it).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import batch_inputs, masked_forward
from configurable_fm.analysis.reduce import Reduction, reduce_over, token_mask_like
from configurable_fm.analysis.sparsity.module import (SparsityError, check_scales, check_score, linear_shapes,
                                                      resolve_targets, sparsify_activations)
from configurable_fm.checks import is_int
from configurable_fm.models.taps import TapContext, activate


@dataclasses.dataclass(frozen=True)
class LogBins:
    """Log-spaced bins of |x|: `per_octave` bins per factor 2 between 2^lo and 2^hi, plus bins for |x| < 2^lo and
    |x| >= 2^hi (module docstring)."""

    lo: int = -24
    hi: int = 16
    per_octave: int = 64

    def __post_init__(self):
        for name in ("lo", "hi", "per_octave"):
            value = getattr(self, name)
            if not is_int(value):
                raise SparsityError(f"LogBins: {name} must be an int, got {value!r}")
        if not (self.lo < self.hi and self.per_octave >= 1 and -126 < self.lo and self.hi < 128):
            raise SparsityError(f"LogBins: need -126 < lo < hi < 128 and per_octave >= 1, got lo={self.lo}, "
                                f"hi={self.hi}, per_octave={self.per_octave}")

    @property
    def n(self) -> int:
        """Bins between 2^lo and 2^hi (the counts have n + 2 entries)."""
        return (self.hi - self.lo) * self.per_octave

    def edges(self) -> np.ndarray:
        """The n + 1 edges 2^lo .. 2^hi (float64)."""
        return np.exp2(self.lo + np.arange(self.n + 1) / self.per_octave)

    def index(self, a):
        """The bin of each |x| value `a` (float32, >= 0): int32 in 0..n+1, n + 2 for NaN."""
        k, n = self.per_octave, self.n
        inner = jnp.floor((jnp.log2(jnp.maximum(a, np.float32(2.0 ** self.lo))) - self.lo) * k).astype(jnp.int32)
        idx = jnp.clip(inner + 1, 1, n)
        idx = jnp.where(a < np.float32(2.0 ** self.lo), 0, idx)
        idx = jnp.where(a >= np.float32(2.0 ** self.hi), n + 1, idx)
        return jnp.where(jnp.isnan(a), n + 2, idx)


@dataclasses.dataclass(frozen=True)
class AbsHistogram(Reduction):
    """Counts of |x| over the masked-in tokens and every feature, in the LogBins: (n + 2,) int32."""

    bins: LogBins = LogBins()
    name: str = "abs_histogram"

    def batch(self, x, m):
        size = self.bins.n + 2
        idx = self.bins.index(jnp.abs(x.astype(jnp.float32)))
        idx = jnp.where(token_mask_like(m, x), idx, size)
        return jnp.zeros((size,), jnp.int32).at[idx.reshape(-1)].add(1, mode="drop")


def threshold_from_counts(counts: np.ndarray, bins: LogBins, p: float, where: str = "") -> float:
    """t with the fraction p of the histogrammed |x| at or below it (module docstring); p in [0, 1)."""
    p = check_sparsity(p, where)
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise SparsityError(f"threshold: no calibration values{' for ' + where if where else ''}")
    if p == 0.0:
        return 0.0
    target = p * total
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, target, side="left"))
    if b >= bins.n + 1:
        raise SparsityError(f"threshold: the {p}-quantile of |x|{' at ' + where if where else ''} lies above "
                            f"2^{bins.hi} (LogBins.hi); calibrate with a larger hi")
    below = cum[b - 1] if b else 0.0
    f = (target - below) / counts[b]
    if b == 0:
        return float(2.0 ** bins.lo * f)
    return float(2.0 ** (bins.lo + (b - 1 + f) / bins.per_octave))


def fraction_from_counts(counts: np.ndarray, bins: LogBins, t: float) -> float:
    """The fraction of the histogrammed |x| at or below t, interpolated as threshold_from_counts places values
    (its inverse inside the range)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if t < 0:
        return 0.0
    if t < 2.0 ** bins.lo:
        return float(counts[0] * t / 2.0 ** bins.lo / total)
    if t >= 2.0 ** bins.hi:
        return float(counts[:-1].sum() / total)
    pos = (math.log2(t) - bins.lo) * bins.per_octave  # in [0, n)
    i = int(pos)
    return float((counts[:i + 1].sum() + counts[i + 1] * (pos - i)) / total)


def check_sparsity(p, where: str = "") -> float:
    """p as a float in [0, 1); SparsityError naming `where` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not (0.0 <= float(p) < 1.0):
        raise SparsityError(f"sparsity{' for ' + where if where else ''} must be a number in [0, 1) (the fraction "
                            f"of input entries zeroed), got {p!r}")
    return float(p)


@dataclasses.dataclass
class Calibration:
    """|x| histograms of the inputs of the targeted Linears (module docstring).

    counts {path: (n + 2,) int64} (Linears sharing an input share one array); bins; tokens = masked-in tokens
    counted; shared {path: the path whose `.input` point was histogrammed}; shapes {path: (in, out)}; score: what
    was histogrammed ('magnitude': |x|, 'weighted': |x| * ||W_i||, 'scaled': |x| * s, each path apart); scales
    {path: s (in,) float32} for 'scaled', else None."""

    counts: dict[str, np.ndarray]
    bins: LogBins
    tokens: int
    shared: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    score: str = "magnitude"
    scales: Optional[dict[str, np.ndarray]] = None

    @property
    def paths(self) -> list[str]:
        return list(self.counts)

    def thresholds(self, sparsity) -> dict[str, float]:
        """{path: t_p}: one sparsity p for every path (TEAL's uniform allocation), or {path: p} for the paths
        given (e.g. a greedy allocation). SparsityError for p outside [0, 1) or a path not calibrated."""
        if isinstance(sparsity, Mapping):
            unknown = [p for p in sparsity if p not in self.counts]
            if unknown:
                raise SparsityError(f"thresholds: {unknown[:4]} not calibrated; calibrated paths are e.g. "
                                    f"{self.paths[:4]}")
            wanted = dict(sparsity)
        else:
            p = check_sparsity(sparsity)
            wanted = {path: p for path in self.counts}
        return {path: threshold_from_counts(self.counts[path], self.bins, p, path) for path, p in wanted.items()}

    def fraction_below(self, thresholds: Mapping[str, float]) -> dict[str, float]:
        """{path: the calibration data's fraction of |x| <= t} (interpolated in the bins)."""
        return {p: fraction_from_counts(self.counts[p], self.bins, float(t)) for p, t in thresholds.items()}


class _InputProbe(TapContext):
    """Records, during one traced forward, which `.input` points of the wanted paths receive the same array."""

    def __init__(self, model, wanted: set[str]):
        super().__init__(model)
        self.wanted = wanted
        self.first: dict[int, str] = {}  # id(traced array) -> first path that received it
        self.shared: dict[str, str] = {}
        self.keep: list = []  # references, so that ids are not reused during the trace

    def on_point(self, point: str, value):
        path, _, name = point.rpartition(".")
        if name == "input" and path in self.wanted and path not in self.shared:
            self.keep.append(value)
            self.shared[path] = self.first.setdefault(id(value), path)
        return value


def shared_inputs(model, paths: Sequence[str], ids_shape: tuple[int, int]) -> dict[str, str]:
    """{path: the first of `paths` (in forward order) whose `.input` is the very same array}, found by tracing
    `model(ids)` once with `jax.eval_shape` (nothing is computed)."""
    graphdef, state = nnx.split(model)
    found: dict[str, str] = {}

    def forward(state, ids):
        m = nnx.merge(graphdef, state)
        probe = _InputProbe(m, set(paths))
        with activate(probe):
            m(ids)
        found.update(probe.shared)

    jax.eval_shape(forward, state, jax.ShapeDtypeStruct(tuple(ids_shape), jnp.int32))
    missing = [p for p in paths if p not in found]
    if missing:
        raise SparsityError(f"calibrate: the forward never calls {missing[:4]}")
    return {p: found[p] for p in paths}


def peek(batches: Iterable[Mapping[str, Any]], what: str) -> tuple[Mapping[str, Any], Iterable]:
    """(the first batch, an iterable of all of them); SparsityError when there is none."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise SparsityError(f"{what}: no batches") from None
    return first, itertools.chain([first], it)


def calibrate(model, batches: Iterable[Mapping[str, Any]], targets: Optional[Sequence[str]] = None, *,
              bins: LogBins = LogBins(), max_batches: Optional[int] = None, progress: bool = False,
              log: Optional[Callable[[str], None]] = None, score: str = "magnitude",
              scales: Optional[Mapping[str, Any]] = None) -> Calibration:
    """The histograms of the scores a (|x|; |x| * ||W_i|| with score='weighted'; |x| * s with score='scaled' and
    `scales` {path: s (in,)} for every target) at the inputs of the Linears `targets` names
    (sparsity.resolve_targets: paths or globs; None = the family's defaults) over `batches` (pipeline dicts:
    {'inputs': (B, T) ids, 'attention_mask'?, 'loss_mask'?, 'mask'?}; analysis/batches.py `token_mask` says which
    tokens count; with an attention_mask the forward passes it), streamed with reduce_over (module docstring).
    Targets that are already SparseLinears: 'magnitude' histograms the model as it is (a sparse target upstream
    still zeroes its input), 'weighted' and 'scaled' a copy with every target dense (threshold -inf) while its
    scores are read. `model` is not modified."""
    check_score(score, "calibrate")
    paths = resolve_targets(model, targets, op="calibrate")
    if score == "scaled":
        scales = check_scales(scales, paths, linear_shapes(model, paths), "calibrate")
    elif scales is not None:
        raise SparsityError(f"calibrate: scales are for score 'scaled', not {score!r}")
    first, stream = peek(batches, "calibrate")
    if score == "magnitude":
        shared = shared_inputs(model, paths, batch_inputs(first, "calibrate: batch 0").shape)
        point, probed = "input", model
    else:  # every path its own scale: histogram each SparseLinear's `.score`, every entry kept (t = -inf)
        shared = {p: p for p in paths}
        point, probed = "score", sparsify_activations(model, {p: -math.inf for p in paths}, score=score,
                                                      scales=scales)
    sources = list(dict.fromkeys(shared.values()))
    reduction = AbsHistogram(bins)
    if "attention_mask" in first:
        forward, keys = masked_forward, ("inputs", "attention_mask")
    else:
        forward, keys = None, ("inputs",)
    got = reduce_over(probed, stream, {f"{s}.{point}": reduction for s in sources}, forward=forward,
                      batch_keys=keys, max_batches=max_batches, progress=progress, log=log,
                      desc="sparsity: calibration")
    hist = {s: np.asarray(got[f"{s}.{point}"][reduction.name], np.int64) for s in sources}
    return Calibration(counts={p: hist[shared[p]] for p in paths}, bins=bins, tokens=int(got.tokens), shared=shared,
                       shapes=linear_shapes(model, paths), score=score, scales=scales)
