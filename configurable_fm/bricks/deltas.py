"""Deltas: one representation of a change to a model's parameters, with one algebra.

    tv = deltas.diff(base, finetuned)                 # Dense terms finetuned − base, float32
    lr = deltas.low_rank(tv, 8)                       # LowRank terms (truncated SVD): a LoRA-like brick
    edited = deltas.apply(base, 0.5 * lr)             # a new model; `base` is untouched
    back = deltas.rollback(edited, 0.5 * lr)          # apply with scale −1: `base` up to float rounding
    deltas.save_delta(lr, "out/tv-r8"); lr2 = deltas.load_delta("out/tv-r8")

Editing (ROME/MEMIT return rank-one or low-rank updates), adapters (LoRA is a low-rank delta), merging (task
vectors) and masks all change parameters. A `Delta` is an ordered mapping {dotted parameter path: term} plus
JSON metadata (`kind`, `source`, a free-form dict); each term is the change of one parameter of shape S:

    Dense(value)            change = value                       value S;       stores prod(S) numbers
    LowRank(a, b, scale)    change = scale · a @ b               a (..., D_in, r), b (..., r, D_out);
                                                                 stores r·(D_in + D_out) numbers per matrix
    Masked(mask, value)     change = where(mask, value, 0)       mask S (bool), value S

Our kernels are (D_in, D_out), `y = x @ W`: the transpose of torch's `weight` (out, in). A PEFT LoRA update
ΔW_torch = (α/r)·B_t A_t with A_t (r, in) and B_t (out, r) is LowRank(a=A_tᵀ (in, r), b=B_tᵀ (r, out), scale=α/r).
Leading axes of a LowRank are a stack of independent matrices, e.g. MoE experts (E, D, F): a (E, D, r),
b (E, r, F), change_e = scale · a_e @ b_e (a batched matmul).

Terms and Deltas are JAX pytrees: the arrays are the leaves; LowRank.scale and a Delta's paths, kind, source and
metadata are static (part of the tree structure), so a Delta passes through `jax.jit` / `jax.vmap` and a jitted
function recompiles for another scale or set of paths, not for other values. Every operation is pure (inputs are
never modified): `diff`, `apply` (`shifted` for one array), `rollback`, `materialize`, `scale`, `negate`, `add`
(also `+`, `-`, `s * d`), `restrict`, `norms`, `low_rank`, `save_delta` / `load_delta`. Products of factors use
`jax.lax.Precision.HIGHEST`, so they are float32-exact on accelerators too.

On disk a delta is a brick set (bricks/brickset.py) plus one file, written together atomically:
* `bricks.safetensors` + `bricks.json`: one Brick per parameter path, named by it (`layers.3.mlp.up_proj.kernel`),
  with kind = the term type (`dense`, `low_rank`, `masked`), source = the delta's source, params = the term's
  tensors (`value`; `a`, `b`; `mask`, `value`: tensor names `layers.3.mlp.up_proj.kernel/a`, ...) and metadata
  {"shape": [...]} plus {"rank": r, "scale": s} for low_rank, so `load_bricks` reads it as a plain brick set;
* `delta.json`: {"format": "configurable_fm.delta", "version": 1, "kind", "source", "metadata"}, what a brick
  set has no place for.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.brickset import INDEX_FILE, TENSORS_FILE, Brick, BrickSet, load_bricks, save_bricks
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.bricks.select import SelectionError, glob_to_regex
from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import UserError
from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.interop.safetensors_io import CheckpointError, read_json_object

FORMAT = "configurable_fm.delta"
VERSION = 1
DELTA_FILE = "delta.json"
HIGHEST = jax.lax.Precision.HIGHEST


class DeltaError(UserError, ValueError):
    """A delta that does not fit (unknown paths, shapes that differ) or a malformed term; names every path."""


# ---------------------------------------------------------------------- terms
def _shaped(*xs) -> bool:
    """True when every x has a shape and dtype (arrays, tracers, ShapeDtypeStructs): only then does a term check
    itself, since jax also rebuilds pytrees with placeholders as leaves (None, object(), vmap's int axes)."""
    return all(hasattr(x, "shape") and hasattr(x, "dtype") for x in xs)


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _floating(x) -> bool:
    return bool(jnp.issubdtype(_dtype(x), jnp.floating))


def _desc(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}"


@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """The full change of one parameter: change = value, same shape S as the parameter (prod(S) numbers)."""

    value: Any

    def __post_init__(self):
        if _shaped(self.value) and not _floating(self.value):
            raise DeltaError(f"Dense: value must be a floating array, got {_desc(self.value)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def num_params(self) -> int:
        """Numbers stored: prod(S)."""
        return int(np.prod(self.shape))

    def materialize(self, dtype=jnp.float32) -> jax.Array:
        """The change (S) as a `dtype` array."""
        return jnp.asarray(self.value).astype(dtype)

    def scaled(self, s) -> "Dense":
        """Dense(s · value), in the value's dtype for a Python number s."""
        return Dense(jnp.asarray(self.value) * s)

    def sq_norm(self) -> jax.Array:
        """||value||_F² in float32."""
        return jnp.sum(jnp.square(jnp.asarray(self.value, jnp.float32)))

    def tensors(self) -> dict[str, Any]:
        return {"value": self.value}

    def __repr__(self) -> str:
        return f"Dense({_desc(self.value)})" if _shaped(self.value) else f"Dense({self.value!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class LowRank:
    """A low-rank change: change = scale · a @ b, a (..., D_in, r), b (..., r, D_out) -> (..., D_in, D_out).

    For a kernel (D_in, D_out) (ours: `y = x @ W`, torch's weight transposed) a is (D_in, r) and b (r, D_out);
    leading axes are a stack of matrices, e.g. MoE experts (E, D, F) with a (E, D, r), b (E, r, F). `scale` is a
    static Python float (LoRA's α/r); scaling by a traced value multiplies `a` instead. Stores r·(D_in + D_out)
    numbers per matrix instead of D_in·D_out.
    """

    a: Any
    b: Any
    scale: float = 1.0

    def __post_init__(self):
        if not is_real(self.scale):
            raise TypeError(f"LowRank: scale must be a Python number (static), got {type(self.scale).__name__}; "
                            "use term.scaled(s) to scale by an array")
        object.__setattr__(self, "scale", float(self.scale))
        if not _shaped(self.a, self.b):
            return
        a, b = self.a, self.b
        if a.ndim < 2 or a.ndim != b.ndim or tuple(a.shape[:-2]) != tuple(b.shape[:-2]) or a.shape[-1] != b.shape[-2]:
            raise DeltaError(f"LowRank: a is {tuple(a.shape)} and b is {tuple(b.shape)}; expected a (..., D_in, r) "
                             "and b (..., r, D_out) with the same rank r and the same leading (stack) axes")
        if not (_floating(a) and _floating(b)):
            raise DeltaError(f"LowRank: factors must be floating arrays, got a {a.dtype} and b {b.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*tuple(self.a.shape[:-1]), self.b.shape[-1])

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def num_params(self) -> int:
        """Numbers stored: size(a) + size(b)."""
        return int(np.prod(self.a.shape)) + int(np.prod(self.b.shape))

    def materialize(self, dtype=jnp.float32) -> jax.Array:
        """scale · a @ b (batched over leading axes), computed in float32, as a `dtype` array."""
        product = jnp.matmul(jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32), precision=HIGHEST)
        return (self.scale * product).astype(dtype)

    def scaled(self, s) -> "LowRank":
        """s · change: a new static scale for a Python number s (exact), else LowRank(s · a, b, scale)."""
        if is_real(s):
            return LowRank(self.a, self.b, self.scale * float(s))
        return LowRank(jnp.asarray(self.a) * s, self.b, self.scale)

    def sq_norm(self) -> jax.Array:
        """||scale · a b||_F² = scale² · tr((aᵀa)(b bᵀ)) = scale² · Σ (aᵀa) ∘ (b bᵀ) (both r × r, symmetric),
        summed over the stack: O((D_in + D_out) r²) instead of O(D_in D_out r)."""
        a, b = jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32)
        gram_a = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=HIGHEST)  # (..., r, r)
        gram_b = jnp.matmul(b, jnp.swapaxes(b, -1, -2), precision=HIGHEST)  # (..., r, r)
        return jnp.maximum(self.scale ** 2 * jnp.sum(gram_a * gram_b), 0.0)

    def column_norms(self, base) -> jax.Array:
        """||base + scale · a b|| over the input axis per output column, float32 (..., D_out), for a base of this
        change's shape (..., D_in, D_out), without forming the D_in × D_out sum (DoRA's weight norm):
            n_o² = ||w_o||² + 2 s Σ_r (aᵀ w)_ro b_ro + s² Σ_rr' b_ro (aᵀ a)_rr' b_r'o.
        Reads the base once for ||w_o||² and once for aᵀ w (O(D_in D_out r) flops, as forming a b, but no D_in × D_out
        float32 temporary is written and read back). Float32 throughout; the sum of squares is clamped at 0 before
        the root, so a column the change cancels almost exactly loses relative precision (never the case for DoRA,
        where the change is small next to w). A base of another shape is a DeltaError (never a broadcast)."""
        if tuple(np.shape(base)) != self.shape:
            raise DeltaError(f"column_norms: the base is {tuple(np.shape(base))} but the change is {self.shape}")
        w = jnp.asarray(base).astype(jnp.float32)
        a, b = jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32)
        w_sq = jnp.sum(jnp.square(w), axis=-2)  # (..., D_out)
        a_w = jnp.matmul(jnp.swapaxes(a, -1, -2), w, precision=HIGHEST)  # (..., r, D_out)
        gram_a = jnp.matmul(jnp.swapaxes(a, -1, -2), a, precision=HIGHEST)  # (..., r, r)
        cross = jnp.sum(a_w * b, axis=-2)
        change_sq = jnp.sum(b * jnp.matmul(gram_a, b, precision=HIGHEST), axis=-2)
        return jnp.sqrt(jnp.maximum(w_sq + 2 * self.scale * cross + self.scale ** 2 * change_sq, 0.0))

    def tensors(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}

    def __repr__(self) -> str:
        if not _shaped(self.a, self.b):
            return f"LowRank({self.a!r}, {self.b!r}, scale={self.scale})"
        return f"LowRank({self.shape}, rank={self.rank}, scale={self.scale:g}, {self.a.dtype})"


