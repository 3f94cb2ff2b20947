"""MoEfication (Zhang et al., Findings ACL 2022): every dense FFN of a model regrouped into experts, routed per token.

    moe = moefy(model, num_experts=16, num_experts_per_tok=4, split="kmeans", router="centroid", key=0)
    moe = moefy(model, num_experts=16, num_experts_per_tok=4, split="cmoe", num_shared=2, router="mlp",
                calibration=batches, key=0)
    dense = demoefy(moe)                      # the dense model back (exact: the neurons are only permuted)
    splits_of(moe)["layers.3.mlp"].groups     # (E, m) dense neuron indices of each expert

`moefy` returns a new model (the input is not modified) in which the FFN at each `layers.<i>.mlp` (llama family:
Llama, Mistral, Qwen2, SmolLM2; SwiGLU) or `h.<i>.mlp` (GPT-2) is a MoefiedMLP (module.py) of the same neurons:
    FFN(x) = sum_i h_i(x) d_i  ->  y = sum_{e shared or in top_k(router(x))} sum_{i in S_e} h_i(x) d_i
Its config is the dense one; the MoEfied modules are extensions of kind 'moefied_mlp' (models/structure.py), so the
module tree and the config agree (check_consistent) and orbax checkpoints round-trip. With num_experts_per_tok equal
to the number of routed experts every neuron is used and the model computes the dense function (up to the order of
float sums), whatever the split and router.

Arguments:
    num_experts E      the F neurons of every FFN are split into E experts of m = F / E (F % E must be 0)
    num_experts_per_tok k   routed experts chosen per token, 1..E - num_shared
    split              'kmeans' | 'coactivation' | 'cmoe' | 'random' (splits.py)
    router             'oracle' | 'centroid' | 'mlp' (module.py, routers.py)
    num_shared         shared (always active) experts: split 'cmoe' only, 1..E-1 (default 1); 0 for the others
    calibration        batches of token ids (calibration.py: dicts or (B, T) arrays, a list or a function returning
                       an iterable); needed by 'coactivation', 'cmoe' and the 'mlp' router, unused otherwise
    active_fraction    the per-token top fraction of |h| that marks a neuron active (co-activation statistics)
    router_training    RouterTraining (routers.py) for the 'mlp' router
    key                a PRNG key or an int seed (required: every split and the MLP router draw from it); the
                       draws of each FFN come from fold_in(key, crc32(path + '/' + purpose)), independent of order
Every statistic is computed on the dense input model (one pass for the co-activation counts when the split needs
them, one for the router data when the router is 'mlp'; the routers are trained layer by layer on the dense FFN
inputs, as MoEfication does). Bad arguments raise MoefyError (a ConfigError) naming the argument, before any
computation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.moefication.calibration import batch_source, coactivation_counts, router_data
from configurable_fm.analysis.moefication.clustering import EXACT_LIMIT
from configurable_fm.analysis.moefication.errors import MoefyError
from configurable_fm.analysis.moefication.module import KIND, ROUTERS, MoefiedMLP, dense_layout
from configurable_fm.analysis.moefication.routers import RouterTraining, centroid_kernel, train_mlp_router
from configurable_fm.analysis.moefication.splits import (NEEDS_DATA, SPLITS, Split, cmoe_split, coactivation_split,
                                                         kmeans_split, random_split)
from configurable_fm.checks import is_int
from configurable_fm.models.gpt2 import GPT2Config
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import (abstract_model, build_options, check_consistent, extension_specs, fill,
                                              variables_of)
from configurable_fm.prng import as_key, numpy_generator, path_key


def ffn_layers(model, op: str = "moefy") -> list[tuple[str, Any]]:
    """[(path, dense FFN module)] of a llama-family or GPT-2 model whose tree agrees with its config and that has no
    extension modules; MoefyError naming the problem otherwise."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, LlamaConfig):
        if cfg.num_experts:
            raise MoefyError(f"{op}: the model is already a mixture of {cfg.num_experts} experts; MoEfication takes a "
                             "dense model")
        prefix, blocks = "layers", list(model.layers)
    elif isinstance(cfg, GPT2Config):
        prefix, blocks = "h", list(model.h)
    else:
        raise MoefyError(f"{op}: needs a llama-family (SwiGLU) or GPT-2 model; got {type(model).__name__} with config "
                         f"{type(cfg).__name__}")
    check_consistent(model, op)
    specs = extension_specs(model)
    if specs:
        raise MoefyError(f"{op}: the model has extension modules ({', '.join(s['path'] for s in specs)}); MoEfy a "
                         "plain dense model (merge or remove them first)")
    return [(f"{prefix}.{i}.mlp", block.mlp) for i, block in enumerate(blocks)]


