"""Routing by task embeddings (LoRAuter-style retrieval): each adapter is represented by the centroid of the
sentence embeddings of a few example inputs; a query goes to the adapters whose centroids it is most similar to.

    encoder = load_text_encoder()                                   # all-MiniLM-L6-v2 (embed.py)
    router = build_router(encoder, {"code": code_examples, "prose": prose_examples})
    r = route_texts(router, encoder, queries)                       # Routing: scores, choices, weights
    logits = run_routed(mix(base, [code_lora, prose_lora]), r, ids_BxT)           # top-1: with_adapter_ids
    r2 = route_texts(router, encoder, queries, top_k=2, temperature=0.05)
    logits = run_routed(weighted_mix(base, [code_lora, prose_lora]), r2, ids_BxT)  # top-k: with_adapter_weights
    cost = routing_cost(router, encoder, queries, model, ids_BxT)   # seconds: embed, select, LM forward

The math, with unit sentence embeddings e (D,) (embed.embed_texts: mean-pooled, L2-normalised):
    centroid of adapter i    c_i = normalise(mean_{x ∈ examples_i} e(x))     (N, D)
    scores of a query q      s_i = <e(q), c_i>  (cosine similarity: both unit)  (Q, N)
    top-1                    choice = argmax_i s_i  (the lower index among equal scores)
    top-k                    w_i = exp(s_i / T) / Σ_{j ∈ K} exp(s_j / T) over the k best K, 0 elsewhere
A row routed to weights w runs y = x W + b + Σ_i w_i s_i (x A_i) B_i at every module, i.e. the linear merge of the
chosen updates Σ_i w_i ΔW_i applied to that row alone (mixture.py); top-1 is a one-hot w, which
bricks.adapters.with_adapter_ids serves on a mixed model (and which also takes DoRA / IA3 adapters).

Choices: the centroid is renormalised (cosine to the mean direction; the mean of unit vectors is shorter than 1
when the examples disagree, which would otherwise shrink that adapter's scores); the temperature applies to
cosines in [−1, 1], so useful values are small (default 0.05). Scores below `threshold` can send a row to the base
(id −1 / zero weights): `route(..., threshold=0.2)`.

Out-of-library queries (calibrated floors). A query unlike every adapter's examples still has a nearest centroid,
and the nearest adapter can do worse than none (experiments/adapters/README.md: held-out tasks routed to a
look-alike adapter). build_router therefore calibrates a floor per adapter from its own examples alone:

    l_ij = <e(x_ij), normalise(sum_{j' != j} e(x_ij'))>      leave-one-out cosine of example j to its adapter
    floor_i = mean_j l_ij − z · std_j l_ij                     (z = floor_z, default 3; sample std, ddof 1)

i.e. a query is "like adapter i's inputs" when its cosine to c_i is within z standard deviations of what adapter
i's own examples score. `route(router, q, threshold=router.floors)` sends a row whose best score is below its best
adapter's floor to the base. Adapters with fewer than 3 examples get floor −1 (never rejects: too few examples
to estimate a spread). No held-out data is involved: the floors come from the library's examples.

What a rejected row runs (`fallback`): 'base' (id BASE_ID −1, zero weights: the model alone) or 'uniform' (id
UNIFORM_ID −2, weights 1/N on every adapter: y = x W + (1/N) Σ_i s_i (x A_i) B_i = x (W + (1/N) Σ_i ΔW_i), the
uniform merge applied to that row alone, which only a row-weighted model (weighted_mix) serves). The uniform merge
is the library's answer for a query no adapter fits (experiments/adapters/README.md: on held-out tasks it scores
above the base and above routing to a look-alike adapter).

Routing cost (`routing_cost`): wall-clock seconds of embedding the queries, of the selection (scores, top-k) and of
the LM forward of the same batch, each after one warm-up call (compilation excluded), median of `repeats`, with
`block_until_ready`; `overhead` = (embed + select) / LM forward.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from configurable_fm.bricks.adapters import BASE_ID, mixed_modules, with_adapter_ids
from configurable_fm.checks import is_int
from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.ops.route.common import RouteError
from configurable_fm.ops.route.embed import TextEncoder, embed_texts
from configurable_fm.ops.route.mixture import (FoldedModels, row_weighted_modules, softmax_top_k,
                                               with_adapter_weights)

DEFAULT_TEMPERATURE = 0.05
UNIFORM_ID = -2  # the row id of a query that fell back to the uniform merge (route(..., fallback='uniform'))
FALLBACKS = ("base", "uniform")
ROUTER_FORMAT = "configurable_fm.centroid_router"
ROUTER_FILE, CENTROIDS_FILE = "router.json", "centroids.safetensors"


@dataclasses.dataclass(frozen=True, eq=False)
class CentroidRouter:
    """names (N,) of the adapters, in library order; centroids (N, D) float32 unit rows; counts (N,): the number
    of examples behind each centroid; encoder: the name of the sentence encoder that made them; floors (N,)
    float32: the calibrated out-of-library floors (module docstring), or None (a router saved without them)."""

    names: tuple[str, ...]
    centroids: np.ndarray
    counts: tuple[int, ...]
    encoder: str = ""
    floors: np.ndarray | None = None

    def __post_init__(self):
        c = np.asarray(self.centroids, np.float32)  # lists too: route reads the array's shape
        object.__setattr__(self, "centroids", c)
        if self.floors is not None:
            object.__setattr__(self, "floors", np.asarray(self.floors, np.float32))
        if c.ndim != 2 or c.shape[0] != len(self.names) or len(self.counts) != len(self.names) or not self.names:
            raise RouteError(f"CentroidRouter: {len(self.names)} names, {len(self.counts)} counts and centroids "
                             f"of shape {c.shape} do not fit (one (D,) row per adapter)")
        if len(set(self.names)) != len(self.names):
            raise RouteError(f"CentroidRouter: adapter names repeat: {list(self.names)}")
        if self.floors is not None and np.shape(self.floors) != (len(self.names),):
            raise RouteError(f"CentroidRouter: floors of shape {np.shape(self.floors)} for {len(self.names)} "
                             f"adapters (one per adapter)")

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """router.json (names, counts, encoder) + centroids.safetensors (centroids, floors when set), written
        atomically."""
        tensors = {"centroids": np.ascontiguousarray(self.centroids, np.float32)}
        if self.floors is not None:
            tensors["floors"] = np.ascontiguousarray(self.floors, np.float32)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / CENTROIDS_FILE))
            (tmp / ROUTER_FILE).write_text(json.dumps({"format": ROUTER_FORMAT, "version": 1,
                                                       "names": list(self.names), "counts": list(self.counts),
                                                       "encoder": self.encoder}, indent=1) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CentroidRouter":
        directory = Path(directory)
        for f in (ROUTER_FILE, CENTROIDS_FILE):
            if not (directory / f).is_file():
                raise RouteError(f"{directory / f}: no such file (a router directory holds {ROUTER_FILE} and "
                                 f"{CENTROIDS_FILE})")
        meta = json.loads((directory / ROUTER_FILE).read_text())
        if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
            raise RouteError(f"{directory / ROUTER_FILE}: not a centroid router (format {ROUTER_FORMAT!r})")
        tensors = load_file(str(directory / CENTROIDS_FILE))
        if "centroids" not in tensors:
            raise RouteError(f"{directory / CENTROIDS_FILE}: no tensor 'centroids'")
        return cls(tuple(meta["names"]), tensors["centroids"], tuple(int(c) for c in meta["counts"]),
                   meta.get("encoder", ""), tensors.get("floors"))


def centroid(embeddings_KxD: np.ndarray) -> np.ndarray:
    """normalise(mean of the rows): the unit mean direction (D,) float32 of K >= 1 embeddings."""
    m = np.asarray(embeddings_KxD, np.float64).mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def calibrated_floor(embeddings_KxD: np.ndarray, z: float) -> float:
    """mean − z · std of the leave-one-out cosines of K unit embeddings to the centroid of the others (module
    docstring); −1 for K < 3."""
    e = np.asarray(embeddings_KxD, np.float64)
    k = e.shape[0]
    if k < 3:
        return -1.0
    rest = e.sum(axis=0)[None, :] - e  # (K, D): the sum of the others; its direction is their centroid's
    loo = np.sum(e * rest, axis=1) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
    return float(loo.mean() - z * loo.std(ddof=1))


def build_router(encoder: TextEncoder, examples: Mapping[str, Sequence[str]], *, batch_size: int = 64,
                 floor_z: float = 3.0) -> CentroidRouter:
    """A CentroidRouter from {adapter name: example inputs} (module docstring), the names in mapping order, with
    floors calibrated at `floor_z` standard deviations; all examples are embedded in one pass. RouteError naming
    the adapters without examples."""
    if not isinstance(examples, Mapping) or not examples:
        raise RouteError("build_router: give {adapter name: [example inputs]} for at least one adapter")
    empty = [n for n, xs in examples.items() if isinstance(xs, str) or not xs]
    if empty:
        raise RouteError(f"build_router: adapters {empty} have no example inputs (give a list of strings)")
    flat = [x for xs in examples.values() for x in xs]
    e = embed_texts(encoder, flat, batch_size=batch_size)
    bounds = np.cumsum([0] + [len(xs) for xs in examples.values()])
    spans = list(zip(bounds[:-1], bounds[1:]))
    centroids = np.stack([centroid(e[a:b]) for a, b in spans])
    floors = np.array([calibrated_floor(e[a:b], float(floor_z)) for a, b in spans], np.float32)
    return CentroidRouter(tuple(examples), centroids, tuple(len(xs) for xs in examples.values()), encoder.name,
                          floors)


@dataclasses.dataclass(frozen=True)
class Routing:
    """scores (Q, N): cosine of each query to each centroid; choices (Q,): the top-1 adapter id (where the best
    score is below the threshold: BASE_ID −1, or UNIFORM_ID −2 with fallback 'uniform'); top (Q, k): the chosen
    ids, best first; weights (Q, N): softmax over the top-k scores / T, 0 elsewhere (below the threshold: a zero
    row, or 1/N everywhere with fallback 'uniform'); names: the adapters' names."""

    scores: np.ndarray
    choices: np.ndarray
    top: np.ndarray
    weights: np.ndarray
    names: tuple[str, ...]

    @property
    def chosen_names(self) -> list[str | None]:
        """The top-1 adapter name of each query (None: the base; 'uniform merge': the uniform fallback)."""
        return [None if i == BASE_ID else "uniform merge" if i == UNIFORM_ID else self.names[i]
                for i in self.choices.tolist()]

    @property
    def fallen_back(self) -> np.ndarray:
        """(Q,) bool: the queries below the threshold (sent to the base or the uniform merge)."""
        return self.choices < 0


