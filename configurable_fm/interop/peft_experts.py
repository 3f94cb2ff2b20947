"""PEFT's LoRA on transformers' Mixtral experts (`target_parameters`) <-> our expert LoRA (bricks/adapters/experts.py).

transformers (5.x) keeps a Mixtral layer's experts as two stacked parameters of `model.layers.<i>.mlp.experts`:
gate_up_proj (E, 2F, D) (y = x @ gate_up[e]^T, its first F outputs the gate, the next F the up projection) and
down_proj (E, D, F). PEFT's ParamWrapper gives each targeted parameter lora_A (r E, D_in) and lora_B (D_out, r E):

    ΔW_e = s · B_e A_e,   A_e = lora_A.reshape(E, r, D_in)[e],   B_e = lora_B.reshape(D_out, r, E)[:, :, e]

(A expert-major by rows, B expert-minor by columns: peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight), and
it nests the wrappers of one module in the parameters' registration order, so with both targeted gate_up_proj's
tensors are `...mlp.experts.base_layer.lora_A.weight` and down_proj's `...mlp.experts.lora_A.weight`.

Ours (kernels x @ W): gate_proj / up_proj (E, D, F), down_proj (E, F, D), each LoRA with lora_a (E, D_in, r),
lora_b (E, r, D_out) and its scale s:
    read   gate_up: a_gate_e = a_up_e = A_e^T, b_gate_e = B_e[:F]^T, b_up_e = B_e[F:]^T (A is shared, so two LoRAs
           of rank r); down: a_down_e = A_e^T, b_down_e = B_e^T; s from the file's r / lora_alpha / use_rslora
    write  gate_up: A_e = [a_gate_e | a_up_e]^T, B_e = blockdiag(s_gate b_gate_e, s_up b_up_e)^T, rank
           r_gate + r_up (exact: stacking the two ranks); down: A_e = a_down_e^T, B_e = s_down b_down_e^T. Every
           parameter is padded with zeros to the adapter's one rank R, its scale folded into B, and the file's
           scale is 1 (lora_alpha = R, or sqrt(R) with use_rslora); a weight of a layer without an adapter is
           written as zeros, since PEFT wraps every parameter that target_parameters matches.
Only llama-family MoE models (MixtralForCausalLM, as `to_hf` writes them) map this way.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from configurable_fm.interop.hf import UnsupportedModel
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models.moe import EXPERT_LORA_KIND, EXPERT_LORA_SUFFIX
from configurable_fm.models.structure import extension_specs, node_at, registered_extensions, variables_of

# transformers' MixtralExperts parameters in registration order, and our stacked weights each holds.
HF_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
HF_MODULE = "model.layers.{}.mlp.experts"
_MODULE = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts((?:\.base_layer)*)$")


def expert_adapters(model) -> dict[str, dict[str, Any]]:
    """{our stacked weight path: {"a": (E, D_in, r), "b": (E, r, D_out) float32, "scale": s, "rank": r}} of the
    model's expert LoRAs (read from its extension specs and variables; merged ones included, as to_peft writes
    merged Linear adapters: the factors, for the unmerged base)."""
    variables = variables_of(model)
    out = {}
    for spec in extension_specs(model):
        if spec["kind"] != EXPERT_LORA_KIND:
            continue
        o, path = spec["options"], spec["path"]
        scale = float(o["alpha"]) / (math.sqrt(o["rank"]) if o.get("rslora") else o["rank"])
        out[path[: -len(EXPERT_LORA_SUFFIX)]] = {
            "a": np.asarray(variables[path + ".lora_a"].get_value(), np.float32),
            "b": np.asarray(variables[path + ".lora_b"].get_value(), np.float32), "scale": scale,
            "rank": int(o["rank"])}
    return out


def check_mixtral(model, experts: Mapping[str, Any], action: str) -> None:
    """UnsupportedModel unless `model` is a llama-family MoE whose adapted weights are layers.<i>.mlp.experts.*."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "architecture", None) != "MixtralForCausalLM" or not getattr(cfg, "num_experts", 0):
        raise UnsupportedModel(f"{action}: LoRA on stacked expert weights maps onto PEFT's target_parameters of "
                               "transformers' Mixtral experts only; this model is "
                               f"{getattr(cfg, 'architecture', type(model).__name__)} (keep the adapter as a brick "
                               "set: bricks.adapters.save_adapter)")
    bad = [p for p in experts if not re.fullmatch(r"layers\.\d+\.mlp\.experts\.(gate|up|down)_proj", p)]
    if bad:
        raise UnsupportedModel(f"{action}: expert LoRAs at {bad[:4]} are not on a Mixtral layer's experts")


