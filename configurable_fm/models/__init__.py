"""Model families (Flax NNX) and loading them from real checkpoints.

    model = from_hf("path/to/hf_dir")          # LlamaForCausalLM, Mistral, Qwen2, Mixtral, GPT2LMHeadModel, BertModel
    model = from_gguf("model.gguf")            # llama GGUF files, dequantized
    model, tokenizer = load_pretrained("smollm2-135m-instruct")   # packaged real models (see registry.py)
    model = load_model(source)                 # any source: registry name, .gguf, HF dir, orbax checkpoint, workdir
    logits = model(ids_BxT)                    # (B, T, V) for causal LMs; last hidden states for encoders
    ids = generate(model, ids_BxT, max_new_tokens=16)
    to_hf(model, "out_dir")                    # config.json + safetensors that transformers loads

The module tree is the truth (models/structure.py): save, export and generate refuse a model whose tree disagrees
with model.cfg; after tree surgery, `sync_config(model)` rebuilds the config from the tree, and structural changes
go through `rebuild(model, {"intermediate_size": 256}, params=...)`.
"""
from configurable_fm.models.attention import KVCache, RopeScaling
from configurable_fm.models.bert import Bert, BertConfig, mean_pool, sentence_embedding
from configurable_fm.models.generation import Generator, generate, generate_text, stream_text
from configurable_fm.models.gpt2 import GPT2, GPT2Config
from configurable_fm.models.llama import Llama, LlamaConfig
from configurable_fm.models.masked import GrowthRamp, MaskedLinear, MaskedRMSNorm  # registers the mask extensions
from configurable_fm.models.structure import (Extension, InconsistentModel, check_consistent, config_from_tree,
                                              extension_specs, rebuild, register_extension, structure_problems,
                                              sync_config)

# Checkpoint interop imports the model modules, so it is exported lazily (no import cycle).
_LAZY = {"from_hf": "configurable_fm.interop.hf", "to_hf": "configurable_fm.interop.hf",
         "from_gguf": "configurable_fm.interop.gguf", "load_pretrained": "configurable_fm.interop.loader",
         "load_model": "configurable_fm.interop.loader",
         "model_path": "configurable_fm.models.registry"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["from_hf", "to_hf", "from_gguf", "load_pretrained", "load_model", "model_path", "generate", "Generator", "generate_text", "stream_text", "Llama", "LlamaConfig",
           "GPT2", "GPT2Config", "Bert", "BertConfig", "mean_pool", "sentence_embedding", "KVCache", "RopeScaling",
           "InconsistentModel", "check_consistent", "structure_problems", "config_from_tree", "sync_config", "rebuild",
           "Extension", "register_extension", "extension_specs", "GrowthRamp", "MaskedLinear", "MaskedRMSNorm"]
