"""HF <-> llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM."""
from __future__ import annotations

from configurable_fm.interop.hf import (Family, UnsupportedModel, linear, register_family, reject_unknown_config, same,
                                       stacked_linear)
from configurable_fm.models.attention import RopeScaling
from configurable_fm.models.llama import Llama, LlamaConfig

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "MixtralForCausalLM": "mixtral"}

HANDLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "max_position_embeddings", "hidden_act",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "num_local_experts",
    "num_experts_per_tok", "pretraining_tp", "output_router_logits", "router_aux_loss_coef",
    "router_jitter_noise", "partial_rotary_factor",
}


# transformers' (5.x) defaults for keys a config.json may leave out, per architecture: what its model then runs with
HF_DEFAULTS = {
    "LlamaForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=2048, sliding_window=None),
    "MistralForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=131072,
                               sliding_window=4096),
    "Qwen2ForCausalLM": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768, sliding_window=None),
    "MixtralForCausalLM": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072,
                               sliding_window=None),
}


def config_from_hf(c: dict) -> LlamaConfig:
    arch = next(a for a in c.get("architectures", []) if a in MODEL_TYPES)
    reject_unknown_config(c, HANDLED, "llama")
    default = HF_DEFAULTS[arch]
    max_positions = c.get("max_position_embeddings", default["max_position_embeddings"])
    # As transformers 5.x reads RoPE: rope_scaling, when given, takes the place of rope_parameters; a rope_theta
    # inside that dict wins over the top-level one; llama3 defaults original_max_position_embeddings to
    # max_position_embeddings
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", default["rope_theta"]))
    if rope.get("rope_type", rope.get("type")) == "llama3":
        rope.setdefault("original_max_position_embeddings", max_positions)
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel(f"partial_rotary_factor={c['partial_rotary_factor']} is not implemented")
    window = c.get("sliding_window", default["sliding_window"])
    if arch == "LlamaForCausalLM":  # transformers' Llama reads no window (the key may be there, unused)
        window = None
    elif arch == "Qwen2ForCausalLM":
        window = _qwen2_window(c, window)
    # layer_types changes nothing for Llama, Mistral and Mixtral, as in transformers 5.x: they read no layer_types
    # (Mistral warns, then applies sliding_window to every layer); Qwen2 reads them (_qwen2_window)
    experts = c.get("num_local_experts", 8) if arch == "MixtralForCausalLM" else 0  # transformers' default: 8
    # Only Llama reads attention_bias / mlp_bias; Qwen2 always biases q, k, v, Mistral and Mixtral never do
    llama = arch == "LlamaForCausalLM"
    attention_bias = c.get("attention_bias", False) if llama else arch == "Qwen2ForCausalLM"
    return LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=c.get("head_dim"),
        rms_norm_eps=c.get("rms_norm_eps", default["rms_norm_eps"]), rope_theta=float(theta),
        rope_scaling=RopeScaling.from_hf(scaling),
        attention_bias=attention_bias, o_proj_bias=attention_bias and llama,
        mlp_bias=c.get("mlp_bias", False) if llama else False,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        max_position_embeddings=max_positions,
        hidden_act=c.get("hidden_act", "silu"),
        sliding_window=window, num_experts=experts, num_experts_per_tok=c.get("num_experts_per_tok", 2),
        architecture=arch)


def _qwen2_window(c: dict, window: int | None) -> int | None:
    """The sliding window of a Qwen2 config as transformers 5.x applies it: only with use_sliding_window, and
    only to the layers whose layer_types entry is "sliding_attention" (by default those from max_window_layers
    on, 28 when the key is left out). None when no layer is windowed, the window when every layer is;
    UnsupportedModel when only some are (one window per model here)."""
    if not c.get("use_sliding_window", False) or window is None:
        return None
    n = c["num_hidden_layers"]
    types = c.get("layer_types") or ["sliding_attention" if i >= c.get("max_window_layers", 28) else "full_attention"
                                     for i in range(n)]
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return None
    if len(windowed) == n:
        return window
    raise UnsupportedModel(f"Qwen2 use_sliding_window=True windows layers {windowed} of {n} (layer_types / "
                           f"max_window_layers): per-layer windows are not implemented")