@dataclasses.dataclass(frozen=True, eq=False)
class Masked:
    """A masked (sparse) change: change = where(mask, value, 0), mask S bool, value S.

    Memory: the values are stored densely plus one byte per entry for the mask, (itemsize + 1)·prod(S) bytes,
    more than Dense. The point is an explicit support (TIES/DARE masks, sparse fine-tuning, edits restricted to
    some rows): `mask` says which entries change, whatever `value` holds elsewhere.
    """

    mask: Any
    value: Any

    def __post_init__(self):
        if not _shaped(self.mask, self.value):
            return
        if tuple(self.mask.shape) != tuple(self.value.shape):
            raise DeltaError(f"Masked: mask is {tuple(self.mask.shape)} but value is {tuple(self.value.shape)}")
        if self.mask.dtype != jnp.bool_:
            raise DeltaError(f"Masked: mask must be a bool array, got {self.mask.dtype}")
        if not _floating(self.value):
            raise DeltaError(f"Masked: value must be a floating array, got {_desc(self.value)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def num_params(self) -> int:
        """Numbers stored: prod(S) values (the bool mask, prod(S) bytes more, is not counted)."""
        return int(np.prod(self.shape))

    def materialize(self, dtype=jnp.float32) -> jax.Array:
        """where(mask, value, 0) as a `dtype` array."""
        return jnp.where(jnp.asarray(self.mask), jnp.asarray(self.value, dtype), jnp.zeros((), dtype))

    def scaled(self, s) -> "Masked":
        return Masked(self.mask, jnp.asarray(self.value) * s)

    def sq_norm(self) -> jax.Array:
        return jnp.sum(jnp.square(self.materialize(jnp.float32)))

    def tensors(self) -> dict[str, Any]:
        return {"mask": self.mask, "value": self.value}

    def __repr__(self) -> str:
        if not _shaped(self.mask, self.value):
            return f"Masked({self.mask!r}, {self.value!r})"
        return f"Masked({_desc(self.value)})"


jax.tree_util.register_dataclass(Dense, data_fields=["value"], meta_fields=[])
jax.tree_util.register_dataclass(LowRank, data_fields=["a", "b"], meta_fields=["scale"])
jax.tree_util.register_dataclass(Masked, data_fields=["mask", "value"], meta_fields=[])

Term = Union[Dense, LowRank, Masked]
TERM_TYPES = (Dense, LowRank, Masked)
TERM_NAMES = {Dense: "dense", LowRank: "low_rank", Masked: "masked"}  # the brick kind on disk
_TERM_BY_NAME = {name: cls for cls, name in TERM_NAMES.items()}
_TENSORS = {"dense": ("value",), "low_rank": ("a", "b"), "masked": ("mask", "value")}


def _json_data(value: Any, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON data ({e})") from None


# ---------------------------------------------------------------------- the delta
class Delta(Mapping[str, Term]):
    """An ordered, immutable mapping {dotted parameter path: term} with JSON metadata; a pytree.

    kind: what it is ('task_vector', 'rome', 'lora', ...); source: where it came from; metadata: free-form JSON
    data (tuples come back as lists). A bare floating array given as a term is taken as Dense(array).
    Operators: d1 + d2 (`add`), d1 − d2, −d (`negate`), s * d (`scale`); `sum(deltas)` works.
    """

    def __init__(self, terms: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), *, kind: str = "delta",
                 source: str = "", metadata: Mapping[str, Any] | None = None):
        items = list(terms.items()) if isinstance(terms, Mapping) else list(terms)
        out, problems = {}, []
        for path, term in items:
            if not isinstance(path, str) or not path:
                problems.append(f"path {path!r} is not a non-empty string")
                continue
            if path in out:
                problems.append(f"{path} is given twice")
            if not isinstance(term, TERM_TYPES) and _shaped(term):
                term = Dense(term)
            if not isinstance(term, TERM_TYPES):
                problems.append(f"{path} is a {type(term).__name__}, not a term (Dense, LowRank, Masked or an array)")
            out[path] = term
        if problems:
            raise DeltaError("Delta: " + "; ".join(problems))
        for field, value in (("kind", kind), ("source", source)):
            if not isinstance(value, str):
                raise TypeError(f"Delta: {field} must be a string, got {value!r}")
        data = _json_data(dict(metadata or {}), "Delta metadata")
        self._set(out, kind, source, data)

    def _set(self, terms: dict, kind: str, source: str, metadata: dict) -> None:
        self._terms = terms
        self._kind = kind
        self._source = source
        self._metadata = types.MappingProxyType(metadata)

    @classmethod
    def _unflatten(cls, aux, terms) -> "Delta":
        paths, kind, source, metadata = aux
        delta = object.__new__(cls)
        delta._set(dict(zip(paths, terms)), kind, source, json.loads(metadata))
        return delta

    def _aux(self):
        return tuple(self._terms), self._kind, self._source, json.dumps(dict(self._metadata))

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def source(self) -> str:
        return self._source

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._metadata

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self._terms)

    @property
    def num_params(self) -> int:
        """Numbers stored by all terms (LowRank: its factors)."""
        return sum(t.num_params for t in self._terms.values())

    def __getitem__(self, path: str) -> Term:
        try:
            return self._terms[path]
        except KeyError:
            close = difflib.get_close_matches(str(path), list(self._terms), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"the delta has no term at {path!r}{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def __add__(self, other: "Delta") -> "Delta":
        return add(self, other) if isinstance(other, Delta) else NotImplemented

    def __radd__(self, other) -> "Delta":
        if isinstance(other, (int, float)) and other == 0:  # sum(deltas) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: "Delta") -> "Delta":
        return add(self, negate(other)) if isinstance(other, Delta) else NotImplemented

    def __neg__(self) -> "Delta":
        return negate(self)

    def __mul__(self, s) -> "Delta":
        return scale(self, s)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        shaped = all(_shaped(*t.tensors().values()) for t in self._terms.values())  # not jax's placeholders
        numbers = f", {self.num_params:,} numbers" if shaped else ""
        head = f"Delta(kind={self._kind!r}, source={self._source!r}, {len(self)} terms{numbers})"
        width = max((len(p) for p in list(self._terms)[:20]), default=0)
        lines = [head] + [f"  {p:<{width}}  {t!r}" for p, t in list(self._terms.items())[:20]]
        if len(self) > 20:
            lines.append(f"  ... and {len(self) - 20} more")
        return "\n".join(lines)

    def __treescope_repr__(self, path, subtree_renderer):
        from treescope import repr_lib
        return repr_lib.render_dictionary_wrapper(type(self), dict(self._terms), path, subtree_renderer)


jax.tree_util.register_pytree_with_keys(
    Delta,
    lambda d: ([(jax.tree_util.DictKey(p), t) for p, t in d._terms.items()], d._aux()),
    Delta._unflatten,
    lambda d: (list(d._terms.values()), d._aux()),
)


def _like(delta: Delta, terms: Mapping[str, Term], **changes) -> Delta:
    """A Delta with `terms` and the kind/source/metadata of `delta` (or `changes`)."""
    return Delta(terms, kind=changes.get("kind", delta.kind), source=changes.get("source", delta.source),
                 metadata=changes.get("metadata", delta.metadata))


def _check_delta(delta, what: str) -> None:
    if not isinstance(delta, Delta):
        raise TypeError(f"{what} must be a Delta, got {type(delta).__name__}")


# ---------------------------------------------------------------------- models <-> deltas
def _flat(x, what: str) -> dict[str, Any]:
    if isinstance(x, Delta):
        raise TypeError(f"{what} must be a model or a flat {{path: array}} dict, got a Delta")
    if isinstance(x, nnx.Module):
        return flat_params(x)
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"{what} must be an nnx.Module or a flat {{path: array}} dict, got {type(x).__name__}")


