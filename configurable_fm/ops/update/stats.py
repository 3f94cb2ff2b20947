"""Second-moment statistics of the keys of an edit site, C = E[k k^T], streamed over a corpus and cached.

    stats = second_moments(model, batches, layers=[5], n_tokens=100_000, corpus="wikitext")   # {5: KeyStats}
    stats = cached_second_moments(model, batches, layers=[3, 4, 5], n_tokens=100_000, corpus="wikitext",
                                  cache_dir="stats/")      # computed once, then read back
    stats[5].second_moment      # (F, F) float32, E[k k^T] over n tokens

k is the input of the layer's MLP output projection (sites.py: `layers.<l>.mlp.down_proj.input`) at every
masked-in token of the batches (analysis.token_mask), C = (1/N) sum_t k_t k_t^T, the uncentred second moment that
ROME's `layer_stats.py` computes (its `SecondMoment`). It is `analysis.reduce_over` with the reduction
`Gram(normalize=True)` on the key points of all requested layers in one pass, summed over batches in float64 on the
host (`accumulate='float64'`). Batches are pipeline dicts with 'inputs' (B, L) (configurable_fm.data.pipeline);
the stream stops once `n_tokens` tokens are counted, the last batch's mask cut so that exactly n_tokens enter
(fewer when the corpus runs out: KeyStats.tokens says how many).

ROME's update does not depend on the scale of C (it cancels); MEMIT's does (it weighs C by mom2_update_weight
against the new keys), so C is always the normalised mean, as in the authors' code. C must have full rank F
for the solves: at least F tokens, in practice many more (the authors used ~100k Wikipedia texts; 2506.04226
finds that <0.3 % of that suffices).

Cache: one safetensors file per (layer, corpus, n_tokens, upstream fingerprint) holding 'second_moment'
float32 (F, F) and JSON metadata {format, version, layer, point, tokens, n_tokens, corpus, fingerprint}; the
fingerprint (sites.upstream_fingerprint) hashes every parameter the keys depend on, so statistics are reused by
models that differ only downstream of the site (e.g. after editing it) and recomputed otherwise. Files are plain
safetensors: shippable, no pickle. Storage is float32; the solves that use C are float64.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from configurable_fm.analysis.batches import token_mask
from configurable_fm.analysis.reduce import Gram, reduce_over
from configurable_fm.checks import is_int
from configurable_fm.errors import UserError
from configurable_fm.interop.atomic import atomic_file
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.ops.update.sites import EditSite, edit_site, upstream_fingerprint

FORMAT = "configurable_fm.key_stats"
VERSION = 1


class StatsError(UserError, ValueError):
    """Key statistics that do not fit the model or layer they are used with."""


@dataclasses.dataclass(frozen=True, eq=False)
class KeyStats:
    """C = E[k k^T] of one site's keys: second_moment (F, F) float32 over `tokens` tokens of `corpus`.

    layer / point: where the keys were read; fingerprint: sites.upstream_fingerprint of the model they came
    from ('' when unknown); n_tokens: the budget asked for (tokens may be fewer when the corpus ran out)."""

    second_moment: np.ndarray
    tokens: int
    layer: int
    point: str = ""
    corpus: str = ""
    n_tokens: int | None = None
    fingerprint: str = ""

    def __post_init__(self):
        c = np.asarray(self.second_moment)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise StatsError(f"KeyStats for layer {self.layer}: second_moment must be square (F, F), got {c.shape}")
        object.__setattr__(self, "second_moment", c)

    @property
    def dim(self) -> int:
        return int(self.second_moment.shape[0])

    def metadata(self) -> dict[str, Any]:
        return {"layer": self.layer, "point": self.point, "tokens": self.tokens, "n_tokens": self.n_tokens,
                "corpus": self.corpus, "fingerprint": self.fingerprint}


def _budget_mask(n_tokens: Optional[int]) -> Callable:
    """A token-mask function for reduce_over that lets through the first n_tokens masked-in tokens (in batch
    order, row-major within a batch) and zeroes the rest."""
    seen = [0]

    def mask_fn(batch, where):
        m = token_mask(batch, where)
        if n_tokens is None:
            return m
        left = max(int(n_tokens) - seen[0], 0)
        flat = m.reshape(-1)
        keep = np.cumsum(flat) <= left
        m = (flat * keep).reshape(m.shape).astype(np.float32)
        seen[0] += int(m.sum())
        return m

    return mask_fn


def _limited_by_tokens(batches: Iterable, n_tokens: Optional[int]):
    """The batches until n_tokens tokens have been seen (the batch that reaches it included)."""
    if n_tokens is None:
        yield from batches
        return
    seen = 0
    for batch in batches:
        if seen >= n_tokens:
            return
        yield batch
        seen += int(token_mask(batch).sum())


def second_moments(model: nnx.Module, batches: Iterable[Mapping[str, Any]], layers: Sequence[int], *,
                   n_tokens: Optional[int] = None, corpus: str = "", max_batches: Optional[int] = None,
                   accumulate: str = "float64", progress: bool = False, mesh=None, rules=None,
                   log: Optional[Callable[[str], None]] = None) -> dict[int, KeyStats]:
    """{layer: KeyStats} of the keys of each layer's MLP output projection over `batches` (module docstring).

    n_tokens: stop after this many masked-in tokens (None: every batch). corpus: a name recorded in the stats.
    accumulate / progress / mesh / rules / log / max_batches: passed to analysis.reduce_over.
    """
    layers = _layers(layers)
    if n_tokens is not None and (not is_int(n_tokens) or n_tokens < 1):
        raise ValueError(f"second_moments: n_tokens must be a positive int or None, got {n_tokens!r}")
    sites = {l: edit_site(model, l) for l in layers}
    reduced = reduce_over(model, _limited_by_tokens(batches, n_tokens),
                          {s.key_point: Gram(normalize=True) for s in sites.values()},
                          mask_fn=_budget_mask(n_tokens), max_batches=max_batches, accumulate=accumulate,
                          progress=progress, mesh=mesh, rules=rules, log=log, desc="second_moments")
    out, digests = {}, {}
    for l, s in sites.items():
        c = np.asarray(reduced[s.key_point]["second_moment"], np.float64)
        c = 0.5 * (c + c.T)  # exactly symmetric
        out[l] = KeyStats(c.astype(np.float32), int(reduced.tokens), l, s.key_point, corpus,
                          None if n_tokens is None else int(n_tokens), upstream_fingerprint(model, s, digests=digests))
    return out


def _layers(layers) -> list[int]:
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be a non-empty list of distinct layer indices, got {layers!r}")
    return [int(l) for l in layers]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "corpus"


def cache_file(cache_dir: str | os.PathLike, site: EditSite, corpus: str, n_tokens: Optional[int],
               fingerprint: str, max_batches: Optional[int] = None) -> Path:
    """The cache file of one site's statistics: <dir>/<point>-<corpus>-<n_tokens>[-b<max_batches>]-
    <fingerprint[:16]>.safetensors (a run cut by max_batches has its own file: it may hold fewer tokens)."""
    n = "all" if n_tokens is None else str(int(n_tokens))
    if max_batches is not None:
        n += f"-b{int(max_batches)}"
    return Path(cache_dir) / f"{site.key_point}-{_safe_name(corpus)}-{n}-{fingerprint[:16]}.safetensors"


def save_stats(stats: KeyStats, path: str | os.PathLike) -> Path:
    """Writes one KeyStats as safetensors ('second_moment' float32 + JSON metadata), via a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION), "stats": json.dumps(stats.metadata())}
    with atomic_file(path) as tmp:
        save_file({"second_moment": np.ascontiguousarray(stats.second_moment, np.float32)}, str(tmp), metadata=meta)
    return path