def write_expert_tensors(model, experts: Mapping[str, Mapping[str, Any]], key_prefix: str
                         ) -> tuple[dict[str, np.ndarray], list[str], int]:
    """(PEFT tensors {key: array}, target_parameters, the adapter's rank R) for `experts` (expert_adapters(model);
    module docstring: scales folded into B, the file's scale 1)."""
    targeted = [hp for hp, ours in HF_PARAMS.items() if any(p.rsplit(".", 1)[1] in ours for p in experts)]
    num_layers, e = model.cfg.num_layers, model.cfg.num_experts
    # (layer, HF parameter) -> ([A (E, r, D_in) per adapted weight], [(half j, s B (E, D_out part, r))])
    blocks: dict[tuple[int, str], tuple[list, list]] = {}
    for (layer, hp) in ((i, hp) for i in range(num_layers) for hp in targeted):
        a_parts, b_parts = [], []
        for j, name in enumerate(HF_PARAMS[hp]):
            lora = experts.get(f"layers.{layer}.mlp.experts.{name}")
            if lora is None:
                continue
            a_parts.append(np.swapaxes(lora["a"], 1, 2))  # (E, r, D_in)
            b = np.swapaxes(lora["b"], 1, 2) * lora["scale"]  # (E, D_out_part, r)
            b_parts.append((j, b))
        blocks[(layer, hp)] = (a_parts, b_parts)
    rank = max([sum(a.shape[1] for a in parts[0]) for parts in blocks.values()] + [1])
    d, f = model.cfg.hidden_size, model.cfg.intermediate_size  # the experts: gate / up (E, D, F), down (E, F, D)
    tensors = {}
    for (layer, hp), (a_parts, b_parts) in blocks.items():
        d_in, d_out = (d, 2 * f) if hp == "gate_up_proj" else (f, d)
        a = np.zeros((e, rank, d_in), np.float32)
        b = np.zeros((e, d_out, rank), np.float32)
        col = 0
        for a_part, (j, b_part) in zip(a_parts, b_parts):
            r = a_part.shape[1]
            a[:, col:col + r] = a_part
            rows = slice(j * f, (j + 1) * f) if hp == "gate_up_proj" else slice(0, d)
            b[:, rows, col:col + r] = b_part
            col += r
        depth = len(targeted) - 1 - targeted.index(hp)  # the first parameter wrapped sits innermost
        name = f"{key_prefix}{HF_MODULE.format(layer)}{'.base_layer' * depth}"
        tensors[f"{name}.lora_A.weight"] = a.reshape(e * rank, d_in)
        tensors[f"{name}.lora_B.weight"] = np.transpose(b, (1, 2, 0)).reshape(d_out, rank * e)
    return tensors, [f"mlp.experts.{hp}" for hp in targeted], rank


def expert_key(name: str) -> tuple[int, int] | None:
    """(layer, nesting depth) when the PEFT module name (key prefix removed) is a Mixtral layer's experts module."""
    m = _MODULE.match(name)
    return None if m is None else (int(m.group(1)), m.group(2).count(".base_layer"))


