"""Tree-level merging: whole models (flat {path: array} dicts or NNX modules) merged tensor by tensor.

    merged = merge("ties", base, [ft_a, ft_b], parameters={"density": 0.5},
                   model_parameters=[{"weight": 1.0}, {"weight": [0.0, 1.0]}])   # a gradient over depth

For every tensor path p (in the template's order): the parameters are resolved for p (params.py: per-model
setting, then global, then the method's default; gradients over depth, substring filters), the inputs are stacked
xs (N, *S) and the method's kernel runs as `kernel(b_p, xs, key=tensor_key(seed, p), **params)` (key only for
randomised methods; the kernel folds in the model index, so results do not depend on the visiting order), then
the float32 result is cast to `out_dtype` (default: the base's dtype, or the first model's without a base).
That per-tensor step is `execute.merge_tensor`, shared with the streaming merge: one jitted function per
(method, resolved parameters, dtypes), cached and reused for every tensor with the same setting.

Checks at the boundary, all problems reported at once in one short MergeInputError (`check_inputs`: first how
the inputs' architectures differ, e.g. "model_1 has hidden size 64 but base has 576, 2 layers but base has 30",
then the first tensors that differ): every input has the same paths and shapes; a vocabulary tensor (embeddings,
lm_head) whose size differs along its vocabulary axis only is a vocabulary mismatch, refused unless an alignment
is asked for: `embed_alignment="base"` truncates or pads each input to the base's
vocabulary (pad rows taken from the base); `embed_alignment="union"` or a model's name (with `tokenizers=`), or a
prebuilt vocab.VocabularyAlignment, is mergekit's `tokenizer_source` / `tokenizer:` (vocab.py): every input's
vocabulary rows are permuted, by token, into the output vocabulary before the method runs (the vocabulary axis of
a path is 0, or the last axis for a `*.kernel`). Integer/bool tensors are copied only when identical in every
input. Inputs are never modified.
The HF layout. When every input is an nnx model of a family with an HF mapping (interop.hf: llama/Mixtral,
GPT-2, BERT), each parameter is merged as the streaming executor merges the model's HF checkpoint
(`merge_in_hf_layout`): split into its HF tensors (a `*.kernel` (in, out) transposed to torch's (out, in); a stacked
expert kernel (E, in, out) into E tensors (out, in), one merge each), keys tensor_key(seed, HF name) for randomised
methods, parameters still resolved for our path. Kernels that are not element-wise (top-k trims with ties broken
by flat index, per-row ranks, L1 rescales, norms) then give the same result, bit for bit, in memory and through
scripts/merge.py; flat dicts are merged in the layout they hold (HF names: the same; our `*.kernel` paths: theirs).
The convenience wrappers (`ties`, `task_arithmetic`, `linear`, `slerp`, `dare_ties`, `dare_linear`) are
`merge` with the method's parameters as keyword arguments. `merge_slices` is mergekit's `slices:` (frankenmerges,
depth up-scaling, slice-wise merges; ops/merge/slices.py) in memory, returning a model with the new layer count.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import UserError
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.interop import hf as HF
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.execute import copy_integer
from configurable_fm.ops.merge.execute import dtypes_for
from configurable_fm.ops.merge.execute import merge_tensor as _merge_tensor
from configurable_fm.ops.merge.keys import tensor_key
from configurable_fm.ops.merge.registry import MergeMethod, get_method
from configurable_fm.ops.merge.vocab import VocabularyAlignment, vocab_axis_of_path, vocabulary_alignment

State = Union[Mapping[str, Any], nnx.Module]
EmbedAlignment = Union[None, str, "VocabularyAlignment"]  # None | 'base' | 'union' | a model name | alignment

# Substrings naming tensors with a vocabulary axis (ours, HF/mergekit's, GPT-2's, BERT's, GPT-NeoX's).
VOCAB_TENSORS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "tok_embeddings")


class MergeInputError(UserError, ValueError):
    """Inputs that cannot be merged; the message lists every problem, naming the tensors and models."""


def _is_vocab(path: str, vocab_tensors: Sequence[str]) -> bool:
    return any(s in path for s in vocab_tensors)


def as_flat(x, what: str) -> dict[str, Any]:
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


def _is_truncation(embed_alignment) -> bool:
    return isinstance(embed_alignment, str) and embed_alignment == "base"


def _tokenizer_alignment(embed_alignment, tokenizers, all_names, all_flats, names, *, vocab_tensors, has_base,
                         module_template) -> Optional[VocabularyAlignment]:
    """The vocab.VocabularyAlignment for a tokenizer-aware embed_alignment (else None). Each input's vocabulary
    size is the length of the vocabulary axis of its vocabulary tensors (which must agree); the alignment's
    inputs are the models then the base (mergekit's order), the tokenizer base is the base, else the first model."""
    if embed_alignment is None or _is_truncation(embed_alignment):
        return None
    sizes, problems = {}, []
    for nm, f in zip(all_names, all_flats):
        found = {p: _shape(v)[vocab_axis_of_path(p, len(_shape(v)))] for p, v in f.items()
                 if _is_vocab(p, vocab_tensors) and len(_shape(v)) >= 1}
        if len(set(found.values())) > 1:
            problems.append(f"{nm}: vocabulary tensors disagree on the vocabulary size: {found}")
        elif found:
            sizes[nm] = next(iter(found.values()))
    if not sizes:
        problems.append(f"no vocabulary tensor (names containing one of {list(vocab_tensors)})")
    if problems:
        raise MergeInputError(f"cannot align vocabularies of {', '.join(all_names)}:\n  " + "\n  ".join(problems))
    if isinstance(embed_alignment, VocabularyAlignment):
        al = embed_alignment
        if set(al.names) != set(all_names):
            raise MergeInputError(f"the VocabularyAlignment is over {list(al.names)} but the inputs are {all_names}")
    else:
        if tokenizers is None:
            raise ValueError(f"merge: embed_alignment={embed_alignment!r} needs tokenizers= (one per input)")
        if isinstance(tokenizers, Mapping):
            toks = {str(k): v for k, v in tokenizers.items()}
            if set(toks) != set(all_names):
                raise ValueError(f"merge: tokenizers for {sorted(toks)} but the inputs are {all_names}")
        else:
            tokenizers = list(tokenizers)
            if len(tokenizers) != len(all_names):
                raise ValueError(f"merge: {len(tokenizers)} tokenizers for {len(all_names)} inputs {all_names}")
            toks = dict(zip(all_names, tokenizers))
        order = list(names) + (["base"] if has_base else [])
        al = vocabulary_alignment(embed_alignment, {nm: toks[nm] for nm in order},
                                  base="base" if has_base else None, vocab_sizes=sizes)
    ref = all_names[0]
    if module_template and sizes.get(ref) != al.padded_size:
        raise MergeInputError(f"the merged vocabulary has {al.padded_size} rows but the template module "
                              f"({ref}) has {sizes.get(ref)}; merge flat dicts (bricks.paths.flat_params) and build "
                              f"a model with vocab_size={al.padded_size}")
    return al


# How a vocabulary mismatch is resolved, per route (check_inputs' `alignment_hint`).
PYTHON_ALIGNMENT_HINT = ("pass embed_alignment='base' (in a merge config: --config.embed_alignment=base) to "
                         "truncate/pad every input to the base vocabulary")
YAML_ALIGNMENT_HINT = "add `tokenizer_source: base` to the YAML to align every vocabulary to the base's, token by token"
YAML_ALIGNMENT_HINT_NO_BASE = ("add `tokenizer_source: union` (or a model's name) to the YAML to align the "
                               "vocabularies token by token")
MAX_LISTED = 10  # tensors listed in a MergeInputError after the architecture summary

# (label, config keys) of the architecture summary, in the order they are reported.
_ARCH_FIELDS = (
    ("hidden size", ("hidden_size", "n_embd", "d_model")),
    ("layers", ("num_layers", "num_hidden_layers", "n_layer")),
    ("intermediate size", ("intermediate_size", "n_inner", "ffn_dim")),
    ("attention heads", ("num_heads", "num_attention_heads", "n_head")),
    ("key-value heads", ("num_kv_heads", "num_key_value_heads")),
    ("experts", ("num_experts", "num_local_experts")),
    ("vocabulary", ("vocab_size",)),
)
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")
_UP_PROJECTIONS = ("mlp.up_proj", "mlp.gate_proj", "mlp.c_fc", "intermediate.dense", "mlp.fc1")


def architecture(flat: Mapping[str, Any], config: Any = None) -> dict[str, int]:
    """{label: value} of a model's architecture (labels of _ARCH_FIELDS, plus 'tensors'): from `config` (a model
    config dataclass or an HF config.json dict) where it has the field, else derived from the tensors: layers =
    1 + the largest `layers.N` index, hidden size and vocabulary from the token embedding (V, D), intermediate
    size from the MLP's up projections (when they agree). Fields that neither gives are absent."""
    out: dict[str, int] = {}
    if config is not None:
        get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
        for label, keys in _ARCH_FIELDS:
            for k in keys:
                v = get(k)
                if is_int(v):
                    out[label] = int(v)
                    break
    shapes = {p: _shape(v) for p, v in flat.items()}
    derived: dict[str, int] = {}
    layers = P.num_layers_of(shapes)
    if layers:
        derived["layers"] = layers
    emb = next((s for p, s in shapes.items() if len(s) == 2 and any(e in p for e in _EMBEDDINGS)), None)
    if emb is not None:
        derived["vocabulary"], derived["hidden size"] = emb
        ups = {s[0] if s[1] == emb[1] else s[1] for p, s in shapes.items()
               if len(s) == 2 and any(u in p for u in _UP_PROJECTIONS) and emb[1] in s}
        if len(ups) == 1:
            derived["intermediate size"] = ups.pop()
    for label, _ in _ARCH_FIELDS:
        if label not in out and label in derived:
            out[label] = derived[label]
    out["tensors"] = len(shapes)
    return out


def _describe(label: str, value: int) -> str:
    if label in ("layers", "attention heads", "key-value heads", "experts", "tensors"):
        return f"{value} {label[:-1] if value == 1 else label}"
    return f"{label} {value}"


def architecture_differences(names: Sequence[str], archs: Sequence[Mapping[str, int]]) -> str:
    """One line naming what differs between each input's architecture and the first input's, e.g.
    "model_1 has hidden size 64 but base has 576, 2 layers but base has 30"; '' when nothing differs. The tensor
    count is named only when nothing else differs."""
    ref, ref_arch = names[0], archs[0]
    parts = []
    for name, arch in zip(names[1:], archs[1:]):
        diffs = [(label, arch[label], ref_arch[label]) for label in (*(f for f, _ in _ARCH_FIELDS), "tensors")
                 if label in arch and label in ref_arch and arch[label] != ref_arch[label]]
        if len(diffs) > 1:
            diffs = [d for d in diffs if d[0] != "tensors"]
        if diffs:
            parts.append(f"{name} has " + ", ".join(f"{_describe(label, v)} but {ref} has {rv}"
                                                     for label, v, rv in diffs))
    return "; ".join(parts)


def check_inputs(names, flats, *, vocab_tensors, embed_alignment, has_base, configs=None,
                 alignment_hint: str = PYTHON_ALIGNMENT_HINT, max_listed: int = MAX_LISTED):
    """Validates paths, shapes and vocabularies; returns {path: vocab axis} of the tensors to align.

    On a problem raises one MergeInputError, short whatever the models: first a line naming how the inputs'
    architectures differ (`architecture`, from `configs` (one per input, or None) where given, else from the
    tensors' shapes and counts), then the number of tensors that differ and the first `max_listed` of them
    (in the first input's order), then what to do: for a vocabulary-only difference `alignment_hint`, the knob
    of the caller's route (PYTHON_ALIGNMENT_HINT for tree.merge and merge configs, YAML_ALIGNMENT_HINT for a
    mergekit YAML); for any other difference, that only models of one architecture merge tensor by tensor."""
    problems: list[tuple[int, str]] = []  # (position in all_paths, text)
    all_paths = list(dict.fromkeys(p for f in flats for p in f))
    n_missing = n_shapes = n_vocab = 0
    for i, p in enumerate(all_paths):
        missing = [n for n, f in zip(names, flats) if p not in f]
        if missing:
            have = [n for n, f in zip(names, flats) if p in f]
            problems.append((i, f"tensor {p} is missing in {', '.join(missing)} (present in {', '.join(have)})"))
            n_missing += 1
    align = {}
    vocab_lines = []
    for i, p in enumerate(all_paths):
        if any(p not in f for f in flats):
            continue
        shapes = [_shape(f[p]) for f in flats]
        if len(set(shapes)) == 1:
            continue
        described = ", ".join(f"{s} in {n}" for n, s in zip(names, shapes))
        axis = _vocab_axis(shapes)
        if axis is not None and _is_vocab(p, vocab_tensors) and axis == vocab_axis_of_path(p, len(shapes[0])):
            if embed_alignment is not None and not _is_truncation(embed_alignment):
                continue  # tokenizer-aware alignment (vocab.py) handles every vocabulary tensor
            if embed_alignment == "base" and has_base:
                align[p] = axis
                continue
            vocab_lines.append(len(problems))
            problems.append((i, f"vocabulary mismatch: {p} is {described} (axis {axis})"))
            n_vocab += 1
        else:
            problems.append((i, f"shape mismatch: {p} is {described}"))
            n_shapes += 1
    if not problems:
        return align
    archs = [architecture(f, None if configs is None else configs[k]) for k, f in enumerate(flats)]
    summary = architecture_differences(names, archs)
    vocab_only = n_missing == n_shapes == 0
    if vocab_only:
        hint = ("embed_alignment='base' needs a base model" if embed_alignment == "base" else alignment_hint)
        for k in vocab_lines:  # each vocabulary line says what to do (there are few: embeddings and head)
            problems[k] = (problems[k][0], f"{problems[k][1]}; {hint}")
    problems.sort(key=lambda x: x[0])
    head = f"cannot merge {', '.join(names)}" + (f": {summary}" if summary else "")
    counts = ", ".join(f"{n} {what}" for n, what in ((n_missing, "missing"), (n_shapes, "of other shapes"),
                                                      (n_vocab, "of other vocabulary sizes")) if n)
    lines = [head]
    if len(problems) > 1 or summary:
        lines.append(f"{len(problems)} tensor(s) differ ({counts})"
                     + (f"; the first {max_listed}:" if len(problems) > max_listed else ":"))
    lines += [f"  {text}" for _, text in problems[:max_listed]]
    if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more")
    if not vocab_only:
        lines.append("only models of one architecture merge tensor by tensor (e.g. fine-tunes of one base model)"
                     + (f"; a vocabulary difference alone is resolved as follows: {alignment_hint}"
                        if n_vocab else ""))
    raise MergeInputError("\n".join(lines))


def merge_tensor(method: MergeMethod, path: str, base, inputs: Sequence[Any], kwargs: Mapping[str, Any], *,
                 seed: int, out_dtype, compute_dtype: Optional[str] = None):
    """One floating output tensor: y = kernel(b, xs (N, *S), key=tensor_key(seed, path) if randomised, **kwargs),
    the inputs cast to float32 and stacked, y cast to `out_dtype`; `execute.merge_tensor` (one jitted function
    per method, parameters and dtypes, cached). kwargs: resolved parameters (params.resolve_for_tensor /
    resolve_levels). compute_dtype: None (float32) or 'float16' | 'bfloat16' (precision.py). Errors of the kernel
    are re-raised naming method and tensor."""
    key = tensor_key(seed, path) if method.randomized else None
    return _merge_tensor(method, base, inputs, kwargs, out_dtype=out_dtype, key=key, name=path,
                         compute_dtype=compute_dtype)


def hf_layout(template) -> dict[str, "HF.TensorMapping"]:
    """{parameter path: interop.hf.TensorMapping} of an nnx model whose family converts to HF checkpoints (how
    each parameter is made of HF tensors: a `*.kernel` (in, out) is one torch weight (out, in); a stacked expert
    kernel (E, in, out) is E weights (out, in)); {} for a flat dict or a model without an HF mapping."""
    if not isinstance(template, nnx.Module):
        return {}
    try:
        maps = HF.family_for(template).tensor_map(template.cfg)
    except (TypeError, AttributeError, HF.UnsupportedModel):
        return {}
    return {mp.path: mp for mp in maps}


def merge_in_hf_layout(method: MergeMethod, path: str, mapping: "HF.TensorMapping", base, inputs: Sequence[Any],
                       kwargs: Mapping[str, Any], *, seed: int, out_dtype, compute_dtype: Optional[str] = None):
    """One parameter merged as its HF checkpoint tensors are merged by the streaming executor (stream.py): each
    input is split into the HF tensors of `mapping` (transposed to torch's (out, in), one per expert), every HF
    tensor h goes through execute.merge_tensor on its own (key tensor_key(seed, h) if randomised; parameters
    `kwargs`, resolved for `path`), and the results are put back into our layout. Rank-based selections (TIES
    trim, breadcrumbs, DELLA's per-row ranks), L1 rescales and norms then see exactly the tensors the stream
    sees, so the two routes agree bit for bit, ties in magnitude included (sparsify.py: ties rank by flat index
    in the HF layout)."""
    views_b = None if base is None else mapping.to_hf(np.asarray(base))
    views = [mapping.to_hf(np.asarray(x)) for x in inputs]
    ys = []
    for j, h in enumerate(mapping.hf_keys):
        key = tensor_key(seed, h) if method.randomized else None
        y = _merge_tensor(method, None if views_b is None else views_b[j], [v[j] for v in views], kwargs,
                          out_dtype=out_dtype, key=key, name=f"{path} (HF {h})", compute_dtype=compute_dtype)
        ys.append(np.asarray(y))
    return jnp.asarray(mapping.to_param(ys))


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
    tokenizers: Union[Sequence[Any], Mapping[str, Any], None] = None,
    compute_dtype: Optional[str] = None,
) -> Union[State, tuple[State, Any]]:
    """Merges `models` (and `base`) with a registered method, tensor by tensor (module docstring).

    base: the base model (required/optional/must be None according to the method's contract).
    models: the other inputs, a sequence (named model_0, model_1, ...) or a {name: model} mapping, in mergekit's
      `models:` order minus the base. Each input is a flat {path: array} dict (bricks.paths.flat_params) or an
      nnx.Module; the result has the kind of the template (the base, or the first model without one): a new
      module (only its nnx.Param leaves merged, the rest from the template) or a dict.
    parameters: global settings {name: setting}; model_parameters: one {name: setting} (or None) per model, as a
      list in `models` order or a {model name: settings} mapping, taking precedence for per-model parameters
      (settings: scalars, gradients, {filter, value} lists; params.py).
    seed: for randomised methods, key = tensor_key(seed, path) (order independent); for nnx models with an HF
      mapping, tensor_key(seed, HF tensor name) per HF tensor (module docstring: the HF layout).
    num_layers: depth for gradients (default: 1 + the largest `layers.N` index in the paths).
    embed_alignment: None, 'base' (truncate/pad to the base's vocabulary), or tokenizer-aware: 'union' / a
      model name (with `tokenizers`: {input name: tokenizers.Tokenizer} with "base" for the base, or a list in
      [base] + models order), or a vocab.VocabularyAlignment over the names ["base"] + model names (built by
      vocab.vocabulary_alignment, e.g. with `tokens` overrides and `pad_to_multiple_of`).
    compute_dtype: the arithmetic (precision.py): None / 'float32' (default: float32, rounded once to out_dtype),
      'float16' | 'bfloat16' (inputs rounded to it and every operation rounded as mergekit 0.1.5 computes in that
      dtype), or 'mergekit' (the inputs' dtype when they share one: bf16 models merge in bf16 as mergekit does).
      A reduced compute dtype without out_dtype gives float32 results for arcee_fusion and ramplus_tl.
    Returns the merged state; for embed_alignment 'union' / a model name: (merged state, output tokenizer).
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
    if embed_alignment is not None and not isinstance(embed_alignment, (str, VocabularyAlignment)):
        raise ValueError(f"merge: embed_alignment must be None, 'base', 'union', a model name or a "
                         f"VocabularyAlignment, got {embed_alignment!r}")
    if _is_truncation(embed_alignment) and tokenizers is not None:
        raise ValueError("merge: tokenizers= is used with embed_alignment='union', a model name or a "
                         "VocabularyAlignment; embed_alignment='base' truncates without them")
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
    base_flat = None if base is None else as_flat(base, "base")
    flats = [as_flat(x, f"model {nm!r}") for x, nm in zip(models, names)]
    all_names = (["base"] if base_flat is not None else []) + names
    all_flats = ([base_flat] if base_flat is not None else []) + flats
    configs = ([getattr(base, "cfg", None)] if base_flat is not None else []) + [getattr(x, "cfg", None)
                                                                                for x in models]
    align = check_inputs(all_names, all_flats, vocab_tensors=vocab_tensors, embed_alignment=embed_alignment,
                         has_base=base_flat is not None, configs=configs)
    vocab_al = _tokenizer_alignment(embed_alignment, tokenizers, all_names, all_flats, names,
                                    vocab_tensors=vocab_tensors, has_base=base_flat is not None,
                                    module_template=isinstance(template, nnx.Module))
    ref = all_flats[0]
    depth = P.num_layers_of(ref) if num_layers is None else num_layers
    layout = hf_layout(template) if all(isinstance(x, nnx.Module) for x in [base, *models] if x is not None) else {}

    out: dict[str, Any] = {}
    for path, ref_value in ref.items():
        dtype = jnp.asarray(ref_value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            out[path] = copy_integer(path, [ref_value] + [f[path] for f in all_flats[1:]], all_names)
            continue
        b = None if base_flat is None or m.base == "ignored" else base_flat[path]
        inputs = [f[path] for f in flats]
        if path in align:
            inputs = [_align_to_base(x, base_flat[path], align[path]) for x in inputs]
        if vocab_al is not None and _is_vocab(path, vocab_tensors):
            aligned = vocab_al.align_all({nm: f[path] for nm, f in zip(all_names, all_flats)}, tensor=path,
                                         axis=vocab_axis_of_path(path, len(_shape(ref_value))))
            b = None if b is None else aligned["base"]
            inputs = [aligned[nm] for nm in names]
        kwargs = P.resolve_for_tensor(m, path, parameters=parameters, model_parameters=model_parameters,
                                      model_names=names, num_layers=depth)
        odt, cdt = dtypes_for(m, [dtype] + [jnp.asarray(x).dtype for x in inputs], out_dtype=out_dtype,
                              compute_dtype=compute_dtype)
        if path in layout:
            out[path] = merge_in_hf_layout(m, path, layout[path], b, inputs, kwargs, seed=seed, out_dtype=odt,
                                           compute_dtype=cdt)
        else:
            out[path] = merge_tensor(m, path, b, inputs, kwargs, seed=seed, out_dtype=odt, compute_dtype=cdt)
    if isinstance(template, nnx.Module):
        out = with_params(template, out)
    if isinstance(embed_alignment, str) and not _is_truncation(embed_alignment):
        return out, vocab_al.tokenizer
    return out


# ------------------------------------------------------------------------------------------ convenience wrappers
def _per_model_settings(method: str, name: str, values, n: int) -> list[Optional[dict]]:
    """`weights=` etc.: one setting per model (a list of length N) or one scalar for all."""
    if is_real(values):
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


# ---------------------------------------------------------------------------------------------------- slices
def merge_task(method: MergeMethod, task, read, kwargs: Mapping[str, Any], *, seed: int = 0, out_dtype=None,
               compute_dtype: Optional[str] = None):
    """The output tensor of one slices.TensorTask: read(model, tensor name) gives each input; integer tensors
    are copied when identical; floating ones go through `merge_tensor` (out_dtype default: the base's dtype,
    else the first input's; compute_dtype: as in `merge`)."""
    b = read(*task.base) if task.base is not None else None
    xs = [read(m, n) for m, n in task.inputs]
    first = b if b is not None else xs[0]
    dtype = jnp.asarray(first).dtype if not isinstance(first, np.ndarray) else first.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        pairs = ([task.base] if task.base is not None else []) + list(task.inputs)
        return copy_integer(task.name, ([b] if b is not None else []) + xs, [f"{n} of {m}" for m, n in pairs])
    odt, cdt = dtypes_for(method, [dtype] + [jnp.asarray(x).dtype for x in xs], out_dtype=out_dtype,
                          compute_dtype=compute_dtype)
    return merge_tensor(method, task.name, b, xs, kwargs, seed=seed, out_dtype=odt, compute_dtype=cdt)


def _num_layers_field(cfg) -> str:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cfg)}
    for name in ("num_layers", "n_layer", "num_hidden_layers"):
        if name in fields:
            return name
    raise TypeError(f"merge_slices: {type(cfg).__name__} has no layer-count field (num_layers / n_layer)")