@functools.partial(jax.jit, static_argnums=(1, 2))
def _select(scores_QxN, k: int, temperature: float):
    """softmax_top_k as one compiled call: run op by op (top_k, softmax, one_hot, einsum) it took 2.7 ms per batch
    of 50 queries on an H200 (experiments/adapters/README.md, the GPU run), all dispatch."""
    return softmax_top_k(scores_QxN, k, temperature)


def route(router: CentroidRouter, query_embeddings: np.ndarray, *, top_k: int = 1,
          temperature: float = DEFAULT_TEMPERATURE, threshold=None, fallback: str = "base") -> Routing:
    """Routing of unit query embeddings (Q, D) (module docstring). threshold: None, one cosine for every adapter,
    or (N,) per adapter (e.g. router.floors), which the best score of each query is compared with at its best
    adapter; fallback: what a query below it runs, 'base' or 'uniform' (module docstring). RouteError for a
    dimension that is not the centroids', top_k outside 1..N, a threshold of another shape or an unknown
    fallback."""
    if fallback not in FALLBACKS:
        raise RouteError(f"route: fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    q = np.asarray(query_embeddings, np.float32)
    n, d = router.centroids.shape
    if q.ndim != 2 or q.shape[1] != d:
        raise RouteError(f"route: query embeddings must be (Q, {d}) (the centroids' width), got {q.shape}")
    if not is_int(top_k) or not 1 <= top_k <= n:
        raise RouteError(f"route: top_k must be an int in 1..{n} (the number of adapters), got {top_k!r}")
    scores = q @ np.asarray(router.centroids, np.float32).T
    w, top = _select(scores, int(top_k), temperature)
    weights, top = np.array(w, np.float32), np.array(top, np.int32)
    choices = top[:, 0].copy()
    if threshold is not None:
        t = np.asarray(threshold, np.float32)
        if t.shape not in ((), (n,)):
            raise RouteError(f"route: threshold must be a number or one per adapter ({n},), got shape {t.shape}")
        low = scores.max(axis=1) < (t if t.ndim == 0 else t[top[:, 0]])
        choices[low] = UNIFORM_ID if fallback == "uniform" else BASE_ID
        weights[low] = 1.0 / n if fallback == "uniform" else 0.0
    return Routing(scores, choices, top, weights, router.names)


def route_texts(router: CentroidRouter, encoder: TextEncoder, texts: Sequence[str], **options) -> Routing:
    """route(router, embed_texts(encoder, texts), **options); RouteError when the router was built with another
    encoder (by name)."""
    if router.encoder and encoder.name and router.encoder != encoder.name:
        raise RouteError(f"route_texts: the router's centroids come from {router.encoder!r}, the encoder is "
                         f"{encoder.name!r}")
    return route(router, embed_texts(encoder, texts), **options)


def _routable_modules(model) -> tuple[dict, list]:
    """(mixed-adapter modules {path: MixedLinear}, row-weighted modules [RowWeightedLinear]) of `model`."""
    return mixed_modules(model), list(row_weighted_modules(model).values())


def routed_model(model: nnx.Module, routing: Routing) -> nnx.Module:
    """`model` with each batch row routed as `routing` says: a mixed model (bricks.adapters.mix, in router order)
    takes the top-1 choices (with_adapter_ids), a row-weighted model (weighted_mix) the weights
    (with_adapter_weights). RouteError when the model is neither, holds another number of adapters, or is a mixed
    model and rows fell back to the uniform merge (one adapter id per row cannot express it)."""
    n = len(routing.names)
    mixed, weighted = _routable_modules(model)
    if mixed:
        held = {m.num_adapters for m in mixed.values()}
        if held != {n}:
            raise RouteError(f"run_routed: the mixed model holds {sorted(held)} adapters, the routing {n}")
        uniform = np.flatnonzero(np.asarray(routing.choices) == UNIFORM_ID)
        if uniform.size:
            raise RouteError(f"run_routed: rows {uniform[:8].tolist()} fell back to the uniform merge, which a mixed "
                             "model (one adapter id per row) cannot run: route them on ops.route.weighted_mix")
        return with_adapter_ids(model, routing.choices)
    if weighted:
        held = {m.num_adapters for m in weighted}
        if held != {n}:
            raise RouteError(f"run_routed: the weighted model holds {sorted(held)} adapters, the routing {n}")
        return with_adapter_weights(model, routing.weights)
    raise RouteError("run_routed: the model has neither mixed-adapter modules (bricks.adapters.mix) nor "
                     "row-weighted ones (ops.route.weighted_mix)")


def run_routed(model: nnx.Module, routing: Routing, ids_BxT, **call_kwargs):
    """routed_model(model, routing)(ids_BxT): the forward with each row routed as `routing` says, compiled once
    per model structure (`forward_call`; the routing's ids or weights are arrays of the state, so a new routing
    reuses the program; with `call_kwargs` the call runs as given, eagerly); RouteError (routed_model's, and when
    the batch is not one row per query)."""
    b = int(np.shape(ids_BxT)[0])
    if b != len(routing.choices):
        raise RouteError(f"run_routed: {b} rows of ids for {len(routing.choices)} routed queries")
    routed = routed_model(model, routing)
    return routed(ids_BxT, **call_kwargs) if call_kwargs else forward_call(routed, ids_BxT)()


def run_folded(model: nnx.Module, routing: Routing, ids_BxT, *, folds: FoldedModels | None = None) -> jax.Array:
    """The logits (B, T, V) of run_routed(model, routing, ids_BxT) for a row-weighted model (weighted_mix), with
    the routing folded into the weights (mixture.folded): the rows grouped by their weight vector (routing.weights:
    a top-1 row is one-hot, a row sent to the base zero, one sent to the uniform merge 1/N), each group run through
    its folded model (the base's structure: no adapter term per token; forward_call), the logits put back in row
    order. A group of n rows runs padded to `padded_rows(n, B)` rows (copies of its first row, their logits
    dropped), so a stream of batches compiles at most 4 + B/8 programs per sequence length, not one per distinct
    group size; a batch that shares one routing (the case folding serves) runs unpadded. Equal to run_routed up
    to float32 rounding (W' = W + Σ w_i ΔW_i rounded once against x W + Σ w_i s_i (x A_i) B_i). What a routed
    batch costs this way: one base forward per distinct routing over its rows, plus one fold per routing not yet
    in `folds` (FoldedModels(model), kept across calls). RouteError for a model without row-weighted modules,
    `folds` of another model, or a batch that is not one row per query."""
    b = int(np.shape(ids_BxT)[0])
    if b != len(routing.choices):
        raise RouteError(f"run_folded: {b} rows of ids for {len(routing.choices)} routed queries")
    folds = FoldedModels(model) if folds is None else folds
    if folds.model is not model:
        raise RouteError("run_folded: `folds` holds the folded models of another model")
    groups, inverse = np.unique(np.asarray(routing.weights, np.float32), axis=0, return_inverse=True)
    ids = np.asarray(ids_BxT)
    rows = [np.flatnonzero(inverse.reshape(-1) == g) for g in range(len(groups))]
    padded = [np.concatenate([r, np.full(padded_rows(len(r), b) - len(r), r[0])]) for r in rows]
    parts = [forward_call(folds(w), ids[p])()[:len(r)] for w, r, p in zip(groups, rows, padded)]
    return jnp.concatenate(parts)[np.argsort(np.concatenate(rows), kind="stable")]


def padded_rows(n: int, batch: int) -> int:
    """The rows a group of n (1 <= n <= batch) runs as in run_folded, vLLM's batch buckets: 1, 2, 4, 8, then the
    next multiple of 8, at most the batch (at most 1.78x the rows: 9 -> 16; at most 1.41x above 16: 17 -> 24)."""
    n = int(n)
    return min(1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8, int(batch))


@dataclasses.dataclass(frozen=True)
class RoutingCost:
    """Median wall-clock seconds per call: embed (the query embeddings), select (scores and top-k), lm (the
    routed LM forward of the same batch); overhead = (embed + select) / lm."""

    embed: float
    select: float
    lm: float
    batch: int

    @property
    def overhead(self) -> float:
        return (self.embed + self.select) / self.lm

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "overhead": self.overhead}