def read_expert_adapters(model, config: Mapping[str, Any], keys: Mapping[tuple[int, int], dict[str, str]],
                         options: Mapping[str, Any], file, tensor: Callable[[str, tuple, str], np.ndarray]
                         ) -> list[dict]:
    """[{"path": our stacked weight path, "kind": 'expert_lora', "options": `options` {rank, alpha, rslora} (the
    file's), "values": {lora_a, lora_b}}] from the PEFT tensors `keys` {(layer, depth): {role: key}} (module
    docstring), each read by tensor(key, shape, what) (float32; CheckpointError for a shape or dtype that does not
    fit); CheckpointError naming the key."""
    rank = int(options["rank"])
    check_mixtral(model, {}, "from_peft")
    targets = config.get("target_parameters") or []
    targeted = [hp for hp in HF_PARAMS if any(t == f"mlp.experts.{hp}" or t.endswith(f".mlp.experts.{hp}")
                                              or t == hp for t in targets)]
    if not targeted:
        raise CheckpointError(f"{file}: expert tensors ({_first(keys)}) but target_parameters={targets!r} names no "
                              "Mixtral expert parameter (mlp.experts.gate_up_proj / down_proj)")
    e, f = model.cfg.num_experts, model.cfg.intermediate_size
    d = model.cfg.hidden_size
    out = []
    for (layer, depth), roles in sorted(keys.items()):
        if depth >= len(targeted) or layer >= model.cfg.num_layers:
            raise CheckpointError(f"{_first({0: roles})}: no Mixtral expert parameter of layer {layer} is wrapped at "
                                  f"nesting depth {depth} (target_parameters {targeted})")
        hp = targeted[len(targeted) - 1 - depth]
        d_in, d_out = (d, 2 * f) if hp == "gate_up_proj" else (f, d)
        missing = [r for r in ("lora_A", "lora_B") if r not in roles]
        if missing:
            raise CheckpointError(f"{file}: layer {layer}'s {hp} has no {missing[0]} tensor")
        what = f"layer {layer}'s {hp} (r={rank}, {e} experts)"
        a = tensor(roles["lora_A"], (rank * e, d_in), what).reshape(e, rank, d_in)
        b = tensor(roles["lora_B"], (d_out, rank * e), what).reshape(d_out, rank, e)
        b_e = np.transpose(b, (2, 0, 1))  # (E, D_out, r)
        lora_a = np.swapaxes(a, 1, 2)  # (E, D_in, r)
        parts = [(HF_PARAMS[hp][j], b_e[:, j * f:(j + 1) * f]) for j in range(2)] if hp == "gate_up_proj" else \
            [("down_proj", b_e)]
        for name, b_part in parts:
            out.append({"path": f"layers.{layer}.mlp.experts.{name}", "kind": EXPERT_LORA_KIND,
                        "options": dict(options), "values": {"lora_a": lora_a, "lora_b": np.swapaxes(b_part, 1, 2)}})
    return out


def _first(keys) -> str:
    return next(iter(next(iter(keys.values())).values()), "?")


def attach_expert_adapters(model: nnx.Module, adapters: list[dict]) -> nnx.Module:
    """A clone of `model` with an unmerged ExpertLoRA (the registered 'expert_lora' builder) on each stacked weight
    of [{"path", "options": {rank, alpha, rslora}, "values": {lora_a, lora_b}}] (shapes checked by the caller), as
    the child `<weight>_lora` of the weight's owner."""
    build = registered_extensions().get(EXPERT_LORA_KIND)
    if build is None:
        raise UnsupportedModel("the adapter kind 'expert_lora' is not registered; import "
                               "configurable_fm.bricks.adapters first")
    model = nnx.clone(model)
    variables = variables_of(model)
    for spec in adapters:
        owner_path, _, name = spec["path"].rpartition(".")
        var = variables[spec["path"]]
        axes = var.get_metadata().get("out_sharding")
        module = build(None, {**spec["options"], "shape": list(var.get_value().shape), "merged": False,
                              "axes": None if axes is None else list(axes)}, rngs=nnx.Rngs(0))
        for leaf, value in spec["values"].items():
            setattr(module, leaf, getattr(module, leaf).replace(np.asarray(value, np.float32)))
        setattr(node_at(model, owner_path), name + EXPERT_LORA_SUFFIX, module)
    return model
