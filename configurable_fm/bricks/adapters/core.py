"""Attaching, merging, unmerging and detaching adapters: pure functions from models to new models.

    m = attach(base, "lora", "layers.*.self_attn.[qv]_proj", rank=8, alpha=16, seed=0)
    m = attach(m, "ia3", ["layers.*.self_attn.k_proj", "layers.*.mlp.down_proj"])   # down_proj: feedforward
    adapters(m)            # {'layers.0.self_attn.q_proj': {'kind': 'lora', 'rank': 8, ...}, ...}
    adapter_state(m)       # {'layers.0.self_attn.q_proj.lora_a': (in, r) array, ...}
    plain = merge(m)       # plain Linear modules, W merged (exactly W + s A B for LoRA)
    kept = merge(m, keep=True); back = unmerge(kept)      # PEFT's merge / unmerge (the adapter is kept)
    base = detach(m)       # the base model back: the same arrays
    delta = as_delta(m)    # bricks.deltas.Delta: LowRank for LoRA, Dense for DoRA / IA3;
                           # deltas.apply(detach(m), delta) == merge(m)
    moe = attach_experts(moe_model, "layers.*.mlp.experts.*_proj", rank=8)   # LoRA per expert on stacked
                           # weights (PEFT's target_parameters; experts.py); merge / unmerge / detach /
                           # as_delta / adapters / adapter_state serve them too

Inputs are never modified. A target is a module path glob (or a list of them) of `models.layers.Linear` modules; a
glob that matches nothing, or matches something that is not a plain Linear (another module, an adapted one), is an
AdapterError naming it. Random initial values use keys derived from (seed, module path), never from call order.
"""
from __future__ import annotations

import difflib
import math
import re
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.adapters.experts import expert_loras, expert_weight_names, replace_expert_loras
from configurable_fm.bricks.adapters.modules import AdaptedLinear, AdapterError, AdapterParam, ADAPTER_TYPES
from configurable_fm.bricks.deltas import Delta, shifted
from configurable_fm.bricks.paths import flat_state
from configurable_fm.bricks.select import Selection, SelectionError, glob_to_regex, module_index, select
from configurable_fm.checks import is_finite_real, is_int
from configurable_fm.interop.peft import attach_built
from configurable_fm.interop.peft_experts import attach_expert_adapters
from configurable_fm.models.factory import family_name
from configurable_fm.models.layers import Linear
from configurable_fm.models.moe import EXPERT_LORA_SUFFIX
from configurable_fm.models.virtual_tokens import VirtualTokenParam, VirtualTokens

KINDS = tuple(ADAPTER_TYPES)
LORA_INITS = ("kaiming", "gaussian", "random")
IA3_INITS = ("ones", "random")
# The family's FFN down projections: IA3's default feedforward modules (PEFT's feedforward_modules defaults).
# IA3's default feedforward modules (scaled on the input side), as PEFT's TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_
# MODULES_MAPPING selects them: its bert entry 'output.dense' is a suffix that also matches attention.output.dense.
FEEDFORWARD = {"llama": "layers.*.mlp.down_proj", "gpt2": "h.*.mlp.c_proj",
               "bert": ("encoder.layer.*.output.dense", "encoder.layer.*.attention.output.dense")}
DEFAULT_RANK, DEFAULT_ALPHA = 8, 8.0  # PEFT's LoraConfig defaults (r=8, lora_alpha=8)


def path_key(seed: int, path: str, purpose: str) -> jax.Array:
    """The PRNG key for one tensor: fold_in(key(seed), crc32(path + '/' + purpose)); independent of call order."""
    return jax.random.fold_in(jax.random.key(seed), np.uint32(zlib.crc32(f"{path}/{purpose}".encode())))


def target_globs(targets, what: str) -> list[str]:
    """`targets` (one module path glob or a list of them) as a non-empty list; AdapterError naming `what`."""
    globs = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, Sequence) else None
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise AdapterError(f"{what}: give a module path glob or a non-empty list of them, got {targets!r}")
    return globs


def _shapes(paths) -> str:
    shown = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", p) for p in paths))
    return ", ".join(shown[:16]) + (f" (+{len(shown) - 16} more)" if len(shown) > 16 else "")


