"""FFN neuron statistics and the survey's neuron analyses (Xiao et al. 2024, arXiv 2409.02877, section 4).

    stats = activation_stats(model, batches)                       # streamed over token batches, one jitted step each
    print(stats.summary()); stats.mean_abs                         # (L, F)
    acts = per_example_activations(model, prompts)                 # (N, L, F) mean |a| over each example's tokens
    spec = specialisation_scores(acts, {"code": is_code, "math": is_math})  # AP of each neuron per function
    top = top_neurons(spec, "code", 0.05)                          # {point: neuron indices}
    partition_overlap(spec, 0.05)                                  # (K, K) |T_f ∩ T_g| / |T_f|
    logits = intervene(model, {"**.mlp.hidden": mask_low_activation(0.7)}, ids)   # survey's dynamic masking
    logits = intervene(model, mask_neurons(model, top), ids)       # zero a function's top neurons

A neuron is one feature of a layer's FFN hidden tap point (analysis/taps.py): `layers.<i>.mlp.hidden` =
act(gate_proj x) * up_proj x for llama-family SwiGLU, `h.<i>.mlp.hidden` = act(c_fc x) for gpt2,
`encoder.layer.<i>.intermediate.hidden` for bert; it is the input of the down projection, so neuron i is
row i of gate/up (column i of W_in) and row i of down_proj's kernel, and a = its value. The default `points`,
'**.mlp.hidden', selects the hidden point of every decoder layer of llama, Mixtral-style MoE and gpt2 models.
MoE hidden points are (B, T, E, F): their statistics keep the expert axis, (L, E, F).

Statistics (activation_stats), over the N masked-in tokens of all batches (analysis/batches.py token_mask: the
attention_mask when a batch has one, so padding never counts; it is also passed to the forward):
    mean_abs[l, i]  = (1/N) sum_t |a_ti|                  mean[l, i] = (1/N) sum_t a_ti
    mean_square[l, i] = (1/N) sum_t a_ti^2               active[l, i] = #{t : |a_ti| > threshold}
    frequency = active / N                               sparsity[l] = 1 - sum_i active[l, i] / (N F)
    histogram[l, k] = #{(t, i) : e_k <= |a_ti| < e_k+1} over K = len(edges) + 1 bins, the cut points
        e = (0, *edges, inf): bin 0 holds |a| < edges[0] (exact zeros too), the last one |a| >= edges[-1]
    coactivation[l, i, j] = #{t : |a_ti| > threshold and |a_tj| > threshold}   (opt-in: F^2 per layer)
All are reduce_over reductions (analysis/reduce.py): each batch is reduced inside one jitted step where the
values are produced, nothing per token leaves the device.

Per-example activations (per_example_activations): A[n, l, i] = mean over example n's real tokens of |a|; the
survey averages over the prompt tokens of each chat instance (feed the prompts: under causal attention a
prompt token's activations do not depend on what follows).

Function-specialisation score (the survey's Eq. 1, after Zhang et al. 2023): for neuron i and function f with
binary labels y^f over the examples, score = AP(A[:, i], y^f), the average precision of ranking the examples
by the neuron's activation, exactly as sklearn.metrics.average_precision_score computes it:
    AP = sum_k (R_k - R_{k-1}) P_k
over the distinct score values s_1 > s_2 > ... (tied examples enter together), P_k and R_k the precision and
recall of predicting 1 for every example with score >= s_k (R_0 = 0). A function with no positive example
scores 0 (sklearn's value, which warns); a neuron constant over the examples scores the positive rate.
`two_sided=True` gives max(AP(y), AP(1 - y)), thunlp/Modularity-Analysis' sign-agnostic variant.

Dynamic masking (mask_low_activation, the survey's section 4.3): per token, the k = floor(p F) neurons of the
lowest |a| (or |a| * scale, e.g. scale = ||W_out[i]|| for the output-magnitude indicator) are set to 0; ties
go to the lower neuron index. It is an oracle (it needs the activations), not a speed-up.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import masked_forward, token_mask
from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.interventions import Mask, mask
from configurable_fm.analysis.reduce import (HIGHEST, Mean, MeanSquare, Reduction, masked_f32, reduce_over,
                                             token_mask_like)
from configurable_fm.analysis.taps import Intervention, Matcher, TapError, patterns_of, tap_points
from configurable_fm.checks import is_int

FFN_HIDDEN = "**.mlp.hidden"


# ------------------------------------------------------------------------------------------------ reductions
@dataclasses.dataclass(frozen=True)
class MeanAbs(Reduction):
    """sum m |x| / N per feature: (*M, F)."""

    name: str = "mean_abs"

    def batch(self, x, m):
        return jnp.sum(jnp.abs(masked_f32(x, m)), axis=(0, 1))

    def finish(self, total, n):
        return total / (np.float64(n) if isinstance(total, np.ndarray) else jnp.float32(n))


@dataclasses.dataclass(frozen=True)
class CountAbsAbove(Reduction):
    """sum m [|x| > threshold] per feature: (*M, F), integer."""

    threshold: float = 0.0
    name: str = "count_abs_above"

    def batch(self, x, m):
        return jnp.sum((jnp.abs(x) > self.threshold) & token_mask_like(m, x), axis=(0, 1), dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class AbsHistogram(Reduction):
    """Counts of the masked-in |x| (pooled over features) in the len(edges) + 1 bins cut at `edges` (increasing):
    bin 0 is |x| < edges[0], bin k is edges[k-1] <= |x| < edges[k], the last |x| >= edges[-1]; NaN dropped."""

    edges: tuple = ()
    name: str = "abs_histogram"

    def batch(self, x, m):
        k = len(self.edges) + 1
        ax = jnp.abs(x.astype(jnp.float32))
        idx = jnp.searchsorted(jnp.asarray(self.edges, jnp.float32), ax, side="right")
        keep = token_mask_like(m, x) & ~jnp.isnan(ax)
        return jnp.zeros((k,), jnp.int32).at[jnp.where(keep, idx, k).reshape(-1)].add(1, mode="drop")


@dataclasses.dataclass(frozen=True)
class CoActivation(Reduction):
    """C = sum_t m_t [|x_t| > threshold] [|x_t| > threshold]^T over the last axis: (*M, F, F), integer (exact
    while one batch has < 2^24 tokens)."""

    threshold: float = 0.0
    name: str = "coactivation"

    def batch(self, x, m):
        on = ((jnp.abs(x) > self.threshold) & token_mask_like(m, x)).astype(jnp.float32)
        on = on.reshape((-1,) + x.shape[2:])
        c = jnp.einsum("n...i,n...j->...ij", on, on, precision=HIGHEST, preferred_element_type=jnp.float32)
        return jnp.round(c).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ statistics
def log_edges(bins: int | Sequence[float] = 48, bin_range: tuple[float, float] = (1e-6, 1e2)) -> np.ndarray:
    """Histogram edges of |a|: `bins` log-spaced bins over bin_range (bins + 1 edges), or the given edges."""
    if is_int(bins):
        lo, hi = bin_range
        if bins < 1 or not (0 < lo < hi and np.isfinite(hi)):
            raise ValueError(f"activation_stats: need bins >= 1 and 0 < lo < hi, got bins={bins}, "
                             f"bin_range={bin_range}")
        return np.logspace(np.log10(lo), np.log10(hi), int(bins) + 1)
    if isinstance(bins, bool) or np.ndim(bins) != 1:
        raise ValueError(f"activation_stats: bins is a number of bins (an int) or a 1-D sequence of edges, got "
                         f"{bins!r}")
    edges = np.asarray(bins, np.float64).reshape(-1)
    if edges.size < 1 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0) or edges[0] < 0:
        raise ValueError(f"activation_stats: edges must be finite, non-negative and increasing, got {bins!r}")
    return edges


@dataclasses.dataclass
class NeuronStats:
    """Statistics of FFN neurons over the masked-in tokens of a run (module docstring for the formulas).

    points (L,) tap point names in forward order; tokens N; threshold; edges (K-1,) float64, the histogram's
    cut points. L layers, F neurons per layer (MoE points: (E, F) where F appears below):
        mean_abs, mean, mean_square   (L, F) float64
        active                        (L, F) int64     tokens with |a| > threshold
        histogram                     (L, K) int64     |a| pooled over a layer's neurons; each row sums to N F
        coactivation                  (L, F, F) int64 or None   tokens with both active (diagonal = active)
    Derived: frequency (L, F) = active / N; sparsity (L,) = 1 - mean frequency; dead (L,) = neurons never active.
    """

    points: tuple[str, ...]
    tokens: int
    threshold: float
    mean_abs: np.ndarray
    mean: np.ndarray
    mean_square: np.ndarray
    active: np.ndarray
    histogram: np.ndarray
    edges: np.ndarray
    coactivation: Optional[np.ndarray] = None

    @property
    def frequency(self) -> np.ndarray:
        return self.active / max(self.tokens, 1)

    @property
    def sparsity(self) -> np.ndarray:
        return 1.0 - self.frequency.reshape(len(self.points), -1).mean(axis=1)

    @property
    def dead(self) -> np.ndarray:
        return (self.active.reshape(len(self.points), -1) == 0).sum(axis=1)

    def quantile(self, q: float) -> np.ndarray:
        """(L,) the upper edge of the histogram bin holding the q-quantile of each layer's |a| (inf past the last
        edge): an upper bound read off the fixed bins."""
        upper = np.concatenate([self.edges, [np.inf]])
        c = np.cumsum(self.histogram, axis=1)
        k = np.argmax(c >= q * c[:, -1:], axis=1)
        return upper[k]

    def summary(self) -> str:
        """A table: per layer, neurons, mean |a|, the largest neuron mean |a|, active fraction (|a| > threshold),
        sparsity, dead neurons, median and 90% quantile bounds of |a| (histogram bins)."""
        f = int(np.prod(self.mean_abs.shape[1:]))
        head = (f"{'point':<28} {'neurons':>7} {'mean|a|':>9} {'max mean|a|':>11} {'active':>7} "
                f"{'sparsity':>8} {'dead':>5} {'p50|a|<=':>9} {'p90|a|<=':>9}")
        p50, p90 = self.quantile(0.5), self.quantile(0.9)
        rows = [f"{self.tokens} tokens, |a| > {self.threshold:g} counts as active", head, "-" * len(head)]
        for i, p in enumerate(self.points):
            ma = self.mean_abs[i].reshape(-1)
            rows.append(f"{p:<28} {f:>7} {ma.mean():>9.4g} {ma.max():>11.4g} {1 - self.sparsity[i]:>7.3f} "
                        f"{self.sparsity[i]:>8.3f} {int(self.dead[i]):>5} {p50[i]:>9.3g} {p90[i]:>9.3g}")
        return "\n".join(rows)


def _as_batch(b) -> Mapping[str, Any]:
    return b if isinstance(b, Mapping) else {"inputs": np.asarray(b)}


def _forward_for(batches: Iterable, what: str):
    """(batches as dicts with their first one put back, forward, batch_keys): with an attention_mask the forward
    passes it to the model, so padding changes no real token's values."""
    it = iter(batches)
    try:
        first = _as_batch(next(it))
    except StopIteration:
        raise ValueError(f"{what}: no batches") from None
    stream = itertools.chain([first], (_as_batch(b) for b in it))
    if "attention_mask" in first:
        return stream, masked_forward, ("inputs", "attention_mask")
    return stream, None, ("inputs",)