# (graphdef, treedef) -> jitted forward of the state's leaves (one per model structure), the least recently used
# dropped beyond FORWARDS_KEPT (with its compiled programs), so a long session over many structures stays bounded
_FORWARDS: collections.OrderedDict = collections.OrderedDict()
FORWARDS_KEPT = 32


def _forward_of(graphdef, treedef):
    """The jitted model(ids) of one model structure, taking the state as its flat list of arrays."""
    key = (graphdef, treedef)
    if key in _FORWARDS:
        _FORWARDS.move_to_end(key)
    else:
        def model_forward(leaves, ids):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(ids)

        _FORWARDS[key] = jax.jit(model_forward)
        while len(_FORWARDS) > FORWARDS_KEPT:
            _FORWARDS.popitem(last=False)
    return _FORWARDS[key]


def forward_call(model: nnx.Module, ids_BxT):
    """A zero-argument call of model(ids): the model split and its state flattened once, here, and one jitted
    function per model structure (graphdef and state tree) that takes the state's arrays as a plain list, so a
    call does not hash and compare the graphdef (a static argument) or flatten the nnx.State again (on the 2-core
    CPU, SmolLM2-135M's shape in float32, one token: 37.0 -> 33.5 ms per call, with a LoRA on every projection
    42.1 -> 38.7 ms, benchmarks/lora_cost_h200_2026-12-04/forward_call_cpu.py; on the H200 the medians of the 1B
    routing bench did not move). nnx.split of SmolLM2-135M costs ~8 ms: never split inside a timed call."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    fn = _forward_of(graphdef, treedef)
    ids = jnp.asarray(ids_BxT)
    return lambda: fn(leaves, ids)


def median_seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of fn() (each until its result is ready), after one warm-up
    call (compilation excluded)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def routing_cost(router: CentroidRouter, encoder: TextEncoder, texts: Sequence[str], model: nnx.Module, ids_BxT,
                 *, repeats: int = 3, **options) -> RoutingCost:
    """How much routing adds to a forward (module docstring): embedding `texts` (one query per row of ids_BxT),
    selecting adapters (route(router, ., **options): top_k, temperature, threshold, fallback), and the LM forward
    of `model` on ids_BxT (a mixed or row-weighted model routed as selected by routed_model, any other model as
    it is; jitted). RouteError for repeats < 1 or a batch that does not match the texts."""
    if not is_int(repeats) or repeats < 1:
        raise RouteError(f"routing_cost: repeats must be an int >= 1, got {repeats!r}")
    texts = list(texts)
    ids = jnp.asarray(ids_BxT)
    if ids.ndim != 2 or ids.shape[0] != len(texts):
        raise RouteError(f"routing_cost: ids must be (B, T) with one row per text, got {tuple(ids.shape)} for "
                         f"{len(texts)} texts")
    embed_s = median_seconds(lambda: embed_texts(encoder, texts), repeats)
    q = embed_texts(encoder, texts)
    select_s = median_seconds(lambda: route(router, q, **options).weights, repeats)
    routing = route(router, q, **options)
    routed = routed_model(model, routing) if any(_routable_modules(model)) else model
    lm_s = median_seconds(forward_call(routed, ids), repeats)
    return RoutingCost(embed=embed_s, select=select_s, lm=lm_s, batch=len(texts))