def match_targets(index: dict, globs: list[str], what: str) -> list[str]:
    """Module paths matching any glob, in model order; AdapterError naming the globs that match nothing."""
    paths = [p for p in index if p]
    regexes = [(g, re.compile(glob_to_regex(g))) for g in globs]
    unmatched = [g for g, r in regexes if not any(r.fullmatch(p) for p in paths)]
    if unmatched:
        linears = [p for p in paths if isinstance(index[p][1], Linear)]
        close = sorted({c for g in unmatched for c in difflib.get_close_matches(g, linears, n=3)}, key=paths.index)
        raise AdapterError(f"{what}: {unmatched} match no module; " + (f"did you mean {close}? " if close else "")
                           + f"the Linear modules are {_shapes(linears)}")
    return [p for p in paths if any(r.fullmatch(p) for _, r in regexes)]


def _default_feedforward(model) -> str | tuple[str, ...] | None:
    try:
        return FEEDFORWARD.get(family_name(model.cfg))
    except (TypeError, AttributeError):
        return None


def attach(model, kind: str, targets: str | Sequence[str], *, rank: int | None = None, alpha: float | None = None,
           rslora: bool | None = None, init: str | None = None, feedforward: str | Sequence[str] | None = None,
           seed: int = 0) -> nnx.Module:
    """A new model with an adapter of `kind` ('lora' | 'dora' | 'ia3') on every Linear module matching `targets`.

    LoRA / DoRA (modules.py): rank r (default 8) and alpha (default 8: PEFT's defaults), scale alpha / r or
    alpha / sqrt(r) with `rslora`. init: 'kaiming' (PEFT's default: A ~ U(±1/sqrt(in)), torch's kaiming_uniform with
    a=sqrt(5); B = 0), 'gaussian' (A ~ N(0, 1/r²), B = 0), or 'random' (PEFT's init_lora_weights=False: A as
    kaiming and B ~ U(±1/sqrt(r)), so the adapter changes the function). DoRA's magnitude starts at
    ||W + s A B|| per output feature (= ||W|| when B = 0), so a fresh DoRA adapter is the identity up to rounding.
    IA3: one scale per output, or per input for the `feedforward` modules (globs among the targets; default: the
    family's FEEDFORWARD modules that are targets: its FFN down projections, and for bert also the attention
    output projections, as PEFT's default); init 'ones' (the identity) or 'random' (N(0, 1),
    PEFT's init_ia3_weights=False). rank / alpha / rslora are LoRA options and an error with IA3.
    Random values come from keys derived from (seed, module path). AdapterError names every target that matches
    nothing or is not a plain Linear (e.g. one that already has an adapter).
    """
    if kind == "bottleneck":
        raise AdapterError("attach: bottleneck adapters have their own options and placement: use "
                           "bricks.adapters.attach_bottleneck(model, targets, ...)")
    if kind not in ADAPTER_TYPES:
        raise AdapterError(f"attach: unknown adapter kind {kind!r}; the kinds are {list(KINDS)}")
    globs = target_globs(targets, "attach(targets=...)")
    index = module_index(model)
    paths = match_targets(index, globs, "attach")
    problems = []
    for p in paths:
        node = index[p][1]
        if isinstance(node, AdaptedLinear):
            problems.append(f"{p} already has a {node.kind} adapter (detach or merge it first)")
        elif type(node) is not Linear:
            owner_path, _, name = p.rpartition(".")
            stacked = name in expert_weight_names(index.get(owner_path, (None, None))[1])
            problems.append(f"{p} is a {type(node).__name__}, not a Linear"
                            + (" (a stacked expert weight: bricks.adapters.attach_experts)" if stacked else ""))
    if problems:
        raise AdapterError(f"attach: {len(problems)} target(s) cannot take an adapter: " + "; ".join(problems[:8])
                           + (" ..." if len(problems) > 8 else "") + " (narrow the globs, e.g. 'layers.*.self_attn."
                           "q_proj')")
    if kind == "ia3":
        given = [n for n, v in (("rank", rank), ("alpha", alpha), ("rslora", rslora)) if v is not None]
        if given:
            raise AdapterError(f"attach: {given} are LoRA/DoRA options; an ia3 adapter has none")
        init = "ones" if init is None else init
        if init not in IA3_INITS:
            raise AdapterError(f"attach: init={init!r} is not an ia3 initialisation {list(IA3_INITS)}")
        ff_globs = feedforward if feedforward is not None else _default_feedforward(model)
        ff = set()
        if ff_globs:
            regexes = [re.compile(glob_to_regex(g)) for g in target_globs(ff_globs, "attach(feedforward=...)")]
            ff = {p for p in paths if any(r.fullmatch(p) for r in regexes)}
            if feedforward is not None and not ff:
                raise AdapterError(f"attach: feedforward={feedforward!r} matches none of the targets {paths[:6]}")
        specs = [{"path": p, "kind": kind, "options": {"feedforward": p in ff, "merged": False},
                  "values": _ia3_values(index[p][1], p in ff, init, seed, p)} for p in paths]
    else:
        if feedforward is not None:
            raise AdapterError("attach: feedforward is an ia3 option")
        rank = DEFAULT_RANK if rank is None else rank
        alpha = DEFAULT_ALPHA if alpha is None else alpha
        if not is_int(rank) or rank < 1:
            raise AdapterError(f"attach: rank must be an int >= 1, got {rank!r}")
        if not is_finite_real(alpha):
            raise AdapterError(f"attach: alpha must be a finite number, got {alpha!r}")
        init = "kaiming" if init is None else init
        if init not in LORA_INITS:
            raise AdapterError(f"attach: init={init!r} is not a {kind} initialisation {list(LORA_INITS)}")
        options = {"rank": int(rank), "alpha": float(alpha), "rslora": bool(rslora), "merged": False}
        specs = [{"path": p, "kind": kind, "options": options,
                  "values": _lora_values(index[p][1], kind, options, init, seed, p)} for p in paths]
    return attach_built(model, specs)


