"""Model configs as plain data, building models from them, and loading a model from any source.

    spec = {"family": "llama", "vocab_size": 49152, "hidden_size": 64, ...}     # e.g. an ml-collections config
    cfg = config_from_dict(spec); model = build_model(cfg, seed=0)
    config_to_dict(model.cfg) == spec-with-defaults                            # JSON-serialisable
    model = load_model("smollm2-135m-instruct" | "x.gguf" | "hf_dir" | "orbax_dir")
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from configurable_fm.errors import SourceNotFound
from configurable_fm.models.attention import RopeScaling
from configurable_fm.models.bert import Bert, BertConfig
from configurable_fm.models.gpt2 import GPT2, GPT2Config
from configurable_fm.models.llama import Llama, LlamaConfig

FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, Llama),
    "gpt2": (GPT2Config, GPT2),
    "bert": (BertConfig, Bert),
}


def family_name(cfg) -> str:
    for name, (config_type, _) in FAMILIES.items():
        if isinstance(cfg, config_type):
            return name
    raise TypeError(f"{type(cfg).__name__} is not a model config; known: {[c.__name__ for c, _ in FAMILIES.values()]}")


def config_to_dict(cfg) -> dict[str, Any]:
    """{'family': ..., field: value, ...}, JSON-serialisable (rope_scaling becomes a dict)."""
    d = {"family": family_name(cfg)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        d[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return d


def config_from_dict(spec: Mapping[str, Any]):
    """Inverse of `config_to_dict`; unknown keys are an error that names them and lists the valid ones."""
    spec = dict(spec)
    family = spec.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is unknown; known: {sorted(FAMILIES)}")
    config_type = FAMILIES[family][0]
    valid = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise ValueError(f"unknown {family} config key(s) {unknown}; valid keys: {sorted(valid)}")
    if isinstance(spec.get("rope_scaling"), Mapping):
        spec["rope_scaling"] = RopeScaling(**spec["rope_scaling"])
    return config_type(**spec)


def build_model(cfg, *, seed: int = 0, param_dtype=jnp.float32, dtype=None, **options) -> nnx.Module:
    """A freshly initialised model of the config's family (parameters from PRNG key `seed`).

    options: module options that are not architecture (e.g. llama's `remat` policy)."""
    if isinstance(cfg, Mapping):
        cfg = config_from_dict(cfg)
    module_type = FAMILIES[family_name(cfg)][1]
    return module_type(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, **options)


def load_model(source: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    """Loads a model from a registry name, a .gguf file, an HF directory, or an orbax model checkpoint."""
    from configurable_fm.models import registry

    text = str(source)
    if text in registry.MODELS:
        return registry.load_pretrained(text, dtype=dtype)[0]
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        from configurable_fm.interop.gguf import from_gguf

        return from_gguf(path, dtype=dtype)
    if (path / "config.json").is_file():
        from configurable_fm.interop.hf import from_hf

        return from_hf(path, dtype=dtype)
    from configurable_fm.interop import orbax_io

    if orbax_io.is_model_checkpoint(path):
        return orbax_io.load_model(path, dtype=dtype)
    raise SourceNotFound(f"cannot load a model from {text!r}: not a registry name ({sorted(registry.MODELS)}), "
                            "a .gguf file, an HF directory (config.json) or an orbax model checkpoint "
                            f"({orbax_io.MODEL_CONFIG} + {orbax_io.PARAMS_DIR}/)")
