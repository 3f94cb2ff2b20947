"""Merging from ml-collections configs, and the pipeline stage kind 'merge'.

    cfg = merge_config("task_arithmetic", ["runs/a/model", "runs/b/model"], base="runs/pre/model",
                       parameters={"weight": 1.0}, model_parameters=[{"weight": 0.5}, {"weight": 0.5}])
    model = merge_from_config(cfg)                       # tree.merge over load_model(source) of every input
    python scripts/merge.py --config experiments/merge/task_arithmetic_tiny.py --output merged/ --format hf

Config keys (a merge config; as a study stage it also has `name` and kind 'merge'):
    method           : a registered merge method (registry.METHODS), e.g. 'task_arithmetic', 'ties', 'linear'
    base             : a source `load_model` takes (registry name, HF dir, .gguf, orbax model checkpoint, or a
                       stage reference '@<stage>' in a study), or '' for none
    models           : the other inputs' sources, in mergekit's `models:` order minus the base (N >= 1); empty
                       with `slices`
    slices           : mergekit's `slices:` instead of `models` (frankenmerges, depth up-scaling): a list of
                       {sources: [{model: <source>, layer_range: [a, b], parameters}], parameters, base_model};
                       the result is `tree.merge_slices(method, slices, {source: load_model(source)}, base=base)`,
                       a model with the new layer count (sum of the slices' b - a). `base` (optional) names the
                       source that is the base of every slice for methods that use one, and the reference whose
                       tensors outside the layers define the output (default: the first slice's first source).
                       No `model_parameters` (per-source settings go in the sources' `parameters`) and no
                       `embed_alignment`.
    parameters       : global settings {name: setting} (params.py: scalars, gradients, {filter, value} lists)
    model_parameters : one {name: setting} dict per model (same length as `models`), or empty
    seed             : PRNG seed of randomised methods (keys are order independent)
    out_dtype        : '' (the base's dtype, else the first model's) or a dtype name ('float32', 'bfloat16')
    compute_dtype    : '' (float32 arithmetic, rounded once to the output dtype), 'float16' | 'bfloat16' (mergekit
                       0.1.5's arithmetic in that dtype: ops/merge/precision.py) or 'mergekit' (the inputs' dtype
                       when they share one); mergekit-style methods only
    embed_alignment  : '' (a vocabulary mismatch is an error), 'base' (inputs cut/padded to the base's), or
                       tokenizer-aware (vocab.py, mergekit's `tokenizer_source`): 'union' (the base's tokenizer
                       plus every other input's tokens) or one input's source (its tokenizer); every input's
                       vocabulary rows are permuted by token into the output vocabulary. The tokenizers come from
                       the sources (`source_tokenizer`: registry name, .gguf, a directory with tokenizer.json);
                       the output model has vocab_size = the output vocabulary's size, and
                       `merge_from_config(cfg, with_tokenizer=True)` also returns the output tokenizer.
    data             : only for the data-dependent methods below: a make_data config (train/data.py: `data.kind`
                       'shards' or 'tasks', seq_len, batch_size, seed, tokenizer, token_ids, ...), e.g.
                       experiments/finetune.py's config; absent for the mergekit-style methods
The merged model is `tree.merge(method, load_model(base), [load_model(m) for m in models], ...)`.

Data-dependent methods (not mergekit methods; no base, no embed_alignment): 'fisher' (ops/merge/fisher.py) and
'regmean' (ops/merge/regmean.py). Every model's statistics come from its own forward over the same batches of
`make_data(data)`: split 'train' (default) reads `train_batches()` (the seeded shuffled order; `max_batches`
batches, default one epoch `batches_per_epoch`), split 'eval' reads `eval_batches()` (all of them, or
`max_batches`). model_parameters may give each model a `weight` (default 1).
    fisher  parameters: kind 'empirical'|'sampled' (default 'empirical'; sampled keys: jax.random.key(seed) folded
                        with the model index), fisher_floor (1e-6), normalize (False), chunk (1), split, max_batches
            merged = fisher_merge(models, [diagonal_fisher(m, batches, ...) for m in models], weights, ...)
    regmean parameters: alpha (0.9), split, max_batches
            merged = regmean_merge(models, [gram_matrices(m, batches)[0] for m in models], alpha, weights)
The result is the first model with the merged parameters (cast to `out_dtype` when set).

Stage kind 'merge' (registered when configurable_fm.stages is imported):
runs `merge_from_config` on the resolved stage config and writes the result as the stage's output model
(stage_dir/model, an orbax model checkpoint). Metrics: number of inputs and of merged parameters.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections

from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError
from configurable_fm.stages.study import StageContext, StageOutput, register_stage, to_plain

MERGE_KEYS = ("method", "base", "models", "parameters", "model_parameters", "seed", "out_dtype", "embed_alignment",
              "data", "slices", "compute_dtype")
STAGE_KEYS = ("name", "kind")
# Data-dependent methods: {method: {parameter: default}} (None: see the module docstring).
DATA_METHODS = {
    "fisher": {"kind": "empirical", "fisher_floor": 1e-6, "normalize": False, "chunk": 1, "split": "train",
               "max_batches": None},
    "regmean": {"alpha": 0.9, "split": "train", "max_batches": None},
}


def merge_config(method: str, models: Sequence[str], base: str = "", *, parameters: Mapping | None = None,
                 model_parameters: Sequence[Mapping] | None = None, seed: int = 0, out_dtype: str = "",
                 embed_alignment: str = "", name: str | None = None,
                 data: ml_collections.ConfigDict | Mapping | None = None,
                 slices: Sequence[Mapping] | None = None, compute_dtype: str = "") -> ml_collections.ConfigDict:
    """A merge config (module docstring); with `name`, a study stage of kind 'merge'. `data` (a make_data
    config) is set only when given (the data-dependent methods 'fisher' and 'regmean' need it); `slices`
    (mergekit-style slice dicts, with models=()) only when given."""
    c = ml_collections.ConfigDict()
    if name is not None:
        c.name, c.kind = name, "merge"
    c.method = method
    c.base = base or ""
    c.models = tuple(str(m) for m in models)
    c.parameters = ml_collections.ConfigDict(dict(parameters or {}))
    c.model_parameters = tuple(dict(p or {}) for p in (model_parameters or ()))
    c.seed = int(seed)
    c.out_dtype = out_dtype or ""
    c.embed_alignment = embed_alignment or ""
    c.compute_dtype = compute_dtype or ""
    if data is not None:
        c.data = ml_collections.ConfigDict(to_plain(data, "merge config data"))
    if slices is not None:
        c.slices = tuple(to_plain(sl, f"merge config slices[{i}]") for i, sl in enumerate(slices))
    return c


def _plain_config(cfg) -> dict[str, Any]:
    """The merge config as plain Python values, every key checked (errors name the key)."""
    d = to_plain(cfg, "merge config")
    if not isinstance(d, dict):
        raise TypeError(f"merge config must be a ConfigDict or mapping, got {type(cfg).__name__}")
    unknown = sorted(set(d) - set(MERGE_KEYS) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"merge config: unknown key(s) {unknown}; valid keys: {sorted(MERGE_KEYS)}")
    if "method" not in d:
        raise ConfigError("merge config: missing required key 'method'")
    if not isinstance(d["method"], str) or not d["method"]:
        raise ConfigError(f"merge config: `method` must be a method name, got {d['method']!r}")
    compute = _compute_dtype(d)
    if d.get("slices"):
        return dict(_slices_config(d), compute_dtype=compute)
    if "models" not in d:
        raise ConfigError("merge config: missing required key 'models' (or `slices`)")
    models = d["models"]
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ConfigError(f"merge config: `models` must be a non-empty list of model sources (or give `slices`), "
                         f"got {models!r}")
    for i, m in enumerate(models):
        if not isinstance(m, str) or not m:
            raise ConfigError(f"merge config: models[{i}] must be a model source (non-empty string), got {m!r}")
    base = d.get("base") or ""
    if not isinstance(base, str):
        raise ConfigError(f"merge config: `base` must be a model source or '', got {base!r}")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"merge config: `parameters` must be a dict, got {params!r}")
    per_model = list(d.get("model_parameters") or ())
    if per_model and len(per_model) != len(models):
        raise ConfigError(f"merge config: `model_parameters` has {len(per_model)} entries but `models` has "
                         f"{len(models)} (one dict per model, or none)")
    for i, p in enumerate(per_model):
        if p is not None and not isinstance(p, dict):
            raise ConfigError(f"merge config: model_parameters[{i}] (for {models[i]!r}) must be a dict, got {p!r}")
    align = d.get("embed_alignment") or None
    if align not in (None, "base", "union") and align not in [base, *models]:
        raise ConfigError(f"merge config: `embed_alignment` must be '', 'base', 'union' or one of the input "
                         f"sources {[m for m in [base, *models] if m]}, got {align!r}")
    seed = d.get("seed", 0)
    if not is_int(seed):
        raise ConfigError(f"merge config: `seed` must be an integer, got {seed!r}")
    data = d.get("data") or None
    if d["method"] in DATA_METHODS:
        if compute is not None:
            raise ConfigError(f"merge config: `compute_dtype` applies to the mergekit-style methods, not to "
                             f"{d['method']!r}; remove it")
        params = _data_method_parameters(d["method"], params, per_model, models, base, align, data)
    elif data is not None:
        raise ConfigError(f"merge config: `data` applies to the data-dependent methods {sorted(DATA_METHODS)} only, "
                         f"not to {d['method']!r}; remove it")
    return dict(method=d["method"], base=base, models=list(models), parameters=params,
                model_parameters=[p or {} for p in per_model] or None, seed=seed,
                out_dtype=d.get("out_dtype") or None, embed_alignment=align, data=data, slices=None,
                compute_dtype=compute)


def _compute_dtype(d: dict):
    """The checked `compute_dtype` setting: None (float32) or 'float16' | 'bfloat16' | 'mergekit'."""
    from configurable_fm.ops.merge.precision import MODES

    value = d.get("compute_dtype") or None
    if value is not None and value not in MODES:
        raise ConfigError(f"merge config: `compute_dtype` must be '' or one of {list(MODES)}, got {value!r}")
    return None if value == "float32" else value


def _slices_config(d: dict) -> dict[str, Any]:
    """A checked config with `slices` (module docstring); errors name the key (slices[i].sources[j].model ...)."""
    where = "merge config"
    if d["method"] in DATA_METHODS:
        raise ConfigError(f"{where}: `slices` applies to the mergekit methods, not to {d['method']!r}")
    for key in ("models", "model_parameters", "embed_alignment", "data"):
        if d.get(key):
            raise ConfigError(f"{where}: `{key}` must be empty with `slices` (the slices' sources are the inputs; "
                             f"per-source settings go in slices[i].sources[j].parameters), got {d[key]!r}")
    from configurable_fm.ops.merge import slices as S
    from configurable_fm.ops.merge.registry import get_method

    try:
        outs = S.as_slices(d["slices"])
        found = S.problems(get_method(d["method"]), outs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if found:
        raise ConfigError(f"{where}: " + "; ".join(msg for _, msg in found))
    sources = [src.model for sl in outs for src in sl.sources]
    base = d.get("base") or ""
    if not isinstance(base, str) or (base and base not in sources):
        raise ConfigError(f"merge config: `base` must be '' or one of the slices' sources {sorted(set(sources))}, "
                         f"got {base!r}")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"merge config: `parameters` must be a dict, got {params!r}")
    seed = d.get("seed", 0)
    if not is_int(seed):
        raise ConfigError(f"merge config: `seed` must be an integer, got {seed!r}")
    return dict(method=d["method"], base=base, models=list(dict.fromkeys(sources)), parameters=params,
                model_parameters=None, seed=seed, out_dtype=d.get("out_dtype") or None, embed_alignment=None,
                data=None, slices=outs)


def source_tokenizer(source: str):
    """The tokenizers.Tokenizer of a model source (data.shards.resolve_tokenizer): a registry name, a .gguf file,
    or a directory holding tokenizer.json (an HF directory, or a model checkpoint next to which one was saved);
    None when the source has none."""
    from pathlib import Path

    from configurable_fm.data.shards import resolve_tokenizer
    from configurable_fm.models import registry

    path = Path(source)
    has_one = source in registry.MODELS or (path.suffix == ".gguf" and path.is_file()) \
        or (path / "tokenizer.json").is_file()
    if has_one:
        return resolve_tokenizer(source)[0]
    return None


def _data_method_parameters(method, params, per_model, models, base, align, data) -> dict[str, Any]:
    """The parameters of 'fisher'/'regmean' with their defaults, every setting checked (errors name the key)."""
    where = f"merge config ({method})"
    if base:
        raise ConfigError(f"{where}: `base` must be '' ({method} merges the models themselves), got {base!r}")
    if align is not None:
        raise ConfigError(f"{where}: `embed_alignment` must be '' (vocabularies must match), got {align!r}")
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict) or not data["data"].get("kind"):
        raise ConfigError(f"{where}: needs `data`, a make_data config with data.kind ('shards' or 'tasks'), "
                         "seq_len, batch_size, seed, ... (e.g. experiments/finetune.py's config)")
    defaults = DATA_METHODS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; valid: {sorted(defaults)}")
    p = {**defaults, **params}
    if p["split"] not in ("train", "eval"):
        raise ConfigError(f"{where}: parameters.split must be 'train' or 'eval', got {p['split']!r}")
    mb = p["max_batches"]
    if mb is not None and (not is_int(mb) or mb < 0):
        raise ConfigError(f"{where}: parameters.max_batches must be an integer >= 1 (0 or None: the default), "
                         f"got {mb!r}")
    p["max_batches"] = mb or None
    numbers = {"fisher_floor": (0.0, None), "alpha": (0.0, 1.0)}
    for key, (low, high) in numbers.items():
        if key in p:
            v = p[key]
            if not is_real(v) or v < low or (high is not None and v > high) \
                    or (key == "fisher_floor" and v <= 0):
                span = f"in [{low}, {high}]" if high is not None else "> 0"
                raise ConfigError(f"{where}: parameters.{key} must be a number {span}, got {v!r}")
    if "kind" in p and p["kind"] not in ("empirical", "sampled"):
        raise ConfigError(f"{where}: parameters.kind must be 'empirical' or 'sampled', got {p['kind']!r}")
    if "normalize" in p and not isinstance(p["normalize"], bool):
        raise ConfigError(f"{where}: parameters.normalize must be true or false, got {p['normalize']!r}")
    if "chunk" in p and (not is_int(p["chunk"]) or p["chunk"] < 1):
        raise ConfigError(f"{where}: parameters.chunk must be an integer >= 1, got {p['chunk']!r}")
    for i, mp in enumerate(per_model):
        extra = sorted(set(mp or {}) - {"weight"})
        if extra:
            raise ConfigError(f"{where}: model_parameters[{i}] (for {models[i]!r}) has unknown key(s) {extra}; "
                             "valid: ['weight']")
        wv = (mp or {}).get("weight", 1.0)
        if not is_real(wv) or wv < 0:
            raise ConfigError(f"{where}: model_parameters[{i}].weight (for {models[i]!r}) must be a number >= 0, "
                             f"got {wv!r}")
    return p


def _statistic_batches(data, split: str, max_batches):
    """(a fresh iterator over the batches, the number to read): the same batches on every call."""
    if split == "eval":
        return data.eval_batches(), max_batches
    it = data.train_batches()
    return it, max_batches or it.batches_per_epoch


def _data_merge(d: dict, log=None):
    """Fisher / RegMean merge of a checked config (module docstring)."""
    import jax
    import ml_collections as mlc

    from configurable_fm.bricks.paths import with_params
    from configurable_fm.interop.loader import load_model
    from configurable_fm.train.data import make_data

    method, p = d["method"], d["parameters"]
    data = make_data(mlc.ConfigDict(d["data"]))
    weights = [float((mp or {}).get("weight", 1.0)) for mp in (d["model_parameters"] or [{}] * len(d["models"]))]
    if log is not None:
        log(f"merging {len(d['models'])} model(s) with {method} (statistics on the {p['split']} split of "
            f"data.kind={d['data']['data']['kind']!r})")
    models = [load_model(m) for m in d["models"]]
    if method == "fisher":
        from configurable_fm.ops.merge.fisher import diagonal_fisher, fisher_merge

        fishers = []
        for i, m in enumerate(models):
            batches, n = _statistic_batches(data, p["split"], p["max_batches"])
            key = jax.random.fold_in(jax.random.key(d["seed"]), i) if p["kind"] == "sampled" else None
            fishers.append(diagonal_fisher(m, batches, kind=p["kind"], key=key, max_batches=n, chunk=p["chunk"]))
        merged = fisher_merge(models, fishers, weights=weights, fisher_floor=p["fisher_floor"],
                              normalize=p["normalize"])
    else:
        from configurable_fm.ops.merge.regmean import gram_matrices, regmean_merge

        grams = []
        for m in models:
            batches, n = _statistic_batches(data, p["split"], p["max_batches"])
            g, n_tokens = gram_matrices(m, batches, max_batches=n)
            if log is not None:
                log(f"  Gram matrices of {len(g)} linear layers over {n_tokens} tokens")
            grams.append(g)
        merged = regmean_merge(models, grams, alpha=p["alpha"], weights=weights)
    if d["out_dtype"] is not None:
        merged = {k: v.astype(d["out_dtype"]) if _is_floating(v) else v for k, v in merged.items()}
    return with_params(models[0], merged)


def _is_floating(x) -> bool:
    import jax.numpy as jnp

    return bool(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))


def check_config(cfg) -> tuple[dict[str, Any], Any, Any]:
    """(the merge config as checked plain values, its MergeMethod or None for a data-dependent method, out_dtype
    as a jnp dtype or None); ConfigError naming the key, before any model is loaded."""
    import jax.numpy as jnp

    from configurable_fm.ops.merge.registry import get_method

    d = _plain_config(cfg)
    if d["method"] in DATA_METHODS:
        method = None
    else:
        try:
            method = get_method(d["method"])
        except ValueError as e:
            raise ConfigError(f"{e} (or the data-dependent {sorted(DATA_METHODS)})") from None
    out_dtype = None
    if d["out_dtype"] is not None:
        try:
            out_dtype = jnp.dtype(d["out_dtype"])
        except TypeError:
            raise ConfigError(f"merge config: unknown `out_dtype` {d['out_dtype']!r}") from None
    if method is not None and method.base != "ignored" and d["base"] and d["base"] in d["models"]:
        # mergekit (and our YAML path): a `models` entry equal to the base is the base, not one more input
        keep = [i for i, m in enumerate(d["models"]) if m != d["base"]]
        d["models"] = [d["models"][i] for i in keep]
        if d["model_parameters"] is not None:
            d["model_parameters"] = [d["model_parameters"][i] for i in keep]
    return d, method, out_dtype


def merge_from_config(cfg, *, log=None, with_tokenizer: bool = False):
    """The merged nnx model of a merge config (module docstring): `tree.merge` over `load_model` of the sources
    (`tree.merge_slices` with `slices`). with_tokenizer: return (model, output tokenizer), the tokenizer being
    the aligned vocabulary's for a tokenizer-aware `embed_alignment`, else None.
    Raises ValueError naming the key for a bad config (unknown key, wrong type, length mismatch, unknown method
    or dtype, an input without a tokenizer for 'union' / a model name), before loading any model."""
    from configurable_fm.interop.loader import load_model
    from configurable_fm.ops.merge.tree import merge

    d, method, out_dtype = check_config(cfg)
    if d["out_dtype"] == "float64" and log is not None:
        log("note: out_dtype float64 is computed and stored as float32 here (jax without x64)")
    if method is None:
        model = _data_merge({**d, "out_dtype": out_dtype}, log=log)
        return (model, None) if with_tokenizer else model
    if d["slices"] is not None:
        from configurable_fm.ops.merge.tree import merge_slices

        if log is not None:
            log(f"merging {len(d['slices'])} slice(s) of {len(d['models'])} model(s) with {d['method']}")
        model = merge_slices(method, d["slices"], {m: load_model(m) for m in d["models"]}, base=d["base"] or None,
                             parameters=d["parameters"], seed=d["seed"], out_dtype=out_dtype,
                             compute_dtype=d["compute_dtype"])
        return (model, None) if with_tokenizer else model
    align = d["embed_alignment"]
    if align not in (None, "base"):
        return _tokenizer_merge(method, d, out_dtype, log, with_tokenizer)
    if log is not None:
        log(f"merging {len(d['models'])} model(s) with {d['method']}" + (f" onto base {d['base']}" if d["base"]
                                                                           else " (no base)"))
    base = load_model(d["base"]) if d["base"] else None
    models = [load_model(m) for m in d["models"]]
    model = merge(method, base, models, parameters=d["parameters"], model_parameters=d["model_parameters"],
                  seed=d["seed"], out_dtype=out_dtype, embed_alignment=align, compute_dtype=d["compute_dtype"])
    return (model, None) if with_tokenizer else model


def _tokenizer_merge(method, d: dict, out_dtype, log, with_tokenizer: bool):
    """tree.merge with embed_alignment 'union' / an input's source: the inputs named 'base', 'model_0', ...,
    their tokenizers from `source_tokenizer`, merged as flat dicts; the model is the template's family with
    vocab_size = the output vocabulary's (padded) size."""
    import dataclasses

    from configurable_fm.bricks.paths import flat_params, with_params
    from configurable_fm.interop.loader import load_model
    from configurable_fm.models.factory import build_model
    from configurable_fm.ops.merge.tree import VOCAB_TENSORS, merge
    from configurable_fm.ops.merge.vocab import vocab_axis_of_path

    sources = ({"base": d["base"]} if d["base"] else {}) | {f"model_{i}": m for i, m in enumerate(d["models"])}
    align = d["embed_alignment"]
    if align != "union":
        align = next(n for n, s in sources.items() if s == align)
    tokenizers = {}
    for name, src in sources.items():
        tok = source_tokenizer(src)
        if tok is None:
            raise ConfigError(f"merge config: embed_alignment={d['embed_alignment']!r} needs the tokenizer of every "
                             f"input, but {name} ({src!r}) has none (a registry name, a .gguf file or a directory "
                             "with tokenizer.json)")
        tokenizers[name] = tok
    if log is not None:
        log(f"merging {len(d['models'])} model(s) with {d['method']}, vocabularies aligned by token "
            f"(embed_alignment={d['embed_alignment']!r})")
    base = load_model(d["base"]) if d["base"] else None
    models = {f"model_{i}": load_model(m) for i, m in enumerate(d["models"])}
    per_model = None if d["model_parameters"] is None else dict(zip(models, d["model_parameters"]))
    flat, tokenizer = merge(method, None if base is None else flat_params(base),
                            {n: flat_params(m) for n, m in models.items()}, parameters=d["parameters"],
                            model_parameters=per_model, seed=d["seed"], out_dtype=out_dtype, embed_alignment=align,
                            tokenizers=tokenizers, compute_dtype=d["compute_dtype"])
    template = base if base is not None else next(iter(models.values()))
    cfg = template.cfg
    if "vocab_size" not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConfigError(f"merge config: embed_alignment={d['embed_alignment']!r}: {type(cfg).__name__} has no "
                         "vocab_size field to resize")
    vocab = next(int(v.shape[vocab_axis_of_path(k, v.ndim)]) for k, v in flat.items() if any(
        t in k for t in VOCAB_TENSORS))
    model = with_params(build_model(dataclasses.replace(cfg, vocab_size=vocab)), flat)
    return (model, tokenizer) if with_tokenizer else model