def _stack(values: Sequence[np.ndarray], points: Sequence[str], what: str, dtype) -> np.ndarray:
    shapes = {tuple(np.shape(v)) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"{what}: the selected points differ in shape "
                         f"({dict(zip(points, (tuple(np.shape(v)) for v in values)))}); select points of one width")
    return np.stack([np.asarray(v, dtype) for v in values])


def activation_stats(model: nnx.Module, batches: Iterable, *, points: str | Sequence[str] = FFN_HIDDEN,
                     threshold: float = 0.0, bins: int | Sequence[float] = 48,
                     bin_range: tuple[float, float] = (1e-6, 1e2), coactivation: bool = False,
                     max_batches: Optional[int] = None, accumulate: str = "float32", mesh=None, rules=None,
                     progress: bool = False, log: Optional[Callable[[str], None]] = None) -> NeuronStats:
    """Statistics of the neurons at `points` over `batches`, streamed (module docstring; NeuronStats' fields).

    batches: an iterable of pipeline dicts {'inputs': (B, T) ids, 'attention_mask'?, 'loss_mask'?, 'mask'?}
      (analysis/batches.py token_mask says which tokens count) or of plain (B, T) id arrays. When the first batch
      has an attention_mask, every batch needs one and the forward is model(ids, attention_mask=...).
    points: glob(s) of hidden tap points (default '**.mlp.hidden'); all matched points must have one shape.
    threshold: |a| > threshold is active. bins / bin_range: numbers of log-spaced bins over bin_range, or the
      edges themselves (numpy.histogram's convention), of the |a| histogram (which adds an underflow and an
      overflow bin). coactivation: also count F x F co-activations per layer (memory F^2 per layer).
    max_batches, accumulate ('float64': host sums), mesh / rules, progress, log: as reduce_over.
    """
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"activation_stats: threshold must be finite and >= 0, got {threshold}")
    edges = log_edges(bins, bin_range)
    reductions: list[Reduction] = [MeanAbs(), Mean(), MeanSquare(), CountAbsAbove(float(threshold)),
                                   AbsHistogram(tuple(float(e) for e in edges))]
    if coactivation:
        reductions.append(CoActivation(float(threshold)))
    stream, forward, keys = _forward_for(batches, "activation_stats")
    spec = {p: reductions for p in patterns_of(points, "activation_stats")}
    got = reduce_over(model, stream, spec, forward=forward, batch_keys=keys, max_batches=max_batches,
                      accumulate=accumulate, mesh=mesh, rules=rules, progress=progress, log=log,
                      desc="activation_stats")
    pts = tuple(got)
    if any(got.visits[p] != 1 for p in pts):
        raise TapError(f"activation_stats: points computed more than once per forward: "
                       f"{[p for p in pts if got.visits[p] != 1]}")

    def col(name, dtype):
        return _stack([np.asarray(got[p][name]) for p in pts], pts, "activation_stats", dtype)

    return NeuronStats(points=pts, tokens=got.tokens, threshold=float(threshold),
                       mean_abs=col("mean_abs", np.float64), mean=col("mean", np.float64),
                       mean_square=col("mean_square", np.float64), active=col("count_abs_above", np.int64),
                       histogram=col("abs_histogram", np.int64), edges=edges,
                       coactivation=col("coactivation", np.int64) if coactivation else None)


