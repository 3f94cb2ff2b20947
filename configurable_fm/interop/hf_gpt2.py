"""HF <-> gpt2 family: GPT2LMHeadModel and GPT2Model checkpoints.

Reading accepts both layouts found in the wild: base-model keys (`wte.weight`, `h.0.attn.c_attn.weight`, as in
OpenAI's gpt2 checkpoints) and `transformer.`-prefixed keys (GPT2LMHeadModel.save_pretrained); the causal-mask
buffers `attn.bias` / `attn.masked_bias` of old checkpoints and a stored copy of a tied head are skipped.
Writing produces base-model keys (plus `lm_head.weight` when untied) under a GPT2LMHeadModel config.json, the
layout of OpenAI's gpt2 checkpoints, which transformers' GPT2LMHeadModel and GPT2Model both load.
HF's Conv1D weights are (in, out) like our kernels, so they are copied without a transpose.
"""
from __future__ import annotations

from configurable_fm.interop.hf import Family, UnsupportedModel, linear, register_family, reject_unknown_config, same
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models.gpt2 import GPT2, GPT2Config

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")

# transformers' GPT2Config attribute_map aliases, as a hand-written config.json may use them.
ALIASES = {"n_embd": "hidden_size", "n_positions": "max_position_embeddings", "n_head": "num_attention_heads",
           "n_layer": "num_hidden_layers"}

HANDLED = {
    "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "tie_word_embeddings", "resid_pdrop", "embd_pdrop", "attn_pdrop", *ALIASES.values(),
    # GPT2DoubleHeadsModel's multiple-choice head; no effect on the language model.
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "summary_last_dropout",
}


def config_from_hf(c: dict) -> GPT2Config:
    reject_unknown_config(c, HANDLED, "gpt2")
    if c.get("add_cross_attention"):  # generically ignored, but it adds cross-attention blocks to GPT-2
        raise UnsupportedModel("add_cross_attention=True (GPT-2 with cross-attention) is not implemented "
                               "by the gpt2 family")
    get = lambda name, default=None: c.get(name, c.get(ALIASES.get(name, name), default))  # noqa: E731
    for name in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if get(name) is None:
            raise CheckpointError(f"gpt2 config.json lacks {name!r}")
    return GPT2Config(
        vocab_size=c["vocab_size"], n_positions=get("n_positions", 1024), n_embd=get("n_embd"),
        n_layer=get("n_layer"), n_head=get("n_head"), n_inner=c.get("n_inner"),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        activation_function=c.get("activation_function", "gelu_new"),
        scale_attn_weights=c.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=c.get("scale_attn_by_inverse_layer_idx", False),
        reorder_and_upcast_attn=c.get("reorder_and_upcast_attn", False),
        tie_word_embeddings=c.get("tie_word_embeddings", True))


def config_to_hf(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": cfg.n_inner, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": cfg.activation_function, "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn, "tie_word_embeddings": cfg.tie_word_embeddings,
        "add_cross_attention": False,
    }


def tensor_map(cfg: GPT2Config) -> list:
    maps = [same("wte.embedding", "wte.weight"), same("wpe.embedding", "wpe.weight"),
            same("ln_f.weight", "ln_f.weight"), same("ln_f.bias", "ln_f.bias")]
    if not cfg.tie_word_embeddings:
        maps.append(linear("lm_head.kernel", "lm_head.weight"))
    for i in range(cfg.n_layer):
        p = f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            maps += [same(f"{p}.{ln}.weight", f"{p}.{ln}.weight"), same(f"{p}.{ln}.bias", f"{p}.{ln}.bias")]
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            maps += [same(f"{p}.{name}.kernel", f"{p}.{name}.weight"), same(f"{p}.{name}.bias", f"{p}.{name}.bias")]
    return maps


def ignored_keys(cfg: GPT2Config) -> list[str]:
    keys = [r"h\.\d+\.attn\.(bias|masked_bias)"]  # causal-mask buffers of older transformers versions
    if cfg.tie_word_embeddings:
        keys.append(r"lm_head\.weight")  # a stored copy of the tied head
    return keys


def build(cfg, *, rngs, param_dtype):
    return GPT2(cfg, rngs=rngs, param_dtype=param_dtype)


GPT2_FAMILY = register_family(Family(
    name="gpt2", architectures=ARCHITECTURES, module_type=GPT2, config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, build=build, tensor_map=tensor_map, ignored_keys=ignored_keys,
    key_prefixes=("transformer.",)))