def load_stats(path: str | os.PathLike) -> KeyStats:
    """Reads a file written by save_stats; CheckpointError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such key statistics file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a key statistics file (format should be {FORMAT!r})")
            if not meta.get("version", "").isdigit() or int(meta["version"]) > VERSION:
                raise CheckpointError(f"{path}: version {meta.get('version')!r} is not supported")
            c = f.get_tensor("second_moment")
        info = json.loads(meta["stats"])
        return KeyStats(c, int(info["tokens"]), int(info["layer"]), info.get("point", ""), info.get("corpus", ""),
                        info.get("n_tokens"), info.get("fingerprint", ""))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own errors on truncated / corrupt files
        raise CheckpointError(f"{path}: cannot read key statistics ({type(e).__name__}: {e})") from None


def cached_second_moments(model: nnx.Module, batches: Iterable[Mapping[str, Any]] | Callable[[], Iterable],
                          layers: Sequence[int], *, corpus: str, n_tokens: Optional[int], cache_dir: str | os.PathLike,
                          log: Optional[Callable[[str], None]] = None, **kwargs) -> dict[int, KeyStats]:
    """second_moments, read from `cache_dir` when a file for (layer, corpus, n_tokens, max_batches, upstream
    fingerprint) exists and written there otherwise (module docstring). `batches` may be a function returning the
    iterable, so that nothing is read when every layer is cached. Other keywords go to second_moments."""
    layers = _layers(layers)
    sites = {l: edit_site(model, l) for l in layers}
    digests: dict[str, bytes] = {}
    files = {l: cache_file(cache_dir, s, corpus, n_tokens, upstream_fingerprint(model, s, digests=digests),
                           kwargs.get("max_batches")) for l, s in sites.items()}
    out = {l: load_stats(f) for l, f in files.items() if f.is_file()}
    todo = [l for l in layers if l not in out]
    if todo:
        if log:
            log(f"second_moments: computing layers {todo} over {corpus!r} ({n_tokens} tokens)")
        fresh = second_moments(model, batches() if callable(batches) else batches, todo, n_tokens=n_tokens,
                               corpus=corpus, log=log, **kwargs)
        for l, s in fresh.items():
            save_stats(s, files[l])
            out[l] = s
    return {l: out[l] for l in layers}


def second_moment_of(stats, layer: int, dim: int, *, fingerprint: str | None = None) -> np.ndarray | None:
    """C (F, F) float64 for `layer` from a KeyStats, an array, or a mapping {layer: either}; None stays None (no
    covariance: C = I). StatsError when the layer is missing, the size is not (dim, dim), or a KeyStats' layer
    or fingerprint (when both known) says it belongs elsewhere."""
    if stats is None:
        return None
    if isinstance(stats, Mapping):
        if layer not in stats:
            raise StatsError(f"no key statistics for layer {layer}; given for layers {sorted(stats)}")
        stats = stats[layer]
    if isinstance(stats, KeyStats):
        if stats.layer != layer:
            raise StatsError(f"key statistics of layer {stats.layer} given for layer {layer}")
        if fingerprint and stats.fingerprint and stats.fingerprint != fingerprint:
            raise StatsError(f"key statistics for layer {layer} were computed on another model (upstream "
                             f"fingerprint {stats.fingerprint[:16]} != {fingerprint[:16]}): recompute them")
        c = stats.second_moment
    else:
        c = stats
    c = np.asarray(c, np.float64)
    if c.shape != (dim, dim):
        raise StatsError(f"key statistics for layer {layer} are {c.shape}; the keys have {dim} features")
    return c