def _check_router(cfg: LlamaConfig) -> None:
    if cfg.num_experts and cfg.router == "noisy_topk":
        raise UnsupportedModel("MixtralForCausalLM has no noisy top-k gating (router='noisy_topk', with noise "
                               "weights layers.*.mlp.noise); for inference it equals topk_softmax: export "
                               "models.structure.rebuild(model, {'router': 'topk_softmax'}), which drops them")


def config_to_hf(cfg: LlamaConfig) -> dict:
    c = {
        "architectures": [cfg.architecture], "model_type": MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_per_head, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling.to_hf() if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
    }
    if cfg.architecture == "LlamaForCausalLM":
        if cfg.attention_bias != cfg.o_proj_bias:
            raise UnsupportedModel("LlamaForCausalLM biases q, k, v and o together; this model has "
                                   f"attention_bias={cfg.attention_bias}, o_proj_bias={cfg.o_proj_bias}")
        c.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.attention_bias != (cfg.architecture == "Qwen2ForCausalLM") or cfg.o_proj_bias or cfg.mlp_bias:
        raise UnsupportedModel(f"{cfg.architecture} cannot express attention_bias={cfg.attention_bias}, "
                               f"mlp_bias={cfg.mlp_bias}; write it as LlamaForCausalLM instead")
    if cfg.sliding_window is not None and cfg.architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        raise UnsupportedModel(f"{cfg.architecture} as transformers runs it has no sliding window; this model has "
                               f"sliding_window={cfg.sliding_window}: write it as MistralForCausalLM instead")
    if cfg.architecture == "MistralForCausalLM":
        c["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "Qwen2ForCausalLM":
        c.update(use_sliding_window=False, sliding_window=None)
    if cfg.architecture == "MixtralForCausalLM":
        c.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 sliding_window=cfg.sliding_window)
        _check_router(cfg)
        if cfg.router != "topk_softmax":
            raise UnsupportedModel("MixtralForCausalLM routes top-k then softmax; this model uses "
                                   f"router={cfg.router!r}")
        if cfg.router_capacity_factor is not None:
            raise UnsupportedModel("MixtralForCausalLM has no expert capacity (tokens are never dropped); this model "
                                   f"has router_capacity_factor={cfg.router_capacity_factor}")
    elif cfg.num_experts:
        raise UnsupportedModel(f"{cfg.architecture} has no experts; write MoE models as MixtralForCausalLM")
    return c


def tensor_map(cfg: LlamaConfig) -> list:
    _check_router(cfg)  # before the missing noise tensors are reported
    maps = [same("embed_tokens.embedding", "model.embed_tokens.weight"), same("norm.weight", "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        maps.append(linear("lm_head.kernel", "lm_head.weight"))
    for i in range(cfg.num_layers):
        p, h = f"layers.{i}", f"model.layers.{i}"
        maps += [same(f"{p}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
                 same(f"{p}.post_attention_layernorm.weight", f"{h}.post_attention_layernorm.weight")]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            maps.append(linear(f"{p}.self_attn.{name}.kernel", f"{h}.self_attn.{name}.weight"))
        if cfg.attention_bias:
            maps += [same(f"{p}.self_attn.{n}.bias", f"{h}.self_attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj")]
        if cfg.o_proj_bias:
            maps.append(same(f"{p}.self_attn.o_proj.bias", f"{h}.self_attn.o_proj.bias"))
        if cfg.num_experts:
            e = f"{h}.block_sparse_moe"
            maps.append(linear(f"{p}.mlp.router.kernel", f"{e}.gate.weight"))
            for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                maps.append(stacked_linear(f"{p}.mlp.experts.{ours}",
                                           [f"{e}.experts.{j}.{theirs}.weight" for j in range(cfg.num_experts)]))
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                maps.append(linear(f"{p}.mlp.{name}.kernel", f"{h}.mlp.{name}.weight"))
                if cfg.mlp_bias:
                    maps.append(same(f"{p}.mlp.{name}.bias", f"{h}.mlp.{name}.bias"))
    return maps


def ignored_keys(cfg: LlamaConfig) -> list[str]:
    keys = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
    if cfg.tie_word_embeddings:
        keys.append(r"lm_head\.weight")  # some tied checkpoints store the head anyway
    return keys


def build(cfg, *, rngs, param_dtype):
    return Llama(cfg, rngs=rngs, param_dtype=param_dtype)


LLAMA = register_family(Family(
    name="llama", architectures=tuple(MODEL_TYPES), module_type=Llama, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=build, tensor_map=tensor_map, ignored_keys=ignored_keys))