def check_key(key, op: str = "moefy"):
    """A typed PRNG key from a key, raw uint32[2] key data or an int seed (prng.as_key); MoefyError when None or
    anything else."""
    return as_key(key, MoefyError, op, "needs a PRNG key (the splits and the MLP router draw from it): pass "
                  "key=jax.random.key(seed) or an int seed")


def generator(key, path: str, purpose: str) -> np.random.Generator:
    """A numpy Generator for one FFN and purpose, from prng.path_key(key, path, purpose)."""
    return numpy_generator(path_key(key, path, purpose))


def check_options(neurons: Optional[int], *, num_experts, num_experts_per_tok, split, router, num_shared,
                  active_fraction, has_calibration: bool, op: str = "moefy",
                  data_hint: str = "pass calibration=batches of token ids") -> dict:
    """The checked options {num_experts, top_k, split, router, num_shared, active_fraction}; MoefyError naming the
    first bad one (`neurons`: the FFN width F, None to check everything else before the model is loaded;
    has_calibration: whether calibration data was given; data_hint: how to give it, for the message)."""
    if split not in SPLITS:
        raise MoefyError(f"{op}: split={split!r} is unknown; choose one of {list(SPLITS)}")
    if router not in ROUTERS:
        raise MoefyError(f"{op}: router={router!r} is unknown; choose one of {list(ROUTERS)}")
    if not is_int(num_experts) or num_experts < 2:
        raise MoefyError(f"{op}: num_experts must be an int >= 2, got {num_experts!r}")
    if neurons is not None and neurons % num_experts:
        raise MoefyError(f"{op}: the FFN has {neurons} neurons, which num_experts={num_experts} does not divide into "
                         "equal experts")
    if num_shared is None:
        num_shared = 1 if split == "cmoe" else 0
    if not is_int(num_shared):
        raise MoefyError(f"{op}: num_shared must be an int, got {num_shared!r}")
    if split == "cmoe" and not 1 <= num_shared < num_experts:
        raise MoefyError(f"{op}: split='cmoe' needs num_shared in 1..{num_experts - 1}, got {num_shared}")
    if split != "cmoe" and num_shared:
        raise MoefyError(f"{op}: num_shared={num_shared}: shared experts belong to split='cmoe' only")
    routed = num_experts - num_shared
    if not is_int(num_experts_per_tok) or not 1 <= num_experts_per_tok <= routed:
        raise MoefyError(f"{op}: num_experts_per_tok must be an int in 1..{routed} (the routed experts), got "
                         f"{num_experts_per_tok!r}")
    if not (isinstance(active_fraction, (int, float, np.floating)) and 0.0 < float(active_fraction) <= 1.0):
        raise MoefyError(f"{op}: active_fraction must lie in (0, 1], got {active_fraction!r}")
    if not has_calibration:
        if split in NEEDS_DATA:
            raise MoefyError(f"{op}: split={split!r} needs calibration data (its statistics come from the "
                             f"activations): {data_hint}")
        if router == "mlp":
            raise MoefyError(f"{op}: router='mlp' is trained on calibration data: {data_hint}")
    return dict(num_experts=int(num_experts), top_k=int(num_experts_per_tok), split=split, router=router,
                num_shared=int(num_shared), active_fraction=float(active_fraction))


