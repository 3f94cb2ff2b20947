"""Model families (Flax NNX) and loading them from real checkpoints.

    model = from_hf("path/to/hf_dir")          # LlamaForCausalLM, Mistral, Qwen2, Mixtral, GPT2LMHeadModel, BertModel
    logits = model(ids_BxT)                    # (B, T, V) for causal LMs; last hidden states for encoders
    to_hf(model, "out_dir")                    # config.json + safetensors that transformers loads
"""
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.models.attention import KVCache, RopeScaling
from configurable_fm.models.llama import Llama, LlamaConfig

__all__ = ["from_hf", "to_hf", "Llama", "LlamaConfig", "KVCache", "RopeScaling"]
