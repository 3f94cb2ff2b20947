"""Growing from ml-collections configs, and the pipeline stage kind 'grow' (ops/grow: grow_width, grow_depth,
upcycle).

    model = grow_from_config(experiments.grow.width.get_config())      # the script, the stage and notebooks
    python scripts/grow.py --config experiments/grow/width.py --config.input=IN --config.output=OUT \\
        [--config.format=hf|orbax] [--config.width.hidden_size=96 ...]

Config keys (a grow config; experiments/grow/{width,depth,upcycle,to_shape}.py):
    input    : the source model, anything interop.loader.load_model takes (registry name, HF directory, .gguf,
               orbax model checkpoint, training workdir; in a study, a stage reference '@<stage>')
    dtype    : '' keeps the loaded parameters' dtype (float32); else 'float32' | 'bfloat16' | 'float16'
    seed     : PRNG seed of the random parts (width noise, fresh identity blocks, router init, Drop-Upcycling)
    width    : (optional) grow_width: hidden_size, num_heads, num_kv_heads, intermediate_size (0 = unchanged),
               method 'exact' | 'hypercloning', noise (>= 0; relative symmetry-breaking noise, still exact)
    depth    : (optional) grow_depth: method 'identity' | 'llama_pro' | 'stack' | 'dus'; num_layers (0 = unset),
               positions (() = unset) for identity / llama_pro; factor (0 = unset) for stack; drop for dus
    upcycle  : (optional) upcycle: num_experts, num_experts_per_tok, router 'topk_softmax' | 'softmax_topk',
               router_init 'normal' (default: experts diverge in training) | 'zeros', drop_fraction in [0, 1]
    masked   : (optional, alone) MSG-style masked growth (ops/grow/masked.py grow_masked): hidden_size, num_heads,
               num_kv_heads, intermediate_size, num_layers (0 = unchanged), ramp (the masks' initial value, 0 =
               exactly the source's function); the new structure is fresh random weights behind masks that a
               'train' stage with task {'kind': 'mask_ramp', 'start': s, 'steps': n} ramps from 0 to 1
The sections present are applied in the order width -> depth -> upcycle; a section asking for nothing (every
width target 0; identity / llama_pro without num_layers or positions) is skipped, and a config with nothing to
grow is an error. The script's config also
has `output`, `format` ('hf' | 'orbax') and `overwrite` (cli/grow.py); a study stage has `name` and kind 'grow'
instead. Every key and value is checked before the model is loaded (ConfigError naming the key); targets that
depend on the model (a target smaller than the source, hypercloning multiples) are the operators' GrowthError,
also before anything is written.

Stage kind 'grow' (registered when configurable_fm.stages is imported): `grow_from_config` on the resolved stage
config, written as the stage's output model (stage_dir/model). Metrics: params_before, params_after and, when
every step is function-preserving (width; depth identity / llama_pro; upcycle with topk_softmax and no
drop_fraction), max_logit_diff, the largest |logit difference| between source and grown model on a fixed probe
batch (its exactness, in float32).
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from configurable_fm.errors import ConfigError
from configurable_fm.stages.study import StageContext, StageOutput, register_stage
from configurable_fm.stages.checks import Checks, operation_config

WIDTH_KEYS = {"hidden_size": 0, "num_heads": 0, "num_kv_heads": 0, "intermediate_size": 0, "method": "exact",
              "noise": 0.0}
DEPTH_KEYS = {"method": "identity", "num_layers": 0, "positions": (), "factor": 0, "drop": 0}
UPCYCLE_KEYS = {"num_experts": 8, "num_experts_per_tok": 2, "router": "topk_softmax", "router_init": "normal",
                "drop_fraction": 0.0}
MASKED_KEYS = {"hidden_size": 0, "num_heads": 0, "num_kv_heads": 0, "intermediate_size": 0, "num_layers": 0,
               "ramp": 0.0}
SECTIONS = {"width": WIDTH_KEYS, "depth": DEPTH_KEYS, "upcycle": UPCYCLE_KEYS}  # grow_steps' operations, in order
GROW_KEYS = ("input", "dtype", "seed", "width", "depth", "upcycle", "masked")
SCRIPT_KEYS = ("output", "format", "overwrite")
STAGE_KEYS = ("name", "kind")
DTYPES = ("float32", "bfloat16", "float16")
WIDTH_METHODS = ("exact", "hypercloning")
DEPTH_METHODS = ("identity", "llama_pro", "stack", "dus")
ROUTERS = ("topk_softmax", "softmax_topk")
ROUTER_INITS = ("normal", "zeros")
PROBE_SHAPE = (2, 16)  # the fixed probe batch of the exactness metric

CHECK = Checks("grow config")  # one ConfigError per bad key or value (stages/checks.py)


def grow_config(*, input: str = "", width: dict | None = None, depth: dict | None = None,
                upcycle: dict | None = None, masked: dict | None = None, seed: int = 0, dtype: str = "",
                name: str | None = None, output: str | None = None, format: str = "hf",
                overwrite: bool = False) -> ml_collections.ConfigDict:
    """A grow config (module docstring): each given section filled with its defaults. With `name`, a study stage
    of kind 'grow'; with `output`, a script config (output, format, overwrite)."""
    c = operation_config("grow", input=input, name=name, output=output, format=format, overwrite=overwrite)
    c.dtype = dtype
    c.seed = int(seed)
    for section, given in (("width", width), ("depth", depth), ("upcycle", upcycle), ("masked", masked)):
        if given is not None:
            defaults = MASKED_KEYS if section == "masked" else SECTIONS[section]
            unknown = sorted(set(given) - set(defaults))
            if unknown:
                raise ConfigError(f"grow config: {section} has unknown key(s) {unknown}; valid: {sorted(defaults)}")
            c[section] = ml_collections.ConfigDict({**defaults, **given})
    return c


# ------------------------------------------------------------------------------------------ checking



def check_config(cfg, *, allowed=GROW_KEYS + SCRIPT_KEYS + STAGE_KEYS) -> dict[str, Any]:
    """The grow config as plain checked values: {input, dtype, seed, steps: [(op, kwargs)]}. ConfigError naming
    the key for an unknown key, a missing input, a wrong type or value, or no growth section."""
    d = CHECK.plain(cfg, allowed=allowed, shown=GROW_KEYS)
    source = CHECK.source(d)
    dtype = d.get("dtype") or ""
    if dtype:
        CHECK.choice("dtype", dtype, DTYPES)
    seed = CHECK.int("seed", d.get("seed", 0), 0)
    steps = []
    for section, defaults in SECTIONS.items():
        s = CHECK.section(d, section, defaults)
        if s is None:
            continue
        kw = _KWARGS[section](s)
        if kw is not None:  # None: the section asks for nothing (every target unset)
            steps.append((section, kw))
    masked = CHECK.section(d, "masked", MASKED_KEYS)
    if masked is not None:
        if steps:
            raise ConfigError(f"grow config: `masked` grows alone; remove the {[op for op, _ in steps]} section(s) "
                              "(masked growth covers width and depth itself)")
        steps.append(("masked", _masked_kwargs(masked)))
    if not steps:
        raise ConfigError("grow config: nothing to grow; set a target: width.hidden_size / num_heads / num_kv_heads / "
                          "intermediate_size, depth.num_layers / positions (or depth.method stack / dus), or an "
                          "`upcycle` section (experiments/grow/*.py)")
    return dict(input=source, dtype=dtype or None, seed=seed, steps=steps)


def _width_kwargs(s: dict) -> dict:
    kw = {k: (CHECK.int(f"width.{k}", s[k], 0) or None) for k in ("hidden_size", "num_heads", "num_kv_heads",
                                                             "intermediate_size")}
    kw["method"] = CHECK.choice("width.method", s["method"], WIDTH_METHODS)
    kw["noise"] = CHECK.number("width.noise", s["noise"], 0.0)
    if not math.isfinite(kw["noise"]):
        raise CHECK.error(f"`width.noise` must be a finite number >= 0, got {kw['noise']!r}")
    return kw if any(kw[k] for k in WIDTH_KEYS if k not in ("method", "noise")) else None


def _depth_kwargs(s: dict) -> dict:
    method = CHECK.choice("depth.method", s["method"], DEPTH_METHODS)
    num_layers = CHECK.int("depth.num_layers", s["num_layers"], 0)
    positions = s["positions"]
    if positions is None:
        positions = []
    if isinstance(positions, (str, bool)) or not isinstance(positions, (list, tuple)):
        raise ConfigError(f"grow config: `depth.positions` must be a list of insertion points, got {positions!r}")
    positions = [CHECK.int(f"depth.positions[{i}]", p, 0) for i, p in enumerate(positions)]
    factor = CHECK.int("depth.factor", s["factor"], 0)
    drop = CHECK.int("depth.drop", s["drop"], 0)
    if method in ("identity", "llama_pro"):
        for key, unset in (("factor", factor == 0), ("drop", drop == 0)):
            if not unset:
                raise ConfigError(f"grow config: `depth.{key}` applies to method {'stack' if key == 'factor' else 'dus'}"
                                  f", not to depth.method={method!r}; leave it 0")
        if not num_layers and not positions:
            return None
        if num_layers and positions:
            raise ConfigError(f"grow config: depth.method={method!r} needs exactly one of `depth.num_layers` (the "
                              f"target count) and `depth.positions` (insertion points)")
        return dict(method=method, num_layers=num_layers or None, positions=positions or None)
    if num_layers or positions:
        key = "num_layers" if num_layers else "positions"
        raise ConfigError(f"grow config: `depth.{key}` applies to methods identity / llama_pro, not to "
                          f"depth.method={method!r}; leave it unset")
    if method == "stack":
        if drop:
            raise ConfigError("grow config: `depth.drop` applies to method dus, not to depth.method='stack'")
        if factor < 2:
            raise ConfigError(f"grow config: depth.method='stack' needs `depth.factor` >= 2, got {factor}")
        return dict(method=method, factor=factor)
    if factor:
        raise ConfigError("grow config: `depth.factor` applies to method stack, not to depth.method='dus'")
    return dict(method=method, drop=drop)


def _upcycle_kwargs(s: dict) -> dict:
    e = CHECK.int("upcycle.num_experts", s["num_experts"], 2)
    k = CHECK.int("upcycle.num_experts_per_tok", s["num_experts_per_tok"], 1)
    if k > e:
        raise ConfigError(f"grow config: `upcycle.num_experts_per_tok`={k} must be <= upcycle.num_experts={e}")
    return dict(num_experts=e, num_experts_per_tok=k, router=CHECK.choice("upcycle.router", s["router"], ROUTERS),
                router_init=CHECK.choice("upcycle.router_init", s["router_init"], ROUTER_INITS),
                drop_fraction=CHECK.number("upcycle.drop_fraction", s["drop_fraction"], 0.0, 1.0))


def _masked_kwargs(s: dict) -> dict:
    kw = {k: (CHECK.int(f"masked.{k}", s[k], 0) or None) for k in MASKED_KEYS if k != "ramp"}
    if not any(kw.values()):
        raise ConfigError("grow config: the `masked` section asks for nothing; set a width target or num_layers")
    kw["ramp"] = CHECK.number("masked.ramp", s["ramp"], 0.0, 1.0)
    return kw


_KWARGS = {"width": _width_kwargs, "depth": _depth_kwargs, "upcycle": _upcycle_kwargs}


def is_exact(steps) -> bool:
    """Whether every growth step preserves the function (module docstring)."""
    for op, kw in steps:
        if op == "masked" and kw["ramp"] > 0:
            return False
        if op == "depth" and kw["method"] not in ("identity", "llama_pro"):
            return False
        if op == "upcycle" and (kw["router"] != "topk_softmax" or kw["drop_fraction"] > 0):
            return False
    return True


# ------------------------------------------------------------------------------------------ growing
def apply_steps(model, steps, seed: int, *, log=None):
    """`model` grown by the checked steps (check_config), each with its own key folded from `seed`; a masked
    step (alone) with the key of `seed`."""
    from configurable_fm.ops.grow import grow_masked, grow_steps

    if steps and steps[0][0] == "masked":
        if log is not None:
            log(f"grow: masked {dict(steps[0][1])}")
        return grow_masked(model, key=seed, **steps[0][1])
    return grow_steps(model, steps, seed=seed, log=log).model


def cast(model, dtype: str | None):
    """The model with its floating parameters in `dtype` (None: unchanged)."""
    if dtype is None:
        return model
    import jax.numpy as jnp

    from configurable_fm.bricks.paths import flat_params, with_params

    return with_params(model, {k: v.astype(dtype) for k, v in flat_params(model).items()
                               if jnp.issubdtype(v.dtype, jnp.floating)})


def count_params(model) -> int:
    from configurable_fm.bricks.paths import flat_params

    return int(sum(int(v.size) for v in flat_params(model).values()))


def probe_ids(model) -> np.ndarray:
    """The fixed probe batch (PROBE_SHAPE token ids drawn with seed 0 from the model's vocabulary)."""
    cfg = model.cfg
    t = min(PROBE_SHAPE[1], int(getattr(cfg, "max_position_embeddings", PROBE_SHAPE[1]) or PROBE_SHAPE[1]))
    return np.random.RandomState(0).randint(0, int(cfg.vocab_size), (PROBE_SHAPE[0], t)).astype(np.int32)


def max_logit_diff(a, b, ids=None) -> float:
    """max |a(ids) - b(ids)| over the probe batch, both in float32 (each model's forward compiled)."""
    from configurable_fm.models.scoring import logits

    ids = probe_ids(a) if ids is None else ids
    return float(np.max(np.abs(logits(a, ids) - logits(b, ids))))


def grow_from_config(cfg, *, log=None, with_metrics: bool = False, load=None, _allowed=None):
    """The grown nnx model of a grow config (module docstring). Keys and values are checked before the model is
    loaded (ConfigError naming the key). with_metrics: return (model, metrics) with params_before, params_after
    and, for function-preserving growth, max_logit_diff (source vs grown on the probe batch, before any dtype
    cast). load: the loader of `input` (default interop.loader.load_model; the stage passes ctx.load_model)."""
    from configurable_fm.interop.loader import load_model

    d = check_config(cfg) if _allowed is None else check_config(cfg, allowed=_allowed)
    if log is not None:
        log(f"grow: loading {d['input']}")
    source = (load or load_model)(d["input"])
    grown = apply_steps(source, d["steps"], d["seed"], log=log)
    metrics: dict[str, Any] = {}
    if with_metrics:
        metrics = {"params_before": count_params(source), "params_after": count_params(grown)}
        if is_exact(d["steps"]):
            metrics["max_logit_diff"] = max_logit_diff(source, grown)
    grown = cast(grown, d["dtype"])
    return (grown, metrics) if with_metrics else grown


def describe(d: dict) -> str:
    return "; ".join(f"{op} {', '.join(f'{k}={v}' for k, v in kw.items() if v is not None)}" for op, kw in d["steps"])


# ------------------------------------------------------------------------------------------ the stage kind
def grow_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Stage kind 'grow': `grow_from_config(cfg)` written to stage_dir/model (the stage's output model)."""
    d = check_config(cfg, allowed=GROW_KEYS + STAGE_KEYS)
    model, metrics = grow_from_config(cfg, log=ctx.log, with_metrics=True, load=ctx.load_model,
                                      _allowed=GROW_KEYS + STAGE_KEYS)
    path = ctx.save_model(model)
    exact = (f" Function-preserving: max |logit difference| {metrics['max_logit_diff']:.3g} on the "
             f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe batch." if "max_logit_diff" in metrics else
             " Not function-preserving (stack / dus / softmax_topk / drop_fraction).")
    summary = (f"Grew {ctx.label(cfg.input)} ({describe(d)}; seed {d['seed']}): {metrics['params_before']:,} -> "
               f"{metrics['params_after']:,} parameters.{exact}")
    return StageOutput(model=path, metrics=metrics, summary=summary)


register_stage("grow", grow_stage, keys=GROW_KEYS,
               check=lambda cfg: check_config(cfg, allowed=GROW_KEYS + STAGE_KEYS))