def _dense_weights(ffn) -> dict[str, Optional[np.ndarray]]:
    """{'gate', 'up' (D, F), 'down' (F, D), 'gate_bias', 'up_bias' (F,), 'down_bias' (D,)} (None where absent)."""
    lay = dense_layout(ffn)
    names = lay["names"]
    out = {}
    for key, name in (("gate", names.get("gate")), ("up", names["up"]), ("down", names["down"])):
        lin = getattr(ffn, name) if name else None
        out[key] = None if lin is None else np.asarray(lin.kernel.get_value())
        out[f"{key}_bias"] = None if lin is None or lin.bias is None else np.asarray(lin.bias.get_value())
    return out


def input_rows(ffn) -> np.ndarray:
    """(F, D): each neuron's input row, the gate column for SwiGLU and the c_fc column for GPT-2 (splits.py)."""
    w = _dense_weights(ffn)
    return (w["gate"] if w["gate"] is not None else w["up"]).T


def expert_values(ffn, split: Split) -> dict[str, np.ndarray]:
    """The MoefiedMLP variables {leaf name: array} holding `ffn`'s neurons regrouped by `split` (router aside)."""
    w = _dense_weights(ffn)
    g = split.groups
    out = {"up_proj": np.moveaxis(w["up"][:, g], 1, 0), "down_proj": w["down"][g], "neurons": g.astype(np.int32)}
    if w["gate"] is not None:
        out["gate_proj"] = np.moveaxis(w["gate"][:, g], 1, 0)
    for name in ("gate", "up"):
        if w[f"{name}_bias"] is not None:
            out[f"{name}_bias"] = w[f"{name}_bias"][g]
    if w["down_bias"] is not None:
        out["down_bias"] = w["down_bias"]
    return out


def make_split(kind: str, ffn, path: str, num_experts: int, num_shared: int, key, counts=None, tokens: int = 0,
               exact_limit: int = EXACT_LIMIT) -> Split:
    """The Split of one FFN (splits.py), its draws from `generator(key, path, 'split')`."""
    f = dense_layout(ffn)["neurons"]
    rng = generator(key, path, "split")
    if kind == "random":
        split = random_split(f, num_experts, rng)
    elif kind == "kmeans":
        split = kmeans_split(input_rows(ffn), num_experts, rng, exact_limit=exact_limit)
    elif kind == "coactivation":
        split = coactivation_split(counts, num_experts, rng, exact_limit=exact_limit)
    else:
        split = cmoe_split(counts, tokens, num_experts, num_shared, rng, exact_limit=exact_limit)
    return split.check(f)


