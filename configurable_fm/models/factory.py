"""Model configs as plain data, and building models from them (loading any source: interop/loader.py).

    spec = {"family": "llama", "vocab_size": 49152, "hidden_size": 64, ...}     # e.g. an ml-collections config
    cfg = config_from_dict(spec); model = build_model(cfg, seed=0)
    config_to_dict(model.cfg) == spec-with-defaults                            # JSON-serialisable
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

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
        spec["rope_scaling"] = RopeScaling.from_dict(spec["rope_scaling"])
    return config_type(**spec)


def build_model(cfg, *, seed: int = 0, param_dtype=jnp.float32, dtype=None, **options) -> nnx.Module:
    """A freshly initialised model of the config's family (parameters from PRNG key `seed`).

    options: module options that are not architecture (e.g. llama's `remat` policy and `scan_layers`)."""
    if isinstance(cfg, Mapping):
        cfg = config_from_dict(cfg)
    module_type = FAMILIES[family_name(cfg)][1]
    return module_type(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, **options)


# Compute dtypes by name (configs name them: compute_dtype='bfloat16').
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def with_compute_dtype(model: nnx.Module, dtype, *, remat: str = "none", scan_layers: bool = False) -> nnx.Module:
    """A copy of `model` (same structure, same variables; `model` is untouched) whose parameters are float32
    master weights and whose modules compute in `dtype`: every sub-module with a `dtype` attribute (the compute
    dtype of the families' layers) gets `dtype`; with remat != 'none', every sub-module with a `remat`
    attribute (llama) gets that policy, and a model with none is an error; likewise scan_layers=True sets every
    `scan_layers` attribute (llama: identical layers run as one jax.lax.scan, models/llama.py). remat='none' and
    scan_layers=False keep the model's own settings. Non-parameter variables keep their
    dtype; values sown by an earlier call (nnx.Intermediate) are dropped. Unlike a rebuild from `model.cfg`, this
    keeps any surgery (replaced modules, extension modules, extra variables)."""
    graphdef, state = nnx.split(model)

    def master(var):
        value = var.get_value()
        if isinstance(var, nnx.Param) and jnp.issubdtype(jnp.result_type(value), jnp.floating):
            return var.replace(jnp.asarray(value, jnp.float32))
        return var

    copy = nnx.merge(graphdef, jax.tree.map(master, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    nnx.pop(copy, nnx.Intermediate)  # transient, not state to train or carry
    if not isinstance(scan_layers, bool):
        raise ValueError(f"scan_layers={scan_layers!r} must be True or False")
    with_remat, with_scan = [], []
    for _, module in nnx.iter_modules(copy):
        attrs = vars(module)
        if "dtype" in attrs:
            module.dtype = dtype
        if "remat" in attrs and remat != "none":
            module.remat = remat
            with_remat.append(module)
        if "scan_layers" in attrs and scan_layers:
            module.scan_layers = True
            with_scan.append(module)
    if remat != "none" and not with_remat:
        raise ValueError(f"remat={remat!r}: {type(model).__name__} has no remat option (llama models have one); "
                         "use remat='none'")
    if scan_layers and not with_scan:
        raise ValueError(f"scan_layers=True: {type(model).__name__} has no scan_layers option (llama models have "
                         "one); use scan_layers=False")
    return copy
