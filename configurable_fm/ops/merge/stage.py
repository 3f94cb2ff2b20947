"""Merging from ml-collections configs, and the pipeline stage kind 'merge'.

    cfg = merge_config("task_arithmetic", ["runs/a/model", "runs/b/model"], base="runs/pre/model",
                       parameters={"weight": 1.0}, model_parameters=[{"weight": 0.5}, {"weight": 0.5}])
    model = merge_from_config(cfg)                       # tree.merge over load_model(source) of every input
    python scripts/merge.py --config experiments/merge/task_arithmetic_tiny.py --output merged/ --format hf

Config keys (a merge config; as a study stage it also has `name` and kind 'merge'):
    method           : a registered merge method (registry.METHODS), e.g. 'task_arithmetic', 'ties', 'linear'
    base             : a source `load_model` takes (registry name, HF dir, .gguf, orbax model checkpoint, or a
                       stage reference '@<stage>' in a study), or '' for none
    models           : the other inputs' sources, in mergekit's `models:` order minus the base (N >= 1)
    parameters       : global settings {name: setting} (params.py: scalars, gradients, {filter, value} lists)
    model_parameters : one {name: setting} dict per model (same length as `models`), or empty
    seed             : PRNG seed of randomised methods (keys are order independent)
    out_dtype        : '' (the base's dtype, else the first model's) or a dtype name ('float32', 'bfloat16')
    embed_alignment  : '' (a vocabulary mismatch is an error) or 'base' (inputs cut/padded to the base's)
The merged model is `tree.merge(method, load_model(base), [load_model(m) for m in models], ...)`.

Stage kind 'merge' (registered on import; a study lists 'configurable_fm.ops.merge.stage' in `stage_modules`):
runs `merge_from_config` on the resolved stage config and writes the result as the stage's output model
(stage_dir/model, an orbax model checkpoint). Metrics: number of inputs and of merged parameters.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections

from configurable_fm.pipeline import StageContext, StageOutput, register_stage, to_plain

MERGE_KEYS = ("method", "base", "models", "parameters", "model_parameters", "seed", "out_dtype", "embed_alignment")
STAGE_KEYS = ("name", "kind")


def merge_config(method: str, models: Sequence[str], base: str = "", *, parameters: Mapping | None = None,
                 model_parameters: Sequence[Mapping] | None = None, seed: int = 0, out_dtype: str = "",
                 embed_alignment: str = "", name: str | None = None) -> ml_collections.ConfigDict:
    """A merge config (module docstring); with `name`, a study stage of kind 'merge'."""
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
    return c


def _plain_config(cfg) -> dict[str, Any]:
    """The merge config as plain Python values, every key checked (errors name the key)."""
    d = to_plain(cfg, "merge config")
    if not isinstance(d, dict):
        raise TypeError(f"merge config must be a ConfigDict or mapping, got {type(cfg).__name__}")
    unknown = sorted(set(d) - set(MERGE_KEYS) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"merge config: unknown key(s) {unknown}; valid keys: {sorted(MERGE_KEYS)}")
    for key in ("method", "models"):
        if key not in d:
            raise ValueError(f"merge config: missing required key {key!r}")
    if not isinstance(d["method"], str) or not d["method"]:
        raise ValueError(f"merge config: `method` must be a method name, got {d['method']!r}")
    models = d["models"]
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"merge config: `models` must be a non-empty list of model sources, got {models!r}")
    for i, m in enumerate(models):
        if not isinstance(m, str) or not m:
            raise ValueError(f"merge config: models[{i}] must be a model source (non-empty string), got {m!r}")
    base = d.get("base") or ""
    if not isinstance(base, str):
        raise ValueError(f"merge config: `base` must be a model source or '', got {base!r}")
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"merge config: `parameters` must be a dict, got {params!r}")
    per_model = list(d.get("model_parameters") or ())
    if per_model and len(per_model) != len(models):
        raise ValueError(f"merge config: `model_parameters` has {len(per_model)} entries but `models` has "
                         f"{len(models)} (one dict per model, or none)")
    for i, p in enumerate(per_model):
        if p is not None and not isinstance(p, dict):
            raise ValueError(f"merge config: model_parameters[{i}] (for {models[i]!r}) must be a dict, got {p!r}")
    align = d.get("embed_alignment") or None
    if align not in (None, "base"):
        raise ValueError(f"merge config: `embed_alignment` must be '' or 'base', got {align!r}")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"merge config: `seed` must be an integer, got {seed!r}")
    return dict(method=d["method"], base=base, models=list(models), parameters=params,
                model_parameters=[p or {} for p in per_model] or None, seed=seed,
                out_dtype=d.get("out_dtype") or None, embed_alignment=align)


def merge_from_config(cfg, *, log=None):
    """The merged nnx model of a merge config (module docstring): `tree.merge` over `load_model` of the sources.
    Raises ValueError naming the key for a bad config (unknown key, wrong type, length mismatch, unknown method
    or dtype), before loading any model."""
    import jax.numpy as jnp

    from configurable_fm.models.factory import load_model
    from configurable_fm.ops.merge.registry import get_method
    from configurable_fm.ops.merge.tree import merge

    d = _plain_config(cfg)
    method = get_method(d["method"])
    out_dtype = None
    if d["out_dtype"] is not None:
        try:
            out_dtype = jnp.dtype(d["out_dtype"])
        except TypeError:
            raise ValueError(f"merge config: unknown `out_dtype` {d['out_dtype']!r}") from None
    if log is not None:
        log(f"merging {len(d['models'])} model(s) with {d['method']}" + (f" onto base {d['base']}" if d["base"]
                                                                           else " (no base)"))
    base = load_model(d["base"]) if d["base"] else None
    models = [load_model(m) for m in d["models"]]
    return merge(method, base, models, parameters=d["parameters"], model_parameters=d["model_parameters"],
                 seed=d["seed"], out_dtype=out_dtype, embed_alignment=d["embed_alignment"])


def merge_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Stage kind 'merge': `merge_from_config(cfg)` written to stage_dir/model (the stage's output model)."""
    from configurable_fm.bricks.paths import flat_params

    model = merge_from_config(cfg, log=ctx.log)
    path = ctx.save_model(model)
    n_params = int(sum(int(v.size) for v in flat_params(model).values()))
    inputs = ([f"base {ctx.label(cfg.base)}"] if cfg.get("base") else []) + [ctx.label(m) for m in cfg.models]
    summary = (f"Merged {', '.join(inputs)} with `{cfg.method}` (parameters {to_plain(cfg.get('parameters'))}, "
               f"per model {to_plain(cfg.get('model_parameters'))}, seed {cfg.get('seed', 0)}).")
    return StageOutput(model=path, metrics={"inputs": len(inputs), "params": n_params}, summary=summary)


register_stage("merge", merge_stage)
