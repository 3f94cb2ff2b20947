"""Hugging Face checkpoints (config.json + safetensors) <-> configurable_fm models.

Each model family registers a `Family`: how to read/write its config.json, how to build the module, and a
`TensorMapping` per parameter (which HF tensors make it and how). Loading builds an abstract model with
`nnx.eval_shape`, checks every tensor (missing, unexpected, mis-shaped: all reported in one error), and
fills the parameters; writing inverts the mapping. Both directions are exact (transposes and stacking only).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore, write_sharded
from configurable_fm.models.structure import check_consistent, extension_specs, fill, variables_of


# ------------------------------------------------------------------------------------ tensor mappings
@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One model parameter `path` made from the HF tensors `hf_keys`."""

    path: str
    hf_keys: tuple[str, ...]
    to_param: Callable[[list[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]


def same(path: str, key: str) -> TensorMapping:
    return TensorMapping(path, (key,), lambda ws: ws[0], lambda p: [p])


def linear(path: str, key: str) -> TensorMapping:
    """torch Linear weight (out, in) <-> kernel (in, out)."""
    return TensorMapping(path, (key,), lambda ws: ws[0].T, lambda p: [p.T])


def stacked_linear(path: str, keys: Sequence[str]) -> TensorMapping:
    """E torch Linear weights (out, in) <-> one stacked kernel (E, in, out)."""
    return TensorMapping(path, tuple(keys), lambda ws: np.stack([w.T for w in ws]),
                         lambda p: [p[i].T for i in range(p.shape[0])])


# ------------------------------------------------------------------------------------ families
@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family reads and writes HF checkpoints.

    config_from_hf(config.json dict) -> model config (raises NotImplementedError on unsupported attributes);
    config_to_hf(model config) -> config.json dict; build(cfg, rngs, param_dtype) -> module;
    tensor_map(cfg) -> [TensorMapping]; ignored_keys(cfg) -> regexes of checkpoint tensors that carry no
    parameters (buffers, or a duplicated tied head).
    """

    name: str
    architectures: tuple[str, ...]
    module_type: type
    config_from_hf: Callable[[dict], object]
    config_to_hf: Callable[[object], dict]
    build: Callable[..., nnx.Module]
    tensor_map: Callable[[object], list[TensorMapping]]
    ignored_keys: Callable[[object], Sequence[str]] = lambda cfg: ()
    key_prefixes: tuple[str, ...] = ()  # optional prefixes stripped from checkpoint keys (e.g. 'bert.')


_FAMILIES: dict[str, Family] = {}

# Attributes of any transformers config that do not change the forward pass.
GENERIC_IGNORED_CONFIG = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "finetuning_task", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "gradient_checkpointing", "attention_dropout", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "classifier_dropout", "dropout", "_attn_implementation_autoset",
    "use_return_dict", "_commit_hash", "tie_word_embeddings_", "transformers.js_config",
})


def register_family(family: Family) -> Family:
    for arch in family.architectures:
        _FAMILIES[arch] = family
    return family


def families() -> dict[str, Family]:
    """{HF architecture name: Family} for every supported architecture."""
    # Importing the family modules registers them.
    from configurable_fm.interop import hf_bert, hf_gpt2, hf_llama  # noqa: F401
    return dict(_FAMILIES)


def family_for(model: nnx.Module) -> Family:
    for fam in families().values():
        if isinstance(model, fam.module_type):
            return fam
    raise TypeError(f"no HF conversion for {type(model).__name__}; "
                    f"supported: {sorted({f.module_type.__name__ for f in families().values()})}")


def reject_unknown_config(hf_config: dict, handled: set[str], family: str) -> None:
    unknown = sorted(set(hf_config) - handled - GENERIC_IGNORED_CONFIG)
    if unknown:
        raise NotImplementedError(
            f"config attribute(s) {unknown} are not implemented by the {family} family "
            f"(values: { {k: hf_config[k] for k in unknown} })")


# ------------------------------------------------------------------------------------ load / save
def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not Path(path).exists():
        raise CheckpointError(f"{path}: the path does not exist")
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def family_of_config(config: dict) -> Family:
    archs = config.get("architectures") or []
    known = families()
    for arch in archs:
        if arch in known:
            return known[arch]
    raise NotImplementedError(f"unsupported architecture {archs or '(none given)'}; supported: {sorted(known)}")


def abstract_model(family: Family, cfg, param_dtype=jnp.float32) -> nnx.Module:
    return nnx.eval_shape(lambda: family.build(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def check_tensor_match(source, family: str, missing, unexpected, misshaped) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor of `source` (a file or
    directory) against the `family` config; nothing when all three are empty."""
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not match the {family} config:"]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {list(missing)}")
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {list(unexpected)}")
    if misshaped:
        lines.append(f"  mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped))
    raise CheckpointError("\n".join(lines))


def state_from_tensors(family: Family, cfg, tensors, *, source: str, param_dtype=jnp.float32) -> nnx.Module:
    """Builds the model from a {HF name: array} mapping, validating names and shapes (one error for all)."""
    model = abstract_model(family, cfg, param_dtype)
    expected_shapes = {k: tuple(v.shape) for k, v in variables_of(model).items()}
    keys = {}
    for key in tensors:
        canonical = key
        for prefix in family.key_prefixes:
            if canonical.startswith(prefix):
                canonical = canonical[len(prefix):]
                break
        keys[canonical] = key
    mappings = family.tensor_map(cfg)
    used = {k for m in mappings for k in m.hf_keys}
    ignored = [re.compile(p) for p in family.ignored_keys(cfg)]
    missing = sorted(k for k in used if k not in keys)
    unexpected = sorted(k for k in keys if k not in used and not any(p.fullmatch(k) for p in ignored))
    problems, values = [], {}
    for m in mappings:
        if any(k not in keys for k in m.hf_keys):
            continue
        value = m.to_param([np.asarray(tensors[keys[k]]) for k in m.hf_keys])
        if tuple(value.shape) != expected_shapes[m.path]:
            shapes = [tuple(tensors[keys[k]].shape) for k in m.hf_keys[:1]]
            problems.append(f"{m.hf_keys[0]}{' (+%d more)' % (len(m.hf_keys) - 1) if len(m.hf_keys) > 1 else ''} "
                            f"has shape {shapes[0]} but {m.path} needs {expected_shapes[m.path]}")
            continue
        values[m.path] = jnp.asarray(value, dtype=param_dtype)
    check_tensor_match(source, family.name, missing, unexpected, problems)
    return fill(model, values)


def from_hf(path: str | Path, dtype=jnp.float32) -> nnx.Module:
    """Loads an HF model directory (config.json + model.safetensors or sharded + index).

    Returns the model with parameters in `dtype`. Causal LMs map int ids (B, T) to logits (B, T, V);
    encoders to last hidden states (B, T, D).
    """
    config = read_config(path)
    family = family_of_config(config)
    cfg = family.config_from_hf(config)
    return state_from_tensors(family, cfg, TensorStore(path), source=str(path), param_dtype=dtype)


def check_exportable(model: nnx.Module, action: str = "to_hf") -> Family:
    """The model's Family, after checking that an HF checkpoint can express the model: its tree agrees with
    model.cfg (models.InconsistentModel otherwise), it has no extension modules and every variable is a tensor of
    the family's mapping (NotImplementedError naming the paths otherwise)."""
    family = family_for(model)
    check_consistent(model, action)
    extensions = extension_specs(model)
    if extensions:
        listed = ", ".join(f"{e['path']} ({e['kind']})" for e in extensions[:8])
        raise NotImplementedError(f"{action}: an HF {family.name} checkpoint cannot express the extension module(s) "
                                  f"at {listed}{' ...' if len(extensions) > 8 else ''}; merge them into the base "
                                  "weights first, or keep them with interop.orbax_io.save_model")
    mapped = {m.path for m in family.tensor_map(model.cfg)}
    unmapped = [p for p in variables_of(model) if p not in mapped]
    if unmapped:
        raise NotImplementedError(f"{action}: the HF {family.name} mapping has no tensor for the variable(s) "
                                  f"{unmapped[:8]}{' ...' if len(unmapped) > 8 else ''}")
    return family


def _tensors(family: Family, model: nnx.Module) -> dict[str, np.ndarray]:
    params = {k: v.get_value() for k, v in variables_of(model).items()}
    out = {}
    for m in family.tensor_map(model.cfg):
        for key, value in zip(m.hf_keys, m.to_hf(np.asarray(params[m.path]))):
            out[key] = np.ascontiguousarray(value)
    return out


def hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """{HF tensor name: numpy array} for a model (in the model's parameter dtype); checked by `check_exportable`."""
    return _tensors(check_exportable(model, "hf_tensors"), model)


def to_hf(model: nnx.Module, out_dir: str | Path, *, max_shard_size: int | str = "5GB",
          overwrite: bool = False) -> Path:
    """Writes config.json + safetensors (sharded with an index past `max_shard_size`) that transformers loads.

    The directory appears atomically: it is written under a temporary name and renamed when complete. A model whose
    module tree disagrees with model.cfg (models.InconsistentModel) or that HF cannot express (extension modules:
    NotImplementedError) is refused before anything is written.
    """
    family = check_exportable(model, "to_hf")
    tensors = _tensors(family, model)
    config = family.config_to_hf(model.cfg)
    dtypes = {str(v.dtype) for v in tensors.values()}
    config.setdefault("torch_dtype", dtypes.pop() if len(dtypes) == 1 else "float32")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_sharded(tensors, tmp, max_shard_bytes=max_shard_size)
    return Path(out_dir)