def _matching(paths: Sequence[str], globs: str | Sequence[str], what: str) -> list[str]:
    """The paths (in order) fully matching any glob (bricks.select syntax); a glob matching none is an error."""
    globs = [globs] if isinstance(globs, str) else list(globs)
    if not globs or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{what}: give a glob or a non-empty list of globs, got {globs!r}")
    regexes = [(g, re.compile(glob_to_regex(g))) for g in globs]
    unmatched = [g for g, r in regexes if not any(r.fullmatch(p) for p in paths)]
    if unmatched:
        close = sorted({c for g in unmatched for c in difflib.get_close_matches(g, paths, n=3)}, key=paths.index)
        hint = f"did you mean {close}? " if close else ""
        raise SelectionError(f"{what}: {unmatched} match no path; {hint}the paths are e.g. {list(paths[:6])}")
    return [p for p in paths if any(r.fullmatch(p) for _, r in regexes)]


def diff(model_a, model_b, *, paths: str | Sequence[str] | None = None, skip_zero: bool = False,
         kind: str = "task_vector", source: str = "") -> Delta:
    """The change from `model_a` to `model_b`: Dense(f32(b_p) − f32(a_p)) for every parameter path p, in a's order.

    Models are nnx modules or flat {path: array} dicts (bricks.paths.flat_params), in any mix.
    paths: glob(s) selecting the parameters (bricks.select syntax: '**.mlp.*.kernel'); a glob matching nothing
      is a SelectionError. skip_zero: drop parameters whose change is exactly zero (needs concrete arrays).
    Non-floating parameters are left out when equal. Paths present in one model only, shapes that differ and
    non-floating parameters that differ are reported together in one DeltaError.
    """
    a, b = _flat(model_a, "diff: model_a"), _flat(model_b, "diff: model_b")
    union = list(dict.fromkeys([*a, *b]))
    chosen = union if paths is None else _matching(union, paths, "diff(paths=...)")
    problems = []
    for p in chosen:
        if p not in a or p not in b:
            problems.append(f"{p} is in model_{'b' if p not in a else 'a'} only")
        elif tuple(np.shape(a[p])) != tuple(np.shape(b[p])):
            problems.append(f"{p} is {tuple(np.shape(a[p]))} in model_a but {tuple(np.shape(b[p]))} in model_b")
        elif not (_floating(a[p]) and _floating(b[p])) and not np.array_equal(a[p], b[p]):
            problems.append(f"{p} is not floating ({_dtype(a[p])}, {_dtype(b[p])}) and differs; a delta holds "
                            "floating changes")
    if problems:
        raise DeltaError(f"diff: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    terms = {}
    for p in chosen:
        if not (_floating(a[p]) and _floating(b[p])):
            continue
        change = jnp.asarray(b[p], jnp.float32) - jnp.asarray(a[p], jnp.float32)
        if skip_zero and not bool(jnp.any(change != 0)):
            continue
        terms[p] = Dense(change)
    return Delta(terms, kind=kind, source=source)


def _fit_problems(flat: Mapping[str, Any], delta: Delta) -> list[str]:
    """Every path of `delta` that the parameters `flat` lack, or whose shape or dtype does not fit."""
    problems = []
    for p, term in delta.items():
        if p not in flat:
            close = difflib.get_close_matches(p, list(flat), n=3)
            problems.append(f"no parameter at {p}" + (f" (did you mean {close}?)" if close else ""))
        elif tuple(np.shape(flat[p])) != tuple(term.shape):
            problems.append(f"{p} is {tuple(np.shape(flat[p]))} in the model but {tuple(term.shape)} in the delta")
        elif not _floating(flat[p]):
            problems.append(f"{p} is {_dtype(flat[p])} in the model, not floating")
    return problems


def shifted(w, term: Term, scale: float | jax.Array = 1.0) -> jax.Array:
    """cast_{dtype(w)}(f32(w) + scale · change): one weight moved by one term, the addition in float32 (what
    `apply` does per path; adapters merge and unmerge with it). w and the change have the same shape S; another
    shape is a DeltaError (never a broadcast)."""
    w = jnp.asarray(w)
    if tuple(w.shape) != tuple(term.shape):
        raise DeltaError(f"shifted: the weight is {tuple(w.shape)} but the change is {tuple(term.shape)}")
    return (w.astype(jnp.float32) + scale * term.materialize(jnp.float32)).astype(w.dtype)


def apply(model_or_flat, delta: Delta, scale: float | jax.Array = 1.0):
    """The model with w_p ← cast_{dtype(w_p)}(f32(w_p) + scale · change_p) for every path p of `delta`.

    model_or_flat: an nnx module (returns a new module, bricks.paths.with_params; Variables keep their metadata)
    or a flat {path: array} dict (returns a new dict, same order). The input is never modified; parameters the
    delta does not name are the input's own arrays. `scale` may be traced (apply is jit-able on flat dicts).
    Unknown paths and shape mismatches are reported together in one DeltaError.
    """
    _check_delta(delta, "apply: delta")
    flat = _flat(model_or_flat, "apply: the target")
    problems = _fit_problems(flat, delta)
    if problems:
        raise DeltaError(f"apply: the delta does not fit the model ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))
    new = {p: shifted(flat[p], term, scale) for p, term in delta.items()}
    if isinstance(model_or_flat, nnx.Module):
        return with_params(model_or_flat, new)
    return {**flat, **new}


def rollback(model_or_flat, delta: Delta):
    """Undoes `apply(model, delta)`: apply(model, delta, scale=−1).

    Exact up to float rounding, not bit for bit: in float32, w' = fl(w + d) then fl(w' − d) differs from w by
    at most u·(|w + d| + |w|) + O(u²) per entry (u = 2⁻²⁴, one rounding each way). Parameters stored in a
    low-precision dtype (bfloat16) lose what `apply` rounded away (relative 2⁻⁹ of |w + d|); keep the original
    parameters when bit-exactness matters.
    """
    return apply(model_or_flat, delta, -1.0)


# ---------------------------------------------------------------------- algebra
def materialize(delta: Delta, dtype=jnp.float32) -> dict[str, jax.Array]:
    """{path: change as a dense `dtype` array}, in the delta's order."""
    _check_delta(delta, "materialize")
    return {p: t.materialize(dtype) for p, t in delta.items()}


def scale(delta: Delta, s) -> Delta:
    """s · delta, term by term (LowRank: a new static scale for a Python number, else s · a)."""
    _check_delta(delta, "scale")
    return _like(delta, {p: t.scaled(s) for p, t in delta.items()})


def negate(delta: Delta) -> Delta:
    """−delta (exact: a sign flip)."""
    return scale(delta, -1.0)


def _add_terms(t1: Term, t2: Term) -> Term:
    """t1 + t2 for one path: LowRank + LowRank stays LowRank (factors concatenated, rank r1 + r2):
    s1 a1 b1 + s2 a2 b2 = [a1 | a2] diag(s1, s2) [b1; b2], the scales kept when equal, else folded into a;
    anything else is Dense(f32 sum)."""
    if isinstance(t1, LowRank) and isinstance(t2, LowRank):
        if t1.scale == t2.scale:
            a1, a2, s = t1.a, t2.a, t1.scale
        else:
            a1, a2, s = jnp.asarray(t1.a, jnp.float32) * t1.scale, jnp.asarray(t2.a, jnp.float32) * t2.scale, 1.0
        return LowRank(jnp.concatenate([jnp.asarray(a1), jnp.asarray(a2)], axis=-1),
                       jnp.concatenate([jnp.asarray(t1.b), jnp.asarray(t2.b)], axis=-2), s)
    return Dense(t1.materialize(jnp.float32) + t2.materialize(jnp.float32))


def add(d1: Delta, d2: Delta) -> Delta:
    """d1 + d2 over the union of paths (d1's order, then d2's new paths); a path in one delta keeps its term.

    kind/source are kept when equal (else 'sum' and 'source1 + source2'); metadata is kept when equal, else
    {'operands': [metadata1, metadata2]}. Shapes that differ at a path are reported together in one DeltaError.
    """
    _check_delta(d1, "add: d1")
    _check_delta(d2, "add: d2")
    problems = [f"{p} is {d1[p].shape} in the first delta but {d2[p].shape} in the second"
                for p in d1 if p in d2 and tuple(d1[p].shape) != tuple(d2[p].shape)]
    if problems:
        raise DeltaError("add: shapes differ: " + "; ".join(problems))
    terms = {}
    for p in dict.fromkeys([*d1, *d2]):
        terms[p] = _add_terms(d1[p], d2[p]) if p in d1 and p in d2 else (d1[p] if p in d1 else d2[p])
    kind = d1.kind if d1.kind == d2.kind else "sum"
    source = d1.source if d1.source == d2.source else " + ".join(s for s in (d1.source, d2.source) if s)
    metadata = dict(d1.metadata) if d1.metadata == d2.metadata else {
        "operands": [dict(d1.metadata), dict(d2.metadata)]}
    return Delta(terms, kind=kind, source=source, metadata=metadata)


def restrict(delta: Delta, globs: str | Sequence[str]) -> Delta:
    """The terms whose path matches any of `globs` (bricks.select syntax), in order; a glob matching nothing is a
    SelectionError naming it."""
    _check_delta(delta, "restrict")
    return _like(delta, {p: delta[p] for p in _matching(list(delta), globs, "restrict")})


def norms(delta: Delta) -> dict[str, jax.Array]:
    """{path: ||change||_F} (float32 scalars); LowRank without materialising: ||s A B||_F² = s² tr((AᵀA)(BBᵀ))."""
    _check_delta(delta, "norms")
    return {p: jnp.sqrt(t.sq_norm()) for p, t in delta.items()}


def _truncated_svd(change: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, float]:
    """Best rank-k approximation (Eckart–Young) of each matrix of `change` (..., m, n), k = min(rank, m, n):
    change = U Σ Vᵀ, a = U_k Σ_k^½ (..., m, k), b = Σ_k^½ V_kᵀ (..., k, n) (the singular values split evenly),
    relative error ||change − a b||_F / ||change||_F = sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²) over the whole stack
    (0 for a zero change)."""
    u, s, vt = jnp.linalg.svd(change, full_matrices=False)
    k = min(rank, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    a = u[..., :, :k] * root[..., None, :]
    b = root[..., :, None] * vt[..., :k, :]
    total = float(jnp.sum(jnp.square(s)))
    tail = float(jnp.sum(jnp.square(s[..., k:])))
    return a, b, (float(np.sqrt(tail / total)) if total > 0 else 0.0)


def low_rank(delta: Delta, rank: int) -> Delta:
    """Every term of 2 or more dimensions as a LowRank of rank min(rank, D_in, D_out) (per matrix of a stack).

    Dense and Masked terms (and LowRank terms of a higher rank) are factored by a truncated SVD of the change,
    which is the best rank-r approximation in the Frobenius norm; LowRank terms of rank <= `rank` and terms of
    fewer than 2 dimensions (biases, norms) are kept as they are. This is how a task vector becomes a LoRA-like
    brick. The metadata gains {'low_rank': {'rank': rank, 'relative_error': {path: ||Δ − Δ_r||_F / ||Δ||_F}}}
    for the factored paths. Eager (the SVD and the reported errors need concrete arrays): not for jax.jit.
    """
    _check_delta(delta, "low_rank")
    if not is_int(rank) or rank < 1:
        raise ValueError(f"low_rank: rank must be an int >= 1, got {rank!r}")
    terms, errors = {}, {}
    for p, t in delta.items():
        if len(t.shape) < 2 or (isinstance(t, LowRank) and t.rank <= rank):
            terms[p] = t
            continue
        a, b, errors[p] = _truncated_svd(t.materialize(jnp.float32), int(rank))
        terms[p] = LowRank(a, b)
    metadata = {**delta.metadata, "low_rank": {"rank": int(rank), "relative_error": errors}}
    return _like(delta, terms, metadata=metadata)


# ---------------------------------------------------------------------- bricks and disk
def to_bricks(delta: Delta) -> BrickSet:
    """The delta as a brick set: one Brick per path (name = the path, kind = the term type, source = the
    delta's source, params = the term's tensors, metadata = {'shape'} plus {'rank', 'scale'} for low_rank)."""
    _check_delta(delta, "to_bricks")
    bricks = []
    for p, t in delta.items():
        info: dict[str, Any] = {"shape": list(t.shape)}
        if isinstance(t, LowRank):
            info.update(rank=t.rank, scale=t.scale)
        bricks.append(Brick(p, TERM_NAMES[type(t)], delta.source, t.tensors(), info))
    return BrickSet(bricks)


def _term_from_brick(brick: Brick) -> Term:
    """A term from a brick of `to_bricks`; DeltaError naming the brick's tensors when it is not one."""
    name, params, info = brick.name, brick.params, brick.metadata
    if brick.kind not in _TERM_BY_NAME:
        raise DeltaError(f"brick {name!r}: kind {brick.kind!r} is not a delta term ({sorted(_TERM_BY_NAME)})")
    want = _TENSORS[brick.kind]
    missing = [f"{name}/{t}" for t in want if t not in params]
    extra = [f"{name}/{t}" for t in params if t not in want]
    if missing or extra:
        found = [f"missing {missing}"] * bool(missing) + [f"unexpected {extra}"] * bool(extra)
        raise DeltaError(f"brick {name!r}: a {brick.kind} term stores tensors {list(want)}; {', '.join(found)}")
    tensors = {t: jnp.asarray(params[t]) for t in want}
    if brick.kind == "low_rank":
        scale_ = info.get("scale")
        if not is_real(scale_):
            raise DeltaError(f"brick {name!r}: a low_rank term needs a numeric 'scale' in its metadata, got {scale_!r}")
        term = LowRank(tensors["a"], tensors["b"], scale_)
        if info.get("rank") != term.rank:
            raise DeltaError(f"brick {name!r}: metadata rank {info.get('rank')!r} but tensor {name + '/a'!r} "
                             f"is {tuple(term.a.shape)} (rank {term.rank})")
    else:
        term = _TERM_BY_NAME[brick.kind](**tensors)
    if info.get("shape") != list(term.shape):
        raise DeltaError(f"brick {name!r}: metadata shape {info.get('shape')!r} but tensor(s) "
                         f"{[f'{name}/{t}' for t in want]} make a change of shape {list(term.shape)}")
    return term


def from_bricks(bricks: BrickSet, *, kind: str = "delta", source: str | None = None,
                metadata: Mapping[str, Any] | None = None) -> Delta:
    """The Delta of a brick set written by `to_bricks` (source default: the bricks' common source, else '');
    every brick that is not a delta term is reported in one DeltaError naming its tensors."""
    terms, problems = {}, []
    for name, brick in bricks.items():
        try:
            terms[name] = _term_from_brick(brick)
        except DeltaError as e:
            problems.append(str(e))
    if problems:
        raise DeltaError(f"{len(problems)} brick(s) are not delta terms:\n  " + "\n  ".join(problems))
    if source is None:
        sources = {b.source for b in bricks.values()}
        source = sources.pop() if len(sources) == 1 else ""
    return Delta(terms, kind=kind, source=source, metadata=metadata)


def save_delta(delta: Delta, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `delta` as a brick set (bricks.safetensors + bricks.json, `to_bricks`) plus delta.json, all
    atomically (the directory appears complete or not at all); returns the directory. Tensors keep their dtype
    (bfloat16 included). An existing directory is refused unless `overwrite`."""
    _check_delta(delta, "save_delta")
    bricks = to_bricks(delta)
    header = {"format": FORMAT, "version": VERSION, "kind": delta.kind, "source": delta.source,
              "metadata": dict(delta.metadata)}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_bricks(bricks, tmp, overwrite=True)  # replaces the empty temporary directory with the brick set
        (tmp / DELTA_FILE).write_text(json.dumps(header, indent=1) + "\n")
    return Path(directory)


def load_delta(directory: str | os.PathLike) -> Delta:
    """Reads a delta written by `save_delta`. Missing, corrupt or inconsistent files raise CheckpointError
    naming the file and the tensors (load_bricks checks bricks.json against bricks.safetensors; then every brick
    must be a delta term). Arrays come back as jax arrays, bit for bit."""
    directory = Path(directory)
    header_file = directory / DELTA_FILE
    if not header_file.is_file():
        hint = " (this is a brick set without a delta: use load_bricks)" if (directory / INDEX_FILE).is_file() else ""
        raise CheckpointError(f"{header_file}: no such file (a delta directory holds {DELTA_FILE}, {INDEX_FILE} "
                              f"and {TENSORS_FILE}){hint}")
    header = read_json_object(header_file, what="delta", format=FORMAT, max_version=VERSION)
    for key, kind in (("kind", str), ("source", str), ("metadata", dict)):
        if not isinstance(header.get(key), kind):
            raise CheckpointError(f"{header_file}: field {key!r} is missing or not a {kind.__name__}")
    bricks = load_bricks(directory)
    try:
        return from_bricks(bricks, kind=header["kind"], source=header["source"], metadata=header["metadata"])
    except DeltaError as e:
        raise CheckpointError(f"{directory / INDEX_FILE}: {e}") from None