# ------------------------------------------------------------------------------------------------ per example
@dataclasses.dataclass
class ExampleActivations:
    """values (N, L, F) float32: mean |a| (or mean a) of each neuron over each example's real tokens; points (L,)
    tap point names; tokens (N,) int64, the real tokens of each example (an example with none has zeros)."""

    values: np.ndarray
    points: tuple[str, ...]
    tokens: np.ndarray


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _example_batches(examples, batch_size: int, pad_id: int, pad_to: int) -> Iterable[dict]:
    """Right-padded batches of `batch_size` rows (the last one filled with empty rows, row mask 0) from 1-D id
    sequences, lengths rounded up to a multiple of pad_to (few compilations); dict batches pass through."""
    rows: list[np.ndarray] = []

    def flush():
        t = _bucket(max(len(r) for r in rows), pad_to)
        ids = np.full((batch_size, t), pad_id, np.int32)
        am = np.zeros((batch_size, t), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], am[i, :len(r)] = r, 1
        n = len(rows)
        rows.clear()
        return {"inputs": ids, "attention_mask": am, "_rows": n}

    for ex in examples:
        if isinstance(ex, Mapping):
            if rows:
                yield flush()
            yield dict(ex)
            continue
        r = np.asarray(ex).reshape(-1)
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"per_example_activations: an example is {r.dtype} {r.shape}; examples are 1-D token "
                             "id sequences or batch dicts")
        rows.append(r.astype(np.int32))
        if len(rows) == batch_size:
            yield flush()
    if rows:
        yield flush()


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _example_means(graphdef, patterns, names, absolute, state, ids, am, m):
    """[(B, *M, F) mean of |a| (or a) over each row's masked-in tokens, for each point in `names`]."""
    _, values = capture(nnx.merge(graphdef, state), list(patterns), lambda mm: mm(ids, attention_mask=am))
    n = jnp.maximum(m.sum(axis=1), 1.0)
    out = []
    for name in names:
        x = jnp.abs(values[name]) if absolute else values[name]
        out.append(jnp.sum(masked_f32(x, m), axis=1) / n.reshape((-1,) + (1,) * (x.ndim - 2)))
    return out