def merge_slices(
    method: Union[str, MergeMethod],
    slices: Sequence[Any],
    models: Mapping[str, State],
    *,
    base: Optional[str] = None,
    parameters: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    out_dtype=None,
    pre_tensors: Optional[Sequence[str]] = None,
    compute_dtype: Optional[str] = None,
) -> State:
    """mergekit `slices:` in memory: a new stack of layers, each output layer merged from one layer of every
    source of its slice (ops/merge/slices.py has the semantics: renumbering, depth t = k/(L − 1) per slice,
    precedence source > slice > `parameters`, the tensors outside the layers from the first/last slice).

        # SOLAR-style depth up-scaling: layers 0..23 then 8..31 of one model, 48 layers
        up = merge_slices("passthrough", [{"sources": [{"model": "m", "layer_range": [0, 24]}]},
                                          {"sources": [{"model": "m", "layer_range": [8, 32]}]}], {"m": model})

    slices: slices.OutputSlice objects or mergekit-style dicts {"sources": [{"model": NAME, "layer_range":
      [a, b], "parameters": {...}}], "parameters": {...}, "base_model": NAME}.
    models: {name: flat {path: array} dict (our `layers.N.` or HF `model.layers.N.` paths) or nnx.Module}.
    base: the name of the base model (a source of every slice, for methods that use it); it is also the
      reference whose config/tensors outside the layers define the output (default: the first source).
    compute_dtype: the arithmetic, as in `merge`.
    Returns a flat dict, or, for nnx.Module inputs, a new module of the reference's family whose config has the
    new layer count (built with factory.build_model, then every parameter set from the merge).
    Raises slices.SliceError (invalid slices), MergeInputError (missing tensors, shapes), ParameterError.
    """
    from configurable_fm.ops.merge import slices as S

    m = get_method(method) if isinstance(method, str) else method
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"merge_slices: models must be a non-empty {{name: model}} mapping, got {type(models).__name__}")
    outs = S.as_slices(slices)
    P.check_names(m, parameters, None, [])
    flats = {str(n): as_flat(x, f"model {n!r}") for n, x in models.items()}
    kw = {"pre_tensors": tuple(pre_tensors)} if pre_tensors is not None else {}
    reference = base if base is not None else outs[0].sources[0].model
    tasks, num_layers = S.plan_tensors(m, outs, {n: list(f) for n, f in flats.items()}, base=base,
                                       parameters=parameters, reference=reference, **kw)
    S.check_shapes(tasks, lambda mdl, n: _shape(flats[mdl][n]))
    resolved = S.resolve_all(m, tasks)
    out = {task.name: merge_task(m, task, lambda mdl, n: flats[mdl][n], kwargs, seed=seed, out_dtype=out_dtype,
                                 compute_dtype=compute_dtype)
           for task, kwargs in zip(tasks, resolved)}
    template = models[reference]
    if not isinstance(template, nnx.Module):
        return out
    import dataclasses

    from configurable_fm.models.factory import build_model

    cfg = dataclasses.replace(template.cfg, **{_num_layers_field(template.cfg): num_layers})
    fresh = build_model(cfg)
    expected = set(flat_params(fresh))
    if expected != set(out):
        raise MergeInputError(f"merge_slices: the merged tensors do not match a {type(template).__name__} with "
                              f"{num_layers} layers: missing {sorted(expected - set(out))[:5]}, unexpected "
                              f"{sorted(set(out) - expected)[:5]}")
    return with_params(fresh, out)
