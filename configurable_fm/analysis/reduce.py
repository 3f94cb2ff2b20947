"""Streamed reductions over tap points: statistics of the values at chosen points, accumulated over batches.

    stats = reduce_over(model, batches, {"layers.*.mlp.hidden": ["mean", CountAbove(0.0), Histogram(-4, 4, 64)],
                                         "**.down_proj.input": Gram()})
    stats["layers.3.mlp.hidden"]["mean"]          # (F,)
    stats["layers.3.mlp.down_proj.input"]["gram"] # (F, F)
    stats.tokens                                  # masked-in token positions over all batches

For a point whose value is x (B, T, *M, F) in a batch with token mask m (B, T) (analysis/batches.py,
`token_mask`), each reduction sums over the tokens of every batch; N = sum of m over all batches, times the
number of times the point is computed per forward (`visits`, 1 for every point of the families here):
    Sum()                  sum_{b,t} m_bt x_bt                                      (*M, F)
    Mean()                 sum m x / N                                              (*M, F)
    MeanSquare()           sum m x * x / N     (per-feature second moment)          (*M, F)
    Gram()                 G = sum_{b,t} m_bt x_bt x_bt^T over the last axis        (*M, F, F)
    Gram(normalize=True)   G / N               ('second_moment')                    (*M, F, F)
    CountAbove(c)          sum m [x > c]       (e.g. how often a neuron fires)      (*M, F) integer
    Histogram(lo, hi, k)   counts of the masked-in values in k equal bins over [lo, hi] (numpy.histogram's
                           rule: bins [e_i, e_i+1), the last one closed, values outside or NaN dropped):
                           (k,) pooled over features, or (*M, F, k) with per_feature=True; integer
    Values()               the masked-in values themselves, (N, *M, F) numpy, concatenated (small runs)
Strings name the parameterless ones: 'sum', 'mean', 'mean_square', 'gram', 'second_moment', 'values'. A result
is keyed by the reduction's `name` (the strings above; 'count_above', 'histogram'; override with name=...).
Points whose leading axes are not the batch's (B, L) (e.g. BERT's position_embeddings.input) cannot be reduced.

Computation: one jitted step per batch merges the model, runs the forward (`model(batch['inputs'])` unless
`forward` and `batch_keys` say otherwise) under a tap session that reduces each selected value where it is
produced, and returns only the statistics: no activation is kept for later, and what no statistic needs (the
LM head, the layers after the last selected point) is dead code that XLA removes. Products are float32 at
precision HIGHEST. The token mask is 0/1; N counts its ones (exact on the host, summed over processes).
accumulate='float32' (default) sums the batches on the device (donated buffers on accelerators, one dispatch
per batch, no host sync; integer counts in int32); 'float64' sums them on the device in runs of
HOST_FLUSH_BATCHES batches and adds each run's sums to float64 / int64 totals on the host (a float32 run of 16
batch statistics adds ~16 roundings to what each batch's own float32 product already holds; with every batch's
(F, F) Gram added on the host instead, 1M tokens in batches of 2,048 at F = 6,144 took 208 s on an H100, 26 s
this way). Compiled once per (model structure, batch shapes, reductions, forward); device
accumulation of counts is exact up to 2^31 per entry, float32 sums lose digits past ~1e7 terms (use float64).

Sharding: with `mesh`, the model is placed by `sharding.shard_model(model, mesh, rules)` and each batch (this
process's rows) by `sharding.global_batch`, its rows over the mesh's batch axes as the trainer places them; the
statistics come back replicated.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm import sharding as shd
from configurable_fm.analysis.batches import batch_inputs, limited, progress_bar, token_mask
from configurable_fm.analysis.taps import Matcher, Session, TapError, intervention_items, patterns_of
from configurable_fm.models.taps import activate

HIGHEST = jax.lax.Precision.HIGHEST


def token_mask_like(m_BxT, x):
    """The token mask as a boolean broadcastable against x (B, T, ...)."""
    return (m_BxT > 0).reshape(m_BxT.shape + (1,) * (x.ndim - 2))


def masked_f32(x, m_BxT):
    """x (B, T, ...) as float32 where the token mask is 1, 0 where it is 0 (selected, not multiplied: a NaN or inf
    at a masked-out position, e.g. a padded row, does not reach the sums)."""
    return jnp.where(token_mask_like(m_BxT, x), x.astype(jnp.float32), 0.0)


class Reduction:
    """A statistic summed over the masked-in tokens of every batch (module docstring). Subclasses are frozen
    dataclasses (hashable: they are static in the jitted step) with a last field `name` (the result's key), and
    define `batch(x (B, T, ...), m (B, T)) -> the batch's sum` and optionally `finish(total, n) -> result`."""

    name: str

    def batch(self, x, m):
        raise NotImplementedError

    def finish(self, total, n: int):
        return total


@dataclasses.dataclass(frozen=True)
class Sum(Reduction):
    """sum_{b,t} m_bt x_bt: (*M, F)."""

    name: str = "sum"

    def batch(self, x, m):
        return jnp.sum(masked_f32(x, m), axis=(0, 1))


@dataclasses.dataclass(frozen=True)
class Mean(Reduction):
    """sum m x / N: (*M, F)."""

    name: str = "mean"

    def batch(self, x, m):
        return jnp.sum(masked_f32(x, m), axis=(0, 1))

    def finish(self, total, n):
        return _divide(total, n)


@dataclasses.dataclass(frozen=True)
class MeanSquare(Reduction):
    """sum m x * x / N, per feature: (*M, F)."""

    name: str = "mean_square"

    def batch(self, x, m):
        xm = masked_f32(x, m)
        return jnp.sum(xm * xm, axis=(0, 1))

    def finish(self, total, n):
        return _divide(total, n)


@dataclasses.dataclass(frozen=True)
class Gram(Reduction):
    """G = sum_{b,t} m_bt x_bt x_bt^T over the last axis, batched over the middle ones: (*M, F, F);
    normalize=True divides by N (the second-moment matrix)."""

    normalize: bool = False
    name: str = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", "second_moment" if self.normalize else "gram")

    def batch(self, x, m):
        f = x.shape[-1]
        if x.ndim == 3:  # (B, T, F): one (F, F) product, as RegMean has always computed it
            xm = masked_f32(x, m).reshape(-1, f)
            return jnp.dot(xm.T, xm, precision=HIGHEST, preferred_element_type=jnp.float32)
        xm = masked_f32(x, m).reshape((-1,) + x.shape[2:])
        return jnp.einsum("n...i,n...j->...ij", xm, xm, precision=HIGHEST, preferred_element_type=jnp.float32)

    def finish(self, total, n):
        return _divide(total, n) if self.normalize else total


@dataclasses.dataclass(frozen=True)
class CountAbove(Reduction):
    """sum m [x > threshold] per feature: (*M, F), integer."""

    threshold: float = 0.0
    name: str = "count_above"

    def batch(self, x, m):
        return jnp.sum((x > self.threshold) & token_mask_like(m, x), axis=(0, 1), dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class Histogram(Reduction):
    """Counts of the masked-in values in `bins` equal bins over [lo, hi] (numpy.histogram's rule): (bins,), or
    (*M, F, bins) with per_feature=True; integer."""

    lo: float = -1.0
    hi: float = 1.0
    bins: int = 10
    per_feature: bool = False
    name: str = "histogram"

    def __post_init__(self):
        if not (isinstance(self.bins, (int, np.integer)) and self.bins >= 1):
            raise ValueError(f"Histogram: bins must be a positive integer, got {self.bins!r}")
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"Histogram: need finite lo < hi, got lo={self.lo}, hi={self.hi}")

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def batch(self, x, m):
        k = self.bins
        edges = jnp.asarray(self.edges, jnp.float32)
        x32 = x.astype(jnp.float32)
        idx = jnp.searchsorted(edges, x32, side="right") - 1
        idx = jnp.where(x32 == edges[-1], k - 1, idx)  # the last bin is closed
        keep = (idx >= 0) & (idx < k) & token_mask_like(m, x)  # NaN sorts past the end: dropped
        if not self.per_feature:
            return jnp.zeros((k,), jnp.int32).at[jnp.where(keep, idx, k).reshape(-1)].add(1, mode="drop")
        features = int(np.prod(x.shape[2:], dtype=np.int64))
        feature = jnp.broadcast_to(jnp.arange(features).reshape(x.shape[2:]), x.shape)
        flat = jnp.where(keep, feature * k + idx, features * k).reshape(-1)
        counts = jnp.zeros((features * k,), jnp.int32).at[flat].add(1, mode="drop")
        return counts.reshape(x.shape[2:] + (k,))


@dataclasses.dataclass(frozen=True)
class Values(Reduction):
    """The masked-in values themselves, (N, *M, F) numpy, concatenated over batches (for small runs)."""

    name: str = "values"

    def batch(self, x, m):
        return x


NAMED: dict[str, Reduction] = {"sum": Sum(), "mean": Mean(), "mean_square": MeanSquare(), "gram": Gram(),
                               "second_moment": Gram(normalize=True), "values": Values()}


def _divide(total, n: int):
    if isinstance(total, np.ndarray):
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / np.float64(n)
    return total / jnp.float32(n)


def _as_reduction(r, pattern: str) -> Reduction:
    if isinstance(r, Reduction):
        return r
    if isinstance(r, str) and r in NAMED:
        return NAMED[r]
    raise TypeError(f"reduce_over: {r!r} (for {pattern!r}) is not a Reduction or one of {sorted(NAMED)} "
                    "(CountAbove and Histogram take parameters: CountAbove(0.0), Histogram(lo, hi, bins))")


@dataclasses.dataclass
class Reduced:
    """The results of reduce_over: values {point: {reduction name: result}} in forward order; tokens = sum of the
    token masks over all batches; visits {point: times computed per forward}; batches = number of batches."""

    values: dict[str, dict[str, Any]]
    tokens: int
    visits: dict[str, int]
    batches: int

    def __getitem__(self, point: str) -> dict[str, Any]:
        try:
            return self.values[point]
        except KeyError:
            raise KeyError(f"no reductions for {point!r}; reduced points: {list(self.values)}") from None

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


def model_inputs(model, batch):
    """The default forward of reduce_over: model(batch['inputs'])."""
    return model(batch["inputs"])


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static (hashable) part of a reduction step: patterns, their reductions, forward, interventions."""

    patterns: tuple[str, ...]
    reductions: tuple[tuple[Reduction, ...], ...]
    forward: Callable
    intervention_treedef: Any
    intervention_static: tuple  # the non-array leaves, None where an array leaf goes
    what: str = "reduce_over"  # names the caller in errors

    @functools.cached_property
    def matcher(self) -> Matcher:
        return Matcher(self.patterns)

    def reductions_at(self, point: str) -> list[Reduction]:
        chosen: dict[str, Reduction] = {}
        for i in self.matcher(point):
            for r in self.reductions[i]:
                if r.name in chosen and chosen[r.name] != r:
                    raise TapError(f"{self.what}: {point} gets two different reductions named {r.name!r} "
                                   f"({chosen[r.name]} and {r}); give one of them another name=")
                chosen[r.name] = r
        return list(chosen.values())

    def interventions(self, dynamic: Sequence) -> list:
        it = iter(dynamic)
        leaves = [next(it) if s is None else s for s in self.intervention_static]
        return jax.tree.unflatten(self.intervention_treedef, leaves)


def _reduce_step(graphdef, plan: _Plan, state, batch, mask_BxT, dynamic, acc):
    """(statistics summed over this batch [+ acc], raw values for Values, {point: (first visit, visits)})."""
    model = nnx.merge(graphdef, state)
    sums: dict[str, dict[str, jax.Array]] = {}
    raw: dict[str, list[jax.Array]] = {}
    order: dict[str, list[int]] = {}

    def record(point: str, value):
        if value.ndim < 2 or tuple(value.shape[:2]) != tuple(mask_BxT.shape):
            raise TapError(f"{plan.what}: {point} is {tuple(value.shape)}; reductions need values whose leading "
                           f"axes are the batch's (B, L) = {tuple(mask_BxT.shape)}")
        order.setdefault(point, [len(order), 0])[1] += 1
        for r in plan.reductions_at(point):
            stat = r.batch(value, mask_BxT)
            if isinstance(r, Values):
                raw.setdefault(point, []).append(stat)
            else:
                at = sums.setdefault(point, {})
                at[r.name] = at[r.name] + stat if r.name in at else stat

    session = Session(model, what=plan.what, record_patterns=plan.patterns, record=record,
                      interventions=plan.interventions(dynamic))
    with activate(session):
        plan.forward(model, batch)
    session.check()
    if acc is not None:
        sums = jax.tree.map(jnp.add, acc, sums)
    return sums, raw, {p: jnp.asarray(v, jnp.int32) for p, v in order.items()}


_step = jax.jit(_reduce_step, static_argnums=(0, 1))
_step_donating = jax.jit(_reduce_step, static_argnums=(0, 1), donate_argnums=(6,))
HOST_FLUSH_BATCHES = 16  # accumulate='float64': batches summed on the device between host additions


def _add_on_host(totals, sums):
    """totals + sums with sums (device, float32 / int32) brought to the host as float64 / int64 (None: none yet)."""
    sums = jax.tree.map(lambda x: _host(x).astype(np.int64 if x.dtype == jnp.int32 else np.float64), sums)
    return sums if totals is None else jax.tree.map(np.add, totals, sums)


def _host(x) -> np.ndarray:
    """A (possibly multi-process) jax array as numpy: a replicated one from this process's copy."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _all_processes_sum(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray([n], np.int64))))


def _forward_arrays(batch: Mapping[str, Any], keys: Sequence[str], rows: int, where: str) -> dict[str, np.ndarray]:
    """The batch entries the forward reads, as numpy arrays with a leading batch axis of `rows`."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"reduce_over: {where} lacks {missing} (batch_keys); it has {sorted(batch)}")
    out = {k: np.asarray(batch[k]) for k in keys}
    bad = {k: a.shape for k, a in out.items() if a.ndim < 1 or a.shape[0] != rows}
    if bad:
        raise ValueError(f"reduce_over: {where}: {bad} do not have the batch's {rows} rows")
    return out


def reduce_over(model: nnx.Module, batches: Iterable[Mapping[str, Any]],
                reductions: Mapping[str, Any], *, forward: Optional[Callable] = None,
                batch_keys: Sequence[str] = ("inputs",),
                mask_fn: Callable[[Mapping[str, Any], str], np.ndarray] = token_mask,
                interventions: Optional[Mapping[str, Any]] = None, max_batches: Optional[int] = None,
                accumulate: str = "float32", mesh=None, rules=None, progress: bool = True,
                log: Optional[Callable[[str], None]] = None, desc: str = "reduce_over") -> Reduced:
    """Statistics of the values at tap points over batches (module docstring).

    model: an nnx model; not modified. batches: pipeline dicts (analysis/batches.py); the first `max_batches`.
    reductions: {glob over tap point names: a Reduction, a name ('mean', 'gram', ...) or a list of them}; each
      glob must match a point of the forward; a point matched by several globs gets all their reductions.
    forward: fn(model, {key: device array for key in batch_keys}) run per batch (default model(batch['inputs']));
      its output is discarded. batch_keys: the batch entries the forward reads (each batch must have them; e.g.
      ('inputs', 'attention_mask') for lambda m, b: m(b['inputs'], attention_mask=b['attention_mask'])).
    mask_fn: fn(batch, where) -> (B, L) 0/1 token mask (default token_mask). interventions: {glob: Intervention or
      function} applied during the forwards (pytree arguments; non-array parts are static).
    accumulate: 'float32' (device sums) or 'float64' (device runs, host float64 totals). mesh / rules: place model and
    batches on a mesh.
    progress: a tqdm bar on a terminal, else log lines (to `log`, default stderr); desc labels them.
    Returns Reduced(values, tokens, visits, batches). Raises TapError for a pattern that matches no point or a
    point that cannot be reduced, ValueError when there are no batches.
    """
    if accumulate not in ("float32", "float64"):
        raise ValueError(f"reduce_over: accumulate must be 'float32' or 'float64', got {accumulate!r}")
    if not isinstance(reductions, Mapping) or not reductions:
        raise TypeError("reduce_over: reductions are a non-empty mapping {point glob: reduction(s)}, e.g. "
                        "{'layers.*.mlp.hidden': ['mean', CountAbove(0.0)]}")
    patterns, per_pattern = [], []
    for pattern, rs in reductions.items():
        patterns_of(pattern, "reduce_over")
        rs = [rs] if isinstance(rs, (str, Reduction)) else list(rs)
        if not rs:
            raise TypeError(f"reduce_over: no reductions given for {pattern!r}")
        per_pattern.append(tuple(_as_reduction(r, pattern) for r in rs))
        patterns.append(pattern)
    items = intervention_items(interventions, "reduce_over")
    leaves, treedef = jax.tree.flatten(items)
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    dynamic = [leaf for leaf, a in zip(leaves, is_array) if a]
    plan = _Plan(tuple(patterns), tuple(per_pattern), forward or model_inputs, treedef,
                 tuple(None if a else leaf for leaf, a in zip(leaves, is_array)), desc)
    try:
        hash(plan)
    except TypeError as e:
        raise TypeError(f"reduce_over: interventions must hold arrays or hashable values ({e})") from None

    if mesh is not None:
        model = shd.shard_model(model, mesh, rules or shd.DEFAULT_RULES)
    graphdef, state = nnx.split(model)
    on_host = accumulate == "float64"
    step = _step if jax.default_backend() == "cpu" else _step_donating

    acc, totals, pending, info, raw_values = None, None, 0, None, {}
    local_tokens, n_batches = 0, 0
    it, total = limited(batches, max_batches)
    for bi, batch in enumerate(progress_bar(it, total=total, desc=desc, enabled=progress, log=log)):
        where = f"batch {bi}"
        inputs = batch_inputs(batch, where)
        m = np.asarray(mask_fn(batch, where), np.float32)
        if m.shape != inputs.shape:
            raise ValueError(f"{desc}: the token mask of {where} is {m.shape} but its inputs are {inputs.shape}")
        if not np.all((m == 0) | (m == 1)):
            raise ValueError(f"{desc}: the token mask of {where} has values other than 0 and 1")
        local_tokens += int(m.sum())
        arrays = _forward_arrays(batch, batch_keys, inputs.shape[0], where)
        if mesh is not None:
            placed = shd.global_batch({**arrays, "__token_mask__": m}, mesh, rules or shd.DEFAULT_RULES)
            m_dev = placed.pop("__token_mask__")
            arrays = placed
        else:
            arrays, m_dev = {k: jnp.asarray(v) for k, v in arrays.items()}, jnp.asarray(m)
        if acc is None:
            shapes = step.eval_shape(graphdef, plan, state, arrays, m_dev, dynamic, None)[0]  # trace cached
            acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        acc, raw, visits = step(graphdef, plan, state, arrays, m_dev, dynamic, acc)
        pending += 1
        if on_host and pending == HOST_FLUSH_BATCHES:
            totals, acc, pending = _add_on_host(totals, acc), None, 0
        if info is None:
            info = {p: tuple(int(i) for i in _host(v)) for p, v in visits.items()}
        if raw:
            keep = (_host_mask(m) > 0)
            for point, occurrences in raw.items():
                raw_values.setdefault(point, []).extend(_host(x)[keep] for x in occurrences)
        n_batches += 1
    if n_batches == 0:
        raise ValueError(f"{desc}: no batches")
    if on_host:
        acc = _add_on_host(totals, acc) if pending else totals
    tokens = _all_processes_sum(local_tokens)
    ordered = sorted(info, key=lambda p: info[p][0])
    values: dict[str, dict[str, Any]] = {}
    for point in ordered:
        n = info[point][1] * tokens
        out = {}
        for r in plan.reductions_at(point):
            if isinstance(r, Values):
                out[r.name] = np.concatenate(raw_values[point], axis=0)
            else:
                out[r.name] = r.finish(acc[point][r.name], n)
        values[point] = out
    return Reduced(values=values, tokens=tokens, visits={p: info[p][1] for p in ordered}, batches=n_batches)


def _host_mask(m_local: np.ndarray) -> np.ndarray:
    """The token mask of the whole (global) batch: this process's rows, or every process's rows in order."""
    if jax.process_count() == 1:
        return m_local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(m_local, tiled=True))