def per_example_activations(model: nnx.Module, examples: Iterable, *, points: str | Sequence[str] = FFN_HIDDEN,
                            absolute: bool = True, batch_size: int = 8, pad_id: int = 0,
                            pad_to: int = 16) -> ExampleActivations:
    """The mean over each example's real tokens of every neuron's |activation| (absolute=False: activation).

    examples: 1-D token id sequences (each one example; batched `batch_size` at a time, right-padded with pad_id
      to a multiple of `pad_to` tokens, with an attention_mask) or batch dicts as activation_stats takes (each
      row one example, its tokens those of token_mask; a row mask 'mask' of 0 drops the row). One jitted capture
      per batch shape returns only the (B, L, F) means.
    """
    for name, value in (("batch_size", batch_size), ("pad_to", pad_to)):
        if not is_int(value) or value < 1:
            raise ValueError(f"per_example_activations: {name} must be an int >= 1, got {value!r}")
    pats = patterns_of(points, "per_example_activations")
    matcher = Matcher(pats)
    names = tuple(p for p in tap_points(model, jax.ShapeDtypeStruct((1, 2), jnp.int32)) if matcher(p))
    graphdef, state = nnx.split(model)
    means = functools.partial(_example_means, graphdef, tuple(pats), names, bool(absolute))

    chunks, tokens, seen = [], [], False
    for bi, batch in enumerate(_example_batches(examples, batch_size, pad_id, pad_to)):
        rows = batch.pop("_rows", None)
        m = token_mask(batch, f"batch {bi}")
        ids = np.asarray(batch["inputs"], np.int32)
        am = np.asarray(batch.get("attention_mask", np.ones_like(ids)), np.int32)
        keep = np.arange(ids.shape[0]) < rows if rows is not None else np.asarray(batch.get("mask", np.ones(
            ids.shape[0])), np.float32) > 0
        out = means(state, jnp.asarray(ids), jnp.asarray(am), jnp.asarray(m))
        seen = True
        chunks.append(_stack([np.asarray(o) for o in out], names, "per_example_activations",
                             np.float32).swapaxes(0, 1)[keep])
        tokens.append(m.sum(axis=1).astype(np.int64)[keep])
    if not seen:
        raise ValueError("per_example_activations: no examples")
    return ExampleActivations(np.concatenate(chunks), names, np.concatenate(tokens))