def merge_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Stage kind 'merge': `merge_from_config(cfg)` written to stage_dir/model (the stage's output model)."""
    from configurable_fm.bricks.paths import flat_params

    model = merge_from_config(cfg, log=ctx.log)
    path = ctx.save_model(model)
    n_params = int(sum(int(v.size) for v in flat_params(model).values()))
    if cfg.get("slices"):
        srcs = dict.fromkeys(s["model"] for sl in to_plain(cfg.slices) for s in sl["sources"])
        inputs = [ctx.label(m) for m in srcs]
    else:
        models = check_config(cfg)[0]["models"]  # a `models` entry equal to the base is the base (check_config)
        inputs = ([f"base {ctx.label(cfg.base)}"] if cfg.get("base") else []) + [ctx.label(m) for m in models]
    layers = f" in {len(cfg.slices)} slice(s)" if cfg.get("slices") else ""
    summary = (f"Merged {', '.join(inputs)}{layers} with `{cfg.method}` (parameters {to_plain(cfg.get('parameters'))}, "
               f"per model {to_plain(cfg.get('model_parameters'))}, seed {cfg.get('seed', 0)}).")
    return StageOutput(model=path, metrics={"inputs": len(inputs), "params": n_params}, summary=summary)


register_stage("merge", merge_stage, keys=MERGE_KEYS, check=check_config)