def moefy(model, *, num_experts: int, num_experts_per_tok: int, split: str = "kmeans", router: str = "centroid",
          calibration=None, key=None, num_shared: Optional[int] = None, active_fraction: float = 0.1,
          router_training: Optional[RouterTraining] = None, max_batches: Optional[int] = None,
          exact_limit: int = EXACT_LIMIT, progress: bool = False, log: Optional[Callable[[str], None]] = None):
    """The MoEfied copy of `model` (module docstring); the input is not modified."""
    ffns = ffn_layers(model)
    width = {dense_layout(m)["neurons"] for _, m in ffns}
    if len(width) != 1:
        raise MoefyError(f"moefy: the FFNs differ in width ({sorted(width)}); one config cannot describe them")
    opts = check_options(width.pop(), num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, split=split,
                         router=router, num_shared=num_shared, active_fraction=active_fraction,
                         has_calibration=calibration is not None)
    try:
        training = (router_training or RouterTraining()).check("moefy: router_training")
    except ValueError as e:
        raise MoefyError(str(e)) from None
    key = check_key(key)
    say = log or (lambda _: None)
    source = batch_source(calibration, "moefy") if calibration is not None else None

    counts, tokens = {}, 0
    if opts["split"] in NEEDS_DATA:
        counts, tokens = coactivation_counts(model, source, [p for p, _ in ffns],
                                             active_fraction=opts["active_fraction"], max_batches=max_batches,
                                             progress=progress, log=log)
        say(f"moefy: co-activation counts over {tokens} tokens")
    splits = {p: make_split(opts["split"], m, p, opts["num_experts"], opts["num_shared"], key, counts.get(p), tokens,
                            exact_limit) for p, m in ffns}
    s = opts["num_shared"]
    kernels = {p: centroid_kernel(input_rows(m), splits[p].groups[s:]) for p, m in ffns}
    routers: dict[str, dict[str, np.ndarray]] = {}
    if opts["router"] == "centroid":
        routers = {p: {"kernel": kernels[p]} for p, _ in ffns}
    elif opts["router"] == "mlp":
        data = router_data(model, source, {p: splits[p].groups[s:] for p, _ in ffns}, max_tokens=training.max_tokens,
                           max_batches=max_batches, progress=progress, log=log)
        for p, _ in ffns:
            x, mass = data[p]
            routers[p], losses = train_mlp_router(x, mass, kernels[p], training, generator(key, p, "router"))
            say(f"moefy: {p} router trained on {x.shape[0]} tokens, loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    options = {"num_experts": opts["num_experts"], "num_shared": s, "top_k": opts["top_k"],
               "router": opts["router"], "router_hidden": int(training.hidden) if opts["router"] == "mlp" else 0,
               "split": opts["split"]}
    specs = [{"path": p, "kind": KIND, "options": options} for p, _ in ffns]
    abstract = abstract_model(model.cfg, specs, **build_options(model))
    values = {k: v.get_value() for k, v in variables_of(model).items()
              if not any(k.startswith(p + ".") for p, _ in ffns)}
    wanted = variables_of(abstract)
    for p, m in ffns:
        new = expert_values(m, splits[p])
        new.update({f"router.{k}": v for k, v in routers.get(p, {}).items()})
        for leaf, value in new.items():
            values[f"{p}.{leaf}"] = jnp.asarray(value, wanted[f"{p}.{leaf}"].get_value().dtype)
    return fill(abstract, values)


def moefied_layers(model) -> list[tuple[str, MoefiedMLP]]:
    """[(path, MoefiedMLP)] of a MoEfied model, in layer order; MoefyError when it has none."""
    found = [(".".join(str(k) for k in path), node) for path, node in nnx.iter_graph(model)
             if isinstance(node, MoefiedMLP)]
    if not found:
        raise MoefyError(f"the model ({type(model).__name__}) has no MoEfied FFN (module kind {KIND!r}); MoEfy it "
                         "first")
    return found


def splits_of(model) -> dict[str, Split]:
    """{FFN path: Split} read from a MoEfied model's neuron indices."""
    return {p: Split(np.asarray(m.neurons.get_value(), np.int64), m.num_shared) for p, m in moefied_layers(model)}


def demoefy(model):
    """The dense model a MoEfied `model` regroups: every MoefiedMLP replaced by its dense FFN (MoefiedMLP.dense,
    exact), the other variables kept; the input is not modified."""
    layers = moefied_layers(model)
    other = [s for s in extension_specs(model) if s["kind"] != KIND]
    inside = [s["path"] for s in other if any(s["path"].startswith(p + ".") for p, _ in layers)]
    if inside:
        raise MoefyError(f"demoefy: the MoEfied FFNs hold extension modules ({', '.join(inside[:4])}"
                         f"{' ...' if len(inside) > 4 else ''}) that a dense FFN has no place for; merge them into "
                         "the experts first (bricks.adapters.merge)")
    abstract = abstract_model(model.cfg, other, **build_options(model))
    values = {k: v.get_value() for k, v in variables_of(model).items()
              if not any(k.startswith(p + ".") for p, _ in layers)}
    for p, m in layers:
        values.update({f"{p}.{k}": v.get_value() for k, v in variables_of(m.dense()).items()})
    return fill(abstract, values)
