"""A MoEfied llama-family model as a Mixtral-style MoE (models/moe.py SparseMoE), which `interop.hf.to_hf` writes as
MixtralForCausalLM.

    mixtral = to_mixtral(moe)                        # all experts active: exact
    to_hf(mixtral, "out")                            # transformers' MixtralForCausalLM loads it
    mixtral = to_mixtral(moe, router_scale=2**-12)   # top-k < routed experts, centroid router: an approximation

Mixtral's layer: logits r = x W_r (D, E), top-k by r, weights w = softmax over the chosen logits,
y = sum_j w_j down_j(act(gate_j x) * up_j x). The MoEfied layer (module.py) has unit weights: y = sum_{chosen} y_e.

All experts active (num_experts_per_tok == the routed experts; shared experts become ordinary experts): the Mixtral
has k = E, a zero router, so every w_j = softmax(0, ..., 0)_j = 1/E, and each expert's down projection scaled by E:
    y = sum_e (1/E) (E D_e)^T h_e = sum_e D_e^T h_e,   the MoEfied (and so the dense) FFN, exact up to rounding
(exactly in float when E is a power of 2).

Fewer experts than all (top_k < R): Mixtral's combine weights sum to 1 over the chosen experts and depend on the
logits, the MoEfied ones are all 1. `to_mixtral` refuses (MoefyError) unless `router_scale` tau > 0 is given and
the model can be approximated: the 'centroid' router (a linear score: its ranking of <x/||x||, c_e> is that of
x . c_e, ||x|| > 0) and no shared experts (Mixtral has no always-on experts). The export then has k = top_k,
W_r = tau C (C = the centroid kernel, D x R) and each down projection scaled by k, so
    y = sum_{chosen} k softmax(tau x . c)_j D_j^T h_j = sum_{chosen} (1 + tau (x . c_j - mean_chosen x . c) +
        O(tau^2)) D_j^T h_j
i.e. the MoEfied output with each chosen expert weighted 1 + O(tau * spread of the chosen logits), the spread at most
2 ||x|| (|x . c_e| <= ||x|| ||c_e|| <= ||x||; ||x|| is about sqrt(D) after an RMSNorm of unit gain). transformers
ranks the softmax probabilities rather than the logits; in float32 those separate two experts only when tau times
their logit gap exceeds about 1e-7: too small a tau makes near-ties, and other choices, likely. On the tiny test
model (D = 32, 8 experts, top 2) the largest logit difference to the MoEfied model is 6e-4, 4e-5, 3e-6 for tau = 2^-8,
2^-12, 2^-16, and at 2^-20 transformers chooses other experts (0.36): 2^-12 to 2^-16 is a reasonable range. (Our
own SparseMoE ranks the logits, so it keeps the MoEfied choices at any tau.)
The oracle and MLP routers (which read the activations, or are nonlinear) cannot be expressed by Mixtral's linear
gate: refused. GPT-2 models and FFNs with biases (SparseMoE has none) are refused too; write those with
orbax_io.save_model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from configurable_fm.analysis.moefication.transform import MoefyError, moefied_layers
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import abstract_model, build_options, extension_specs, fill, variables_of


def _positive(value) -> bool:
    """Whether `value` is a finite real number > 0 (an infinite router scale makes every logit inf or NaN)."""
    try:
        return not isinstance(value, bool) and math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def mixtral_plan(*, num_experts: int, num_shared: int, top_k: int, router: str,
                 router_scale: Optional[float] = None, op: str = "to_mixtral") -> dict:
    """{'num_experts', 'top_k', 'scale' (down projection factor), 'router_scale'} of the Mixtral export of MoEfied
    FFNs with these options; MoefyError saying why when Mixtral cannot express them (module docstring)."""
    routed = num_experts - num_shared
    if top_k == routed:
        return dict(num_experts=num_experts, top_k=num_experts, scale=float(num_experts), router_scale=0.0)
    why = None
    if router != "centroid":
        why = (f"its router={router!r} is not a linear map of the FFN input (the oracle reads the activations, the "
               "mlp router is nonlinear), which is all a Mixtral gate is")
    elif num_shared:
        why = f"its {num_shared} shared expert(s) are always active, which Mixtral's routing cannot express"
    elif not _positive(router_scale):
        why = ("Mixtral weights the chosen experts by a softmax of their logits while MoEfication gives each weight "
               "1; with the centroid router, a router scale > 0 (router_scale=, --config.mixtral_router_scale) "
               f"exports the documented approximation (a finite number; got router_scale={router_scale!r})")
    if why:
        raise MoefyError(f"{op}: with num_experts_per_tok={top_k} of {routed} routed experts the model is not "
                         f"expressible as MixtralForCausalLM: {why}. Export it with all routed experts active, or "
                         "save it with orbax (format=orbax)")
    return dict(num_experts=num_experts, top_k=top_k, scale=float(top_k), router_scale=float(router_scale))


def check_mixtral(model, router_scale: Optional[float] = None, op: str = "to_mixtral") -> dict:
    """`mixtral_plan` of a MoEfied model, after checking that it is a llama-family model MoEfied alike in every
    layer, without biases or other extensions; MoefyError saying why otherwise."""
    if not isinstance(getattr(model, "cfg", None), LlamaConfig):
        raise MoefyError(f"{op}: MixtralForCausalLM is a llama-family architecture; this model is "
                         f"{type(model).__name__} (write it with orbax_io.save_model)")
    layers = moefied_layers(model)
    other = [s["path"] for s in extension_specs(model) if s["kind"] != "moefied_mlp"]
    if other:
        raise MoefyError(f"{op}: the model has other extension modules ({', '.join(other)}) Mixtral cannot express")
    options = {tuple(sorted(m.options.items())) for _, m in layers}
    if len(options) != 1 or len(layers) != model.cfg.num_layers:
        raise MoefyError(f"{op}: every decoder layer must be MoEfied alike to be one Mixtral config")
    m = layers[0][1]
    if m.up_bias is not None or m.down_bias is not None:
        raise MoefyError(f"{op}: the FFNs have biases (mlp_bias=True), which Mixtral experts do not have")
    return mixtral_plan(num_experts=m.num_experts, num_shared=m.num_shared, top_k=m.top_k, router=m.router_kind,
                        router_scale=router_scale, op=op)


def to_mixtral(model, *, router_scale: Optional[float] = None):
    """A llama MoE model (config num_experts=E, num_experts_per_tok, router 'topk_softmax', architecture
    MixtralForCausalLM) computing what the MoEfied `model` computes: exactly with all experts active, approximately
    with the centroid router and router_scale (module docstring). The input is not modified."""
    plan = check_mixtral(model, router_scale)
    layers = moefied_layers(model)
    m = layers[0][1]
    cfg = dataclasses.replace(model.cfg, num_experts=plan["num_experts"], num_experts_per_tok=plan["top_k"],
                              intermediate_size=int(m.up_proj.get_value().shape[-1]), router="topk_softmax",
                              architecture="MixtralForCausalLM")
    abstract = abstract_model(cfg, [], **build_options(model))
    wanted = variables_of(abstract)
    values = {k: v.get_value() for k, v in variables_of(model).items()
              if not any(k.startswith(p + ".") for p, _ in layers)}
    for p, mod in layers:
        dtype = wanted[f"{p}.experts.up_proj"].get_value().dtype
        values[f"{p}.experts.gate_proj"] = mod.gate_proj.get_value()
        values[f"{p}.experts.up_proj"] = mod.up_proj.get_value()
        values[f"{p}.experts.down_proj"] = jnp.asarray(np.asarray(mod.down_proj.get_value(), np.float32)
                                                       * plan["scale"], dtype)
        d = int(mod.up_proj.get_value().shape[1])
        router = (np.zeros((d, plan["num_experts"]), np.float32) if plan["router_scale"] == 0.0 else
                  plan["router_scale"] * np.asarray(mod.router.kernel.get_value(), np.float32))
        values[f"{p}.router.kernel"] = jnp.asarray(router, dtype)
    return fill(abstract, values)