def _lora_values(lin: Linear, kind: str, options: dict, init: str, seed: int, path: str) -> dict:
    w = lin.kernel.get_value()
    d_in, d_out, r = int(w.shape[0]), int(w.shape[1]), options["rank"]
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    a, b = lora_factors((d_in, r), (r, d_out), init, seed, path, b_fan_in=r)
    values = {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
    if kind == "dora":
        module = ADAPTER_TYPES[kind].from_options(lin, options)
        module.lora_a, module.lora_b = module.lora_a.replace(values["lora_a"]), module.lora_b.replace(values["lora_b"])
        values["lora_magnitude"] = module.weight_norm().astype(dtype)
    return values


def lora_factors(a_shape, b_shape, init: str, seed: int, path: str, *, b_fan_in: int):
    """(A, B) float32 of a fresh LoRA, A (..., D_in, r), B (..., r, D_out), keys from (seed, path):
    A ~ U(±1/sqrt(D_in)) (torch's kaiming_uniform_(a=sqrt(5)) on lora_A.weight, fan_in D_in) or N(0, 1/r²)
    ('gaussian'); B = 0, or ~ U(±1/sqrt(b_fan_in)) ('random': nn.Linear's default init of lora_B.weight)."""
    r, d_in = int(a_shape[-1]), int(a_shape[-2])
    if init == "gaussian":
        a = jax.random.normal(path_key(seed, path, "lora_a"), tuple(a_shape), jnp.float32) / r
    else:
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(path_key(seed, path, "lora_a"), tuple(a_shape), jnp.float32, -bound, bound)
    if init != "random":
        return a, jnp.zeros(tuple(b_shape), jnp.float32)
    bound = 1.0 / math.sqrt(b_fan_in)
    return a, jax.random.uniform(path_key(seed, path, "lora_b"), tuple(b_shape), jnp.float32, -bound, bound)


def _ia3_values(lin: Linear, feedforward: bool, init: str, seed: int, path: str) -> dict:
    w = lin.kernel.get_value()
    n = int(w.shape[0] if feedforward else w.shape[1])
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    if init == "random":
        return {"ia3_scale": jax.random.normal(path_key(seed, path, "ia3_scale"), (n,), jnp.float32).astype(dtype)}
    return {"ia3_scale": jnp.ones((n,), dtype)}


# ------------------------------------------------------------------------------------------ expert weights
def attach_experts(model, targets: str | Sequence[str], *, rank: int | None = None, alpha: float | None = None,
                   rslora: bool | None = None, init: str | None = None, seed: int = 0) -> nnx.Module:
    """A new model with a LoRA on every stacked expert weight matching `targets` (parameter path globs, PEFT's
    `target_parameters`: `layers.*.mlp.experts.*_proj` of a MoE model, `layers.*.mlp.*_proj` of a MoEfied one):
    one rank-r change per expert, W_e + s A_e B_e (experts.py). rank / alpha / rslora / init / seed as `attach`'s
    LoRA ('kaiming': A_e ~ U(±1/sqrt(D_in)), B = 0; 'gaussian': A_e ~ N(0, 1/r²); 'random': B ~ U(±1/sqrt(r E)) as
    PEFT's nn.Linear(r E, D_out) default), keys from (seed, parameter path). AdapterError naming every glob that
    matches no stacked expert weight and every match that is not one or already has a LoRA."""
    globs = target_globs(targets, "attach_experts(targets=...)")
    index = module_index(model)
    candidates = [f"{p}.{n}" if p else n for p, (_, node) in index.items() for n in expert_weight_names(node)]
    regexes = [(g, re.compile(glob_to_regex(g))) for g in globs]
    unmatched = [g for g, r in regexes if not any(r.fullmatch(c) for c in candidates)]
    if unmatched:
        raise AdapterError(f"attach_experts: {unmatched} match no stacked expert weight; the model's are "
                           + (_shapes(candidates) if candidates else "none (no MoE or MoEfied FFN)"))
    paths = [c for c in candidates if any(r.fullmatch(c) for _, r in regexes)]
    taken = [p for p in paths if p in expert_loras(model)]
    if taken:
        raise AdapterError(f"attach_experts: {taken[:8]} already have a LoRA (detach or merge it first)")
    rank = DEFAULT_RANK if rank is None else rank
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    init = "kaiming" if init is None else init
    if not is_int(rank) or rank < 1:
        raise AdapterError(f"attach_experts: rank must be an int >= 1, got {rank!r}")
    if not is_finite_real(alpha):
        raise AdapterError(f"attach_experts: alpha must be a finite number, got {alpha!r}")
    if init not in LORA_INITS:
        raise AdapterError(f"attach_experts: init={init!r} is not a LoRA initialisation {list(LORA_INITS)}")
    options = {"rank": int(rank), "alpha": float(alpha), "rslora": bool(rslora)}
    specs = []
    for path in paths:
        shape = expert_weight_shape(index, path)
        if len(shape) != 3:
            raise AdapterError(f"attach_experts: {path} is {shape}, not a stacked (E, D_in, D_out) weight")
        specs.append({"path": path, "options": options,
                      "values": _expert_lora_values(shape, int(rank), init, seed, path)})
    return attach_expert_adapters(model, specs)


def expert_weight_shape(index: dict, path: str) -> tuple[int, ...]:
    """The shape of the stacked expert weight at `path` (module_index of the model); () when there is none."""
    owner_path, _, name = path.rpartition(".")
    owner = index.get(owner_path, (None, None))[1]
    if owner is None or name not in expert_weight_names(owner):
        return ()
    return tuple(int(n) for n in getattr(owner, name).get_value().shape)


def _expert_lora_values(shape, r: int, init: str, seed: int, path: str) -> dict:
    e, d_in, d_out = shape  # PEFT: lora_B = nn.Linear(r E, D_out), so its default bound is 1 / sqrt(r E)
    a, b = lora_factors((e, d_in, r), (e, r, d_out), init, seed, path, b_fan_in=r * e)
    return {"lora_a": a, "lora_b": b}


def _merge_experts(model, *, keep: bool) -> nnx.Module:
    def change(owner, name, adapter):
        if not adapter.merged:
            var = getattr(owner, name)
            setattr(owner, name, var.replace(shifted(var[...], adapter.low_rank())))
        if keep:
            setattr(owner, name + EXPERT_LORA_SUFFIX, adapter.with_merged(True))
        else:
            delattr(owner, name + EXPERT_LORA_SUFFIX)
    return replace_expert_loras(model, change)


def _unmerge_experts(model, *, drop: bool) -> nnx.Module:
    def change(owner, name, adapter):
        if adapter.merged:
            var = getattr(owner, name)
            setattr(owner, name, var.replace(shifted(var[...], adapter.low_rank(), -1.0)))
        if drop:
            delattr(owner, name + EXPERT_LORA_SUFFIX)
        elif adapter.merged:
            setattr(owner, name + EXPERT_LORA_SUFFIX, adapter.with_merged(False))
    return replace_expert_loras(model, change)


# ------------------------------------------------------------------------------------------ reading
def adapted_modules(model) -> dict[str, AdaptedLinear]:
    """{module path: adapted module} of every adapter in `model`, in model order (views: do not modify)."""
    return {p: node for p, (_, node) in module_index(model).items() if isinstance(node, AdaptedLinear)}


def adapters(model) -> dict[str, dict[str, Any]]:
    """{module path: {'kind': 'lora' | 'dora' | 'ia3' | 'bottleneck', **options}} of every adapter in `model`; {}
    for none. Options: rank, alpha, rslora, merged (LoRA/DoRA); feedforward, merged (IA3); size, non_linearity,
    scaling, merged (bottleneck, bottleneck.py). A LoRA on a stacked expert weight is listed under the weight's
    path ('layers.0.mlp.experts.gate_proj': kind 'expert_lora', rank, alpha, rslora, merged)."""
    out = {p: {"kind": m.kind, **m.options()} for p, m in adapted_modules(model).items()}
    for p, a in expert_loras(model).items():
        out[p] = {"kind": a.kind, **{k: v for k, v in a.options().items() if k not in ("shape", "axes")}}
    return out


def adapter_state(model) -> dict[str, jax.Array]:
    """The adapters' own parameters as flat {path: array} (`...q_proj.lora_a`, `.lora_b`, `.lora_magnitude`,
    `.ia3_scale`; a VirtualTokens model's `prompt` / `prefix`, its base's adapters under `base.`), in model order;
    {} for a model without adapters."""
    return {k: v.get_value() for k, v in flat_state(model, (AdapterParam, VirtualTokenParam)).items()}


def check_mergeable(modules: dict, what: str) -> None:
    """AdapterError naming the adapters among `modules` ({path: adapted module}) whose change to the base is not a
    weight change (`mergeable = False`: bottleneck adapters, which are nonlinear), when `what` needs one."""
    bad = [f"{p} ({m.kind})" for p, m in modules.items() if not getattr(m, "mergeable", True)]
    if bad:
        raise AdapterError(f"{what}: the adapter(s) at {bad[:8]}{' ...' if len(bad) > 8 else ''} are nonlinear "
                           "(y + s·(act(y D + c) U + e)) and cannot be merged into the base weights or written as "
                           "a weight delta; detach them (bricks.adapters.detach) or keep them as bricks")


def _selection(model, what: str, merged: bool | None = None) -> Selection:
    try:  # every adapted Linear kind, including those (bottleneck) outside ADAPTER_TYPES
        sel = select(model).at_instances_of(AdaptedLinear)
        if merged is not None:
            sel = sel.where(lambda _, m: isinstance(m, AdaptedLinear) and m.merged == merged)
    except SelectionError:
        state = "" if merged is None else " merged" if merged else " unmerged"
        raise AdapterError(f"{what}: the model has no{state} adapters (attach them with bricks.adapters.attach "
                           "or from_peft)") from None
    return sel


# ------------------------------------------------------------------------------------------ merging
def _merged_plain(m: AdaptedLinear) -> Linear:
    if m.merged:
        return m.plain()
    values = m.merged_values()
    return m.plain(values["kernel"], values.get("bias"))


def merge(model, *, keep: bool = False) -> nnx.Module:
    """A new model with every adapter merged into its module's weights (modules.py gives the formulas):
    keep=False: plain Linear modules (what `to_hf` exports; the adapter is gone); keep=True: the adapted modules
    with merged weights, computing the plain Linear, so that `unmerge` restores them (PEFT's merge / unmerge).
    Already merged adapters are kept as they are (keep=True) or become plain Linears. AdapterError without
    adapters, or naming the nonlinear (bottleneck) adapters, which cannot be merged."""
    if expert_loras(model):  # LoRA on stacked expert weights (experts.py), with or without adapted Linears
        model = _merge_experts(model, keep=keep)
        if not adapted_modules(model):
            return model
    sel = _selection(model, "merge")
    check_mergeable(sel.get(), "merge")
    return sel.apply(lambda m: m.merged_module() if keep else _merged_plain(m))


def unmerge(model) -> nnx.Module:
    """A new model with every merged adapter (merge(keep=True)) un-merged as PEFT does: W = W' − ΔW (LoRA),
    W' ⊙ n / m − ΔW (DoRA, with the norm n kept at merge time), W' / l (IA3): the base weights up to float
    rounding. AdapterError when no adapter is merged, or an IA3 scale is 0 (the merge cannot be undone there)."""
    if any(a.merged for a in expert_loras(model).values()):
        model = _unmerge_experts(model, drop=False)
        if not any(m.merged for m in adapted_modules(model).values()):
            return model
    sel = _selection(model, "unmerge", merged=True)
    zero = [p for p, m in sel.get().items()
            if isinstance(m, ADAPTER_TYPES["ia3"]) and bool(jnp.any(m.ia3_scale[...] == 0))]
    if zero:
        raise AdapterError(f"unmerge: the IA3 scales of {zero[:8]} have zeros; merging multiplied those weights by 0 "
                           "and cannot be undone")
    return sel.apply(lambda m: m.unmerged_module())


def detach(model) -> nnx.Module:
    """The base model: every adapted module replaced by a plain Linear holding its (unmerged) kernel and bias, the
    same arrays (a merged adapter is un-merged first: the base up to rounding); virtual tokens (prompt / prefix
    tuning) removed. AdapterError without adapters."""
    if isinstance(model, VirtualTokens):
        return detach(model.base) if adapted_modules(model.base) or expert_loras(model.base) else model.base
    if expert_loras(model):
        model = _unmerge_experts(model, drop=True)
        if not adapted_modules(model):
            return model
    sel = _selection(model, "detach")

    def base(m: AdaptedLinear) -> Linear:
        if not m.merged:
            return m.plain()
        values = m.unmerged_values()
        return m.plain(values["kernel"], values.get("bias"))
    return sel.apply(base)


def as_delta(model, *, source: str = "") -> Delta:
    """The change the adapters make to the base weights as a bricks.deltas.Delta (kind 'adapter', metadata
    {'adapters': {module path: kind}}): LoRA LowRank(A, B, s) at `<module>.kernel` (the scale folded in, not
    materialised; an expert LoRA's stacked LowRank at the weight's own path, experts.py); DoRA and IA3 Dense
    float32 changes (their change is not low rank), IA3's output-side bias change at `<module>.bias`.
    deltas.apply(detach(model), as_delta(model)) equals merge(model) (bit for bit for LoRA; within float32
    rounding for DoRA / IA3, whose merge is not an addition). AdapterError without adapters,
    or naming the nonlinear (bottleneck) adapters, which have no weight change."""
    modules, experts = adapted_modules(model), expert_loras(model)
    if not modules and not experts:
        raise AdapterError("as_delta: the model has no adapters")
    check_mergeable(modules, "as_delta")
    terms = {}
    for path, m in modules.items():
        m = m.unmerged_module() if m.merged else m
        for leaf, change in m.weight_change().items():
            terms[f"{path}.{leaf}"] = change
    for path, adapter in experts.items():  # the stacked weight's change, LowRank with the expert axis leading
        terms[path] = adapter.low_rank()
    kinds = {**{p: m.kind for p, m in modules.items()}, **{p: a.kind for p, a in experts.items()}}
    return Delta(terms, kind="adapter", source=source, metadata={"adapters": kinds})
