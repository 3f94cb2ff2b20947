"""Tree-level merging: whole models (flat {path: array} dicts or NNX modules) merged tensor by tensor.

    merged = merge("ties", base, [ft_a, ft_b], parameters={"density": 0.5},
                   model_parameters=[{"weight": 1.0}, {"weight": [0.0, 1.0]}])   # a gradient over depth

For every tensor path p (in the template's order): the parameters are resolved for p (params.py: per-model
setting, then global, then the method's default; gradients over depth, substring filters), the inputs are stacked
xs (N, *S) and the method's kernel runs as `kernel(b_p, xs, key=tensor_key(seed, p), **params)` (key only for
randomised methods; the kernel folds in the model index, so results do not depend on the visiting order), then
the float32 result is cast to `out_dtype` (default: the base's dtype, or the first model's without a base).

Checks at the boundary, all problems reported at once in one MergeInputError: every input has the same paths and
shapes; a vocabulary tensor (embeddings, lm_head) whose size differs along one axis is a vocabulary mismatch,
refused unless `embed_alignment="base"` (each input truncated or padded to the base's vocabulary, pad rows taken
from the base); integer/bool tensors are copied only when identical in every input. Inputs are never modified.
The convenience wrappers (`ties`, `task_arithmetic`, `linear`, `slerp`, `dare_ties`, `dare_linear`) are
`merge` with the method's parameters as keyword arguments.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.keys import tensor_key
from configurable_fm.ops.merge.registry import MergeMethod, get_method

State = Union[Mapping[str, Any], nnx.Module]
EmbedAlignment = Optional[Literal["base"]]

# Substrings naming tensors with a vocabulary axis (ours, HF/mergekit's, GPT-2's, BERT's, GPT-NeoX's).
VOCAB_TENSORS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings")


class MergeInputError(ValueError):
    """Inputs that cannot be merged; the message lists every problem, naming the tensors and models."""


def _is_vocab(path: str, vocab_tensors: Sequence[str]) -> bool:
    return any(s in path for s in vocab_tensors)


def _flat(x, what: str) -> dict[str, Any]:
    if isinstance(x, nnx.Module):
        return flat_params(x)
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"merge: {what} must be a flat {{path: array}} dict or an nnx.Module, got {type(x).__name__}")


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _vocab_axis(shapes: Sequence[tuple]) -> Optional[int]:
    """The single axis along which same-rank shapes differ, else None."""
    if len({len(s) for s in shapes}) != 1:
        return None
    axes = {ax for s in shapes for ax in range(len(s)) if s[ax] != shapes[0][ax]}
    return axes.pop() if len(axes) == 1 else None


def _align_to_base(x, base, axis: int):
    """x truncated or padded along `axis` to base's size there; pad entries are the base's."""
    n, nb = x.shape[axis], base.shape[axis]
    if n >= nb:
        return jax.lax.slice_in_dim(jnp.asarray(x), 0, nb, axis=axis)
    tail = jax.lax.slice_in_dim(jnp.asarray(base), n, nb, axis=axis).astype(jnp.asarray(x).dtype)
    return jnp.concatenate([jnp.asarray(x), tail], axis=axis)


def _check(names, flats, *, vocab_tensors, embed_alignment, has_base):
    """Validates paths, shapes and vocabularies; returns {path: vocab axis} of the tensors to align."""
    problems = []
    all_paths = list(dict.fromkeys(p for f in flats for p in f))
    for p in all_paths:
        missing = [n for n, f in zip(names, flats) if p not in f]
        if missing:
            have = [n for n, f in zip(names, flats) if p in f]
            problems.append(f"tensor {p} is missing in {', '.join(missing)} (present in {', '.join(have)})")
    align = {}
    for p in all_paths:
        if any(p not in f for f in flats):
            continue
        shapes = [_shape(f[p]) for f in flats]
        if len(set(shapes)) == 1:
            continue
        described = ", ".join(f"{s} in {n}" for n, s in zip(names, shapes))
        axis = _vocab_axis(shapes)
        if axis is not None and _is_vocab(p, vocab_tensors):
            if embed_alignment == "base" and has_base:
                align[p] = axis
                continue
            hint = ("embed_alignment='base' needs a base model" if embed_alignment == "base"
                    else "pass embed_alignment='base' to truncate/pad every input to the base vocabulary")
            problems.append(f"vocabulary mismatch: {p} is {described} (axis {axis}); {hint}")
        else:
            problems.append(f"shape mismatch: {p} is {described}")
    if problems:
        raise MergeInputError(f"cannot merge {', '.join(names)}:\n  " + "\n  ".join(problems))
    return align


def merge(
    method: Union[str, MergeMethod],
    base: Optional[State],
    models: Union[Sequence[State], Mapping[str, State]],
    *,
    parameters: Optional[Mapping[str, Any]] = None,
    model_parameters: Union[Sequence[Optional[Mapping[str, Any]]], Mapping[str, Mapping[str, Any]], None] = None,
    seed: int = 0,
    out_dtype=None,
    embed_alignment: EmbedAlignment = None,
    num_layers: Optional[int] = None,
    vocab_tensors: Sequence[str] = VOCAB_TENSORS,
) -> State:
    """Merges `models` (and `base`) with a registered method, tensor by tensor (module docstring).

    base: the base model (required/optional/must be None according to the method's contract).
    models: the other inputs, a sequence (named model_0, model_1, ...) or a {name: model} mapping, in mergekit's
      `models:` order minus the base. Each input is a flat {path: array} dict (bricks.paths.flat_params) or an
      nnx.Module; the result has the kind of the template (the base, or the first model without one): a new
      module (only its nnx.Param leaves merged, the rest from the template) or a dict.
    parameters: global settings {name: setting}; model_parameters: one {name: setting} (or None) per model, as a
      list in `models` order or a {model name: settings} mapping, taking precedence for per-model parameters
      (settings: scalars, gradients, {filter, value} lists; params.py).
    seed: for randomised methods, key = tensor_key(seed, path) (order independent).
    num_layers: depth for gradients (default: 1 + the largest `layers.N` index in the paths).
    Raises MergeInputError (mismatched inputs), params.ParameterError (settings), ValueError (contract).
    """
    m = get_method(method) if isinstance(method, str) else method
    if isinstance(models, Mapping):
        names, models = [str(k) for k in models], list(models.values())
    else:
        models = list(models)
        names = [f"model_{i}" for i in range(len(models))]
    n = len(models)
    if n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
        want = (f"exactly {m.min_inputs}" if m.min_inputs == m.max_inputs else f"at least {m.min_inputs}"
                if m.max_inputs is None else f"{m.min_inputs}..{m.max_inputs}")
        raise ValueError(f"merge {m.name}: needs {want} non-base model(s), got {n}")
    if m.base == "required" and base is None:
        raise ValueError(f"merge {m.name}: needs a base model")
    if m.base == "ignored" and base is not None:
        raise ValueError(f"merge {m.name}: the method ignores the base model; pass base=None and list every "
                         "input in models")
    if embed_alignment not in (None, "base"):
        raise ValueError(f"merge: embed_alignment must be None or 'base', got {embed_alignment!r}")
    if isinstance(model_parameters, Mapping):
        unknown = sorted(set(model_parameters) - set(names))
        if unknown:
            raise P.ParameterError(f"merge {m.name}: model_parameters for unknown model(s) {unknown}; models: "
                                   f"{names}")
        model_parameters = [model_parameters.get(nm) for nm in names]
    if model_parameters is not None and len(model_parameters) != n:
        raise P.ParameterError(f"merge {m.name}: {len(model_parameters)} model_parameters entries for {n} models "
                               f"{names}")
    P.check_names(m, parameters, model_parameters, names)

    template = base if base is not None else models[0]
    base_flat = None if base is None else _flat(base, "base")
    flats = [_flat(x, f"model {nm!r}") for x, nm in zip(models, names)]
    all_names = (["base"] if base_flat is not None else []) + names
    all_flats = ([base_flat] if base_flat is not None else []) + flats
    align = _check(all_names, all_flats, vocab_tensors=vocab_tensors, embed_alignment=embed_alignment,
                   has_base=base_flat is not None)
    ref = all_flats[0]
    depth = P.num_layers_of(ref) if num_layers is None else num_layers

    out: dict[str, Any] = {}
    for path, ref_value in ref.items():
        dtype = jnp.asarray(ref_value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            different = [nm for nm, f in zip(all_names, all_flats) if not np.array_equal(np.asarray(f[path]),
                                                                                        np.asarray(ref_value))]
            if different:
                raise MergeInputError(f"{path} is a {dtype} tensor (copied, never merged) but differs between "
                                      f"{all_names[0]} and {', '.join(different)}")
            out[path] = ref_value
            continue
        b = None if base_flat is None or m.base == "ignored" else base_flat[path]
        inputs = [f[path] for f in flats]
        if path in align:
            inputs = [_align_to_base(x, base_flat[path], align[path]) for x in inputs]
        xs = jnp.stack([jnp.asarray(x, jnp.float32) for x in inputs])
        kwargs = P.resolve_for_tensor(m, path, parameters=parameters, model_parameters=model_parameters,
                                      model_names=names, num_layers=depth)
        key = tensor_key(seed, path) if m.randomized else None
        try:
            y = m.kernel(None if b is None else jnp.asarray(b, jnp.float32), xs, key=key, **kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"merge {m.name}: tensor {path}: {e}") from e
        out[path] = jnp.asarray(y).astype(out_dtype if out_dtype is not None else dtype)
    if isinstance(template, nnx.Module):
        return with_params(template, out)
    return out


# ------------------------------------------------------------------------------------------ convenience wrappers
def _per_model_settings(method: str, name: str, values, n: int) -> list[Optional[dict]]:
    """`weights=` etc.: one setting per model (a list of length N) or one scalar for all."""
    if isinstance(values, (int, float, np.integer, np.floating)) and not isinstance(values, bool):
        return [{name: float(values)} for _ in range(n)]
    values = list(values)
    if len(values) != n:
        raise P.ParameterError(f"{method}: {name} has {len(values)} entries for {n} models; give one setting per "
                               "model (a number, a gradient list or {filter, value} entries) or a single number")
    return [{name: v} for v in values]


def _zip_settings(*lists: list[dict]) -> list[dict]:
    return [dict(kv for d in ds for kv in d.items()) for ds in zip(*lists)]


def task_arithmetic(base: State, finetuned: Sequence[State], *, weights, lambda_: float = 1.0,
                    normalize: bool = False, out_dtype=None) -> State:
    """Task arithmetic (Ilharco et al., 2022): y = b + λ Σ_i w_i (x_i − b) (÷ Σ w_i if normalize)."""
    n = len(finetuned)
    return merge("task_arithmetic", base, finetuned, parameters={"lambda": lambda_, "normalize": normalize},
                 model_parameters=_per_model_settings("task_arithmetic", "weight", weights, n), out_dtype=out_dtype)


def ties(base: State, finetuned: Sequence[State], *, weights, density, normalize: bool = True,
         election="weighted_sum", divisor="weights", lambda_: float = 1.0, out_dtype=None) -> State:
    """TIES-merging (Yadav et al., 2023): trim each task vector to its top-`density` magnitudes, elect a sign
    per entry, average the entries that agree with it: y = b + λ Σ_i M_i w_i δ̃_i / Σ_i M_i w_i (mergekit)."""
    n = len(finetuned)
    mp = _zip_settings(_per_model_settings("ties", "weight", weights, n),
                       _per_model_settings("ties", "density", density, n))
    return merge("ties", base, finetuned, model_parameters=mp, out_dtype=out_dtype,
                 parameters={"normalize": normalize, "election": election, "divisor": divisor, "lambda": lambda_})


def dare_ties(base: State, finetuned: Sequence[State], *, weights, density, seed: int, normalize: bool = False,
              rescale="l1", election="weighted_sum", lambda_: float = 1.0, out_dtype=None) -> State:
    """DARE-TIES: drop each task-vector entry with probability 1 − density (masks from tensor_key(seed, path, i)),
    rescale (mergekit: match the L1 norm), then the TIES sign election and weighted sum."""
    n = len(finetuned)
    mp = _zip_settings(_per_model_settings("dare_ties", "weight", weights, n),
                       _per_model_settings("dare_ties", "density", density, n))
    return merge("dare_ties", base, finetuned, model_parameters=mp, seed=seed, out_dtype=out_dtype,
                 parameters={"normalize": normalize, "rescale": rescale, "election": election, "lambda": lambda_})


def dare_linear(base: State, finetuned: Sequence[State], *, weights, density, seed: int, normalize: bool = False,
                rescale="l1", lambda_: float = 1.0, out_dtype=None) -> State:
    """DARE (Yu et al., 2023): random drop with rescale, then y = b + λ Σ_i w_i δ̃_i."""
    n = len(finetuned)
    mp = _zip_settings(_per_model_settings("dare_linear", "weight", weights, n),
                       _per_model_settings("dare_linear", "density", density, n))
    return merge("dare_linear", base, finetuned, model_parameters=mp, seed=seed, out_dtype=out_dtype,
                 parameters={"normalize": normalize, "rescale": rescale, "lambda": lambda_})


def linear(models: Sequence[State], *, weights, normalize: bool = True, out_dtype=None) -> State:
    """Linear merge / model soup: y = Σ_i w_i x_i / Σ_i w_i (no division if not normalize)."""
    return merge("linear", None, models, parameters={"normalize": normalize}, out_dtype=out_dtype,
                 model_parameters=_per_model_settings("linear", "weight", weights, len(models)))


def slerp(base: State, other: State, *, t, out_dtype=None) -> State:
    """Spherical interpolation from `base` (t = 0) to `other` (t = 1), per tensor; t may be a gradient or a
    list of {filter, value} entries."""
    return merge("slerp", base, [other], parameters={"t": t}, out_dtype=out_dtype)