# ------------------------------------------------------------------------------------------------ AP scores
def average_precision(scores, labels, *, chunk: int = 1 << 22) -> np.ndarray:
    """AP of ranking the N examples by `scores` (N, *S) against binary `labels` (N,) or (N, K), for every
    column: (*S,) or (*S, K) float64, as sklearn.metrics.average_precision_score (module docstring): ties in
    score enter together at the precision after the whole tied group; no positive label gives 0."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    single = y.ndim == 1
    y = (y.reshape(y.shape[0], -1) if not single else y[:, None])
    if s.ndim < 1 or s.shape[0] != y.shape[0]:
        raise ValueError(f"average_precision: scores {s.shape} and labels {np.shape(labels)} differ in examples")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("average_precision: labels must be binary (0/1 or bool)")
    if np.isnan(s).any():
        raise ValueError("average_precision: scores contain NaN")
    n, k = y.shape
    cols = s.reshape(n, -1)
    y = y.astype(np.float64)
    positives = y.sum(axis=0)  # (K,)
    out = np.zeros((cols.shape[1], k))
    step = max(1, chunk // max(1, n * k))
    for c0 in range(0, cols.shape[1], step):
        c = cols[:, c0:c0 + step]  # (N, C)
        order = np.argsort(-c, axis=0, kind="stable")
        sc = np.take_along_axis(c, order, axis=0)
        last = np.ones_like(sc, bool)
        last[:-1] = sc[:-1] != sc[1:]  # the last example of each tied group
        end = np.where(last, np.arange(n)[:, None], n)
        end = np.minimum.accumulate(end[::-1], axis=0)[::-1]  # each position's group end
        ys = y[order]  # (N, C, K)
        tp = np.cumsum(ys, axis=0)
        precision_at_end = np.take_along_axis(tp, np.broadcast_to(end[..., None], tp.shape), axis=0) / (
            end[..., None] + 1.0)
        out[c0:c0 + step] = np.sum(ys * precision_at_end, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(positives > 0, out / np.maximum(positives, 1), 0.0)
    ap = ap.reshape(s.shape[1:] + (k,))
    return ap[..., 0] if single else ap


@dataclasses.dataclass
class Specialisation:
    """scores (K, L, F) float64: the AP of each neuron (l, i) for each function k; functions (K,) names; points
    (L,) tap point names (or layer indices 0..L-1 when the activations were a plain array)."""

    scores: np.ndarray
    functions: tuple[str, ...]
    points: tuple

    def index(self, function) -> int:
        if is_int(function):
            if not -len(self.functions) <= function < len(self.functions):
                raise IndexError(f"function {function} is outside the {len(self.functions)} functions")
            return int(function) % len(self.functions)
        if function not in self.functions:
            raise KeyError(f"no function {function!r}; the functions are {list(self.functions)}")
        return self.functions.index(function)

    def summary(self, fraction: float = 0.05) -> str:
        """A table of each function's AP distribution over the neurons: mean, 99th percentile, max, the share of
        neurons below 0.2 (survey: about 80%), and the smallest score in the top `fraction`."""
        top_name = f"top-{fraction:g} min"
        head = f"{'function':<16} {'mean AP':>8} {'p99':>7} {'max':>7} {'<0.2':>6} {top_name:>12}"
        rows = [head, "-" * len(head)]
        for k, f in enumerate(self.functions):
            s = self.scores[k].reshape(-1)
            top = np.sort(s)[::-1][:max(1, _top_count(s.size, fraction))]
            rows.append(f"{f:<16} {s.mean():>8.3f} {np.quantile(s, 0.99):>7.3f} {s.max():>7.3f} "
                        f"{(s < 0.2).mean():>6.2f} {top[-1]:>12.3f}")
        return "\n".join(rows)


def specialisation_scores(acts, labels, *, functions: Optional[Sequence[str]] = None,
                          two_sided: bool = False) -> Specialisation:
    """The survey's functionality score of every neuron: AP of the examples ranked by the neuron's per-example
    activation against each function's binary labels (module docstring).

    acts: ExampleActivations, or an array (N, L, F) or (N, F) (examples first). labels: {function: (N,) binary},
    or an (N,) / (N, K) binary array (functions: their names; default '0', '1', ...). two_sided: max(AP(y),
    AP(1 - y)) (Modularity-Analysis' variant). Returns Specialisation with scores (K, L, F).
    """
    if isinstance(acts, ExampleActivations):
        values, points = acts.values, acts.points
    else:
        values = np.asarray(acts)
        if values.ndim == 2:
            values = values[:, None, :]
        if values.ndim < 3:
            raise ValueError(f"specialisation_scores: activations are (N, L, F) or (N, F), got {values.shape}")
        points = tuple(range(values.shape[1]))
    if isinstance(labels, Mapping):
        names = tuple(str(k) for k in labels)
        y = np.stack([np.asarray(v).reshape(-1) for v in labels.values()], axis=1)
    else:
        y = np.asarray(labels)
        y = y[:, None] if y.ndim == 1 else y
        names = tuple(functions) if functions is not None else tuple(str(i) for i in range(y.shape[1]))
    if y.ndim != 2 or y.shape[0] != values.shape[0] or len(names) != y.shape[1]:
        raise ValueError(f"specialisation_scores: labels {y.shape} (functions {list(names)}) do not fit "
                         f"activations of {values.shape[0]} examples")
    ap = average_precision(values, y)  # (L, F, K)
    if two_sided:
        ap = np.maximum(ap, average_precision(values, 1 - y.astype(np.int64)))
    return Specialisation(np.moveaxis(ap, -1, 0), names, points)


def _top_count(total: int, fraction: float) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return int(round(fraction * total))


def top_mask(spec: Specialisation, function, fraction: float, *, per_layer: bool = False) -> np.ndarray:
    """(L, F) bool: the k = round(fraction * L F) neurons of the highest score for `function` over the whole
    model (per_layer: round(fraction * F) in each layer); ties go to the earlier (layer, neuron)."""
    s = spec.scores[spec.index(function)]
    flat = s.reshape(s.shape[0], -1) if per_layer else s.reshape(1, -1)
    k = _top_count(flat.shape[1], fraction)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    chosen = np.zeros(flat.shape, bool)
    np.put_along_axis(chosen, order, True, axis=1)
    return chosen.reshape(s.shape)


def top_neurons(spec: Specialisation, function, fraction: float, *,
                per_layer: bool = False) -> dict[Any, np.ndarray]:
    """{point: sorted neuron indices} of the top `fraction` neurons of `function` (top_mask), every layer listed
    (empty where none): the input of mask_neurons."""
    chosen = top_mask(spec, function, fraction, per_layer=per_layer)
    return {p: np.flatnonzero(chosen[i].reshape(-1)) for i, p in enumerate(spec.points)}


def partition_overlap(spec: Specialisation, fraction: float = 0.05, *, per_layer: bool = False) -> np.ndarray:
    """(K, K) overlap of the functions' top-`fraction` neuron sets T_f (top_mask):
        overlap[f, g] = |T_f ∩ T_g| / |T_f|   (all |T_f| = k, so it is symmetric; the diagonal is 1)
    The survey's "distribution similarity" of section 4.5 (its formula is not printed; this reading matches its
    random-pair baseline: two random sets of a fraction p of the neurons overlap by p in expectation, 0.05 at 5%).
    """
    masks = np.stack([top_mask(spec, k, fraction, per_layer=per_layer).reshape(-1)
                      for k in range(len(spec.functions))]).astype(np.float64)
    size = masks.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (masks @ masks.T) / size[:, None]


# ------------------------------------------------------------------------------------------------ interventions
@dataclasses.dataclass(eq=False)
class MaskLowActivation(Intervention):
    """Per token, the floor(fraction F) neurons of the lowest |a| (times scale (F,) when given) become 0; ties
    go to the lower index. Acts on the last axis of any value (MoE (B, T, E, F): per token and expert)."""

    fraction: float
    scale: Any = None

    def apply(self, x, point):
        f = x.shape[-1]
        k = int(np.floor(self.fraction * f + 1e-9))
        if k == 0:
            return x
        if k >= f:
            return jnp.zeros_like(x)
        score = jnp.abs(x.astype(jnp.float32))
        if self.scale is not None:
            scale = jnp.asarray(self.scale, jnp.float32)
            per_token = tuple(x.shape[2:]) if x.ndim >= 2 else tuple(x.shape)
            try:
                fits = jnp.broadcast_shapes(per_token, scale.shape) == per_token
            except ValueError:
                fits = False
            if scale.shape[-1:] != (f,) or not fits:
                raise TapError(f"mask_low_activation: scale {tuple(scale.shape)} does not fit the {f} neurons of "
                               f"{point} {tuple(x.shape)} (it must broadcast into each token's {per_token})")
            score = score * scale
        _, low = jax.lax.top_k(-score, k)  # k smallest, lower index first among ties
        drop = jnp.zeros(score.shape, bool)
        drop = jnp.put_along_axis(drop, low, True, axis=-1, inplace=False)
        return jnp.where(drop, jnp.zeros((), x.dtype), x)


jax.tree_util.register_dataclass(MaskLowActivation, data_fields=["scale"], meta_fields=["fraction"])


def mask_low_activation(fraction: float, scale=None) -> MaskLowActivation:
    """The survey's dynamic masking (section 4.3): per token, zero the lowest-|a| `fraction` of the point's neurons
    (floor(fraction F) of them). scale (F,): rank by |a| * scale instead, e.g. the norms of down_proj's rows for
    the output-magnitude indicator ||FFN(x)_i|| = |a_i| ||W_out[i]||."""
    if not (isinstance(fraction, (int, float, np.floating)) and 0.0 <= float(fraction) <= 1.0):
        raise ValueError(f"mask_low_activation: fraction must be in [0, 1], got {fraction!r}")
    return MaskLowActivation(float(fraction), scale)


def mask_neurons(model: nnx.Module, neurons: Mapping[Any, Any], *,
                 points: str | Sequence[str] = FFN_HIDDEN) -> dict[str, Mask]:
    """Interventions {point: mask(indices)} zeroing the chosen neurons, for intervene / capture / reduce_over.

    neurons: {layer: indices or (F,) boolean mask}; a layer is an int (the i-th point matching `points`, in
    forward order: layer i of a decoder) or a tap point name (as top_neurons returns). Layers named twice get
    the union. Raises TapError for an unknown point or an index outside the point's F neurons.
    """
    found = tap_points(model, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    matcher = Matcher(patterns_of(points, "mask_neurons"))
    hidden = [p for p in found if matcher(p)]
    chosen: dict[str, np.ndarray] = {}
    for layer, idx in neurons.items():
        if is_int(layer):
            if not -len(hidden) <= layer < len(hidden):
                raise TapError(f"mask_neurons: layer {layer} is outside the {len(hidden)} points matching {points!r}")
            point = hidden[int(layer)]
        elif isinstance(layer, str) and layer in found:
            point = layer
        else:
            raise TapError(f"mask_neurons: {layer!r} is neither a layer index nor a tap point of the model; the "
                           f"hidden points are {hidden[:4]}{' ...' if len(hidden) > 4 else ''}")
        f = found[point].shape[-1]
        a = np.asarray(idx)
        if a.dtype == np.bool_:
            if a.shape != (f,):
                raise TapError(f"mask_neurons: a boolean mask for {point} must be ({f},), got {a.shape}")
            a = np.flatnonzero(a)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TapError(f"mask_neurons: the neurons of {point} must be integer indices or a boolean mask, got "
                           f"{a.dtype} {a.reshape(-1)[:8].tolist()}")
        a = a.reshape(-1).astype(np.int64)
        bad = a[(a < 0) | (a >= f)]
        if bad.size:
            raise TapError(f"mask_neurons: neurons {bad.tolist()[:8]} are outside the {f} neurons of {point}")
        chosen[point] = np.union1d(chosen.get(point, np.zeros(0, np.int64)), a)
    return {p: mask(idx) for p, idx in chosen.items()}
