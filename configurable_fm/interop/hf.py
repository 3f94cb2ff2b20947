"""Hugging Face checkpoints (config.json + safetensors) <-> configurable_fm models.

    model = from_hf("hf_dir")
    to_hf(model, "out", tokenizer="smollm2-135m-instruct", dtype="bfloat16")  # what transformers loads
    convert_to_hf("model.gguf", "out")            # any source load_model reads, with its own tokenizer

Each model family registers a `Family`: how to read/write its config.json, how to build the module, and a
`TensorMapping` per parameter (which HF tensors make it and how). Loading builds an abstract model with
`nnx.eval_shape`, checks every tensor (missing, unexpected, mis-shaped: all reported in one error), and
fills the parameters; writing inverts the mapping. Both directions are exact (transposes and stacking only).
`to_hf` writes a complete directory (config, generation config, tokenizer files, safetensors in a chosen dtype)
that transformers' Auto classes and pipelines load as they load a model from the Hub.
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

from configurable_fm.errors import ConfigError, UserError
from configurable_fm.interop.atomic import atomic_directory, check_overwritable
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore, read_json_object, write_sharded
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


class UnsupportedModel(UserError, NotImplementedError):
    """A checkpoint or model that uses a feature this library does not implement (the message names it)."""


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
        raise UnsupportedModel(
            f"config attribute(s) {unknown} are not implemented by the {family} family "
            f"(values: { {k: hf_config[k] for k in unknown} })")


# ------------------------------------------------------------------------------------ load / save
def read_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not Path(path).exists():
        raise CheckpointError(f"{path}: the path does not exist")
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    return read_json_object(file)


def family_of_config(config: dict) -> Family:
    archs = config.get("architectures") or []
    known = families()
    for arch in archs:
        if arch in known:
            return known[arch]
    raise UnsupportedModel(f"unsupported architecture {archs or '(none given)'}; supported: {sorted(known)}")


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
    the family's mapping (UnsupportedModel, a NotImplementedError, naming the paths otherwise)."""
    family = family_for(model)
    check_consistent(model, action)
    extensions = extension_specs(model)
    if extensions:
        listed = ", ".join(f"{e['path']} ({e['kind']})" for e in extensions[:8])
        raise UnsupportedModel(f"{action}: an HF {family.name} checkpoint cannot express the extension module(s) "
                               f"at {listed}{' ...' if len(extensions) > 8 else ''}; merge them into the base "
                               "weights first, or keep them with interop.orbax_io.save_model")
    mapped = {m.path for m in family.tensor_map(model.cfg)}
    unmapped = [p for p in variables_of(model) if p not in mapped]
    if unmapped:
        raise UnsupportedModel(f"{action}: the HF {family.name} mapping has no tensor for the variable(s) "
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


EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def export_dtype(dtype) -> str | None:
    """The name ('bfloat16' | 'float16' | 'float32') of an export dtype given as a name or a numpy / jax dtype;
    None for None. Anything else raises ConfigError."""
    if dtype is None:
        return None
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} cannot be exported; choose one of {list(EXPORT_DTYPES)}")
    return name


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def _cast(key: str, value: np.ndarray, dtype: str) -> np.ndarray:
    """`value` in the export dtype; ConfigError when finite values would become inf (float16's range ends at
    65504), rather than writing them so."""
    with np.errstate(over="ignore"):
        out = value.astype(np.dtype(dtype))
    if np.isinf(out).sum() > np.isinf(value).sum():
        big = float(np.abs(value[np.isfinite(value)].astype(np.float32)).max())
        raise ConfigError(f"{dtype} cannot hold {key} (max |value| {big:.4g} > {float(np.finfo(out.dtype).max):g}); "
                          "export it as bfloat16 or float32")
    return out


def _special_ids(tokenizer, generation_config: dict | None) -> dict:
    """{'bos_token_id', 'eos_token_id', 'pad_token_id'}: the tokenizer's (None where unknown), then
    `generation_config`'s."""
    ids = tokenizer.generation_config() if tokenizer is not None else {
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    ids.update({k: v for k, v in (generation_config or {}).items() if k in ids})
    return ids


def to_hf(model: nnx.Module, out_dir: str | Path, *, tokenizer=None, dtype=None, generation_config: dict | None = None,
          chat_template: str | None = None, overwrite: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Writes a complete Hugging Face model directory that transformers' `AutoModelForCausalLM` (or `AutoModel`
    for encoders), `AutoTokenizer` and `pipeline(...)` load:

    - config.json: the family's config, `torch_dtype` (and transformers 5's `dtype`) = the written dtype, and
      bos/eos/pad token ids (null when unknown, so transformers' defaults, e.g. Llama's eos 2, do not apply);
    - generation_config.json (causal LMs, or when `generation_config` is given): bos/eos/pad ids from the
      tokenizer's special tokens (a GGUF file's metadata, an HF directory's files), updated by the
      `generation_config` dict (which may also set e.g. do_sample, temperature, max_new_tokens);
    - with a `tokenizer`: tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast, the special tokens, the
      chat template: `chat_template` or the tokenizer's) and special_tokens_map.json;
    - safetensors in `dtype` ('bfloat16' | 'float16' | 'float32' or a dtype; default: the parameters' dtype),
      sharded with an index past `max_shard_size`.

    tokenizer: an `interop.tokenizers.ChatTokenizer`, a `tokenizers.Tokenizer` (no special tokens, no template),
    or a source `load_chat_tokenizer` reads (registry name, .gguf file, HF directory, tokenizer.json). It must not
    have more tokens than the model's vocabulary.

    Everything is checked before anything is written: a model whose module tree disagrees with model.cfg
    (models.InconsistentModel), one HF cannot express (extension modules: UnsupportedModel), a bad dtype or one
    that cannot hold the weights (float16 past 65504: ConfigError), a tokenizer that does not fit the model or a
    chat template without a tokenizer (TokenizerError), an existing output (OutputExists, unless `overwrite` and it
    is a previous output). The directory appears atomically: it is written under a temporary name and renamed when
    complete.
    """
    from configurable_fm.interop.tokenizers import TokenizerError, load_chat_tokenizer

    family = check_exportable(model, "to_hf")
    dtype = export_dtype(dtype)
    if generation_config is not None and not isinstance(generation_config, dict):
        raise ConfigError(f"generation_config must be a dict, got {type(generation_config).__name__}")
    chat = None if tokenizer is None else load_chat_tokenizer(tokenizer)
    if chat_template is not None and chat is None:
        raise TokenizerError("to_hf: chat_template needs a tokenizer (a chat template lives in tokenizer_config.json)")
    vocab = getattr(model.cfg, "vocab_size", None)
    if chat is not None and vocab is not None and chat.tokenizer.get_vocab_size(with_added_tokens=True) > vocab:
        raise TokenizerError(f"to_hf: the tokenizer has {chat.tokenizer.get_vocab_size(with_added_tokens=True)} "
                             f"tokens but the model's vocabulary has {vocab} rows")
    check_overwritable(out_dir, overwrite)
    tensors = _tensors(family, model)
    if dtype is not None:
        tensors = {k: _cast(k, v, dtype) if _is_float(v.dtype) else v for k, v in tensors.items()}
    config = family.config_to_hf(model.cfg)
    dtypes = {str(v.dtype) for v in tensors.values()}
    config["torch_dtype"] = config["dtype"] = dtype or (dtypes.pop() if len(dtypes) == 1 else "float32")
    causal = callable(getattr(model, "init_cache", None))
    ids = _special_ids(chat, generation_config)
    if causal:
        config.update(ids)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if causal or generation_config is not None:
            gen = {**ids, **(generation_config or {})}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
        if chat is not None:
            chat.save_pretrained(tmp, chat_template=chat_template)
        write_sharded(tensors, tmp, max_shard_bytes=max_shard_size)
    return Path(out_dir)


def _stored_dtype(source) -> str | None:
    """The float dtype an HF directory's config.json names (torch_dtype / dtype), else None."""
    path = Path(str(source))
    if not (path / "config.json").is_file():
        return None
    try:
        config = read_config(path)
    except CheckpointError:
        return None
    if "architectures" not in config:  # e.g. a training workdir's config.json
        return None
    name = config.get("torch_dtype") or config.get("dtype")
    return name if name in EXPORT_DTYPES else None


def convert_to_hf(source, out_dir: str | Path, *, tokenizer=None, dtype="auto", chat_template: str | None = None,
                  generation_config: dict | None = None, overwrite: bool = False,
                  max_shard_size: int | str = "5GB") -> Path:
    """Writes the model at `source` (anything `interop.loader.load_model` reads: registry name, .gguf file, HF
    directory, orbax checkpoint, training workdir) as a complete HF directory `out_dir` (`to_hf`).

    tokenizer: None takes the source's own (`interop.tokenizers.find_tokenizer`: a registry model, a GGUF file's
    metadata, an HF directory's tokenizer.json) and writes none when it has none; False writes none; anything
    else is a tokenizer source for `to_hf`. dtype: 'auto' keeps an HF directory's stored dtype (its config.json)
    and writes the loaded parameters' dtype (float32) otherwise; or 'bfloat16' | 'float16' | 'float32'.
    The output directory and the dtype are checked before the model is loaded; nothing is written on error.
    """
    from configurable_fm.interop.loader import load_model
    from configurable_fm.interop.tokenizers import UnsupportedTokenizer, find_tokenizer, load_chat_tokenizer

    dtype = _stored_dtype(source) if dtype == "auto" else export_dtype(dtype)
    check_overwritable(out_dir, overwrite, inputs=[source])
    if tokenizer is None:
        try:
            tokenizer = find_tokenizer(source)
        except UnsupportedTokenizer as e:
            raise UnsupportedTokenizer(f"{e}; convert without a tokenizer (tokenizer=False, --config.tokenizer=none) "
                                       "or give one (a tokenizer.json, an HF directory)") from None
    elif tokenizer is not False:
        tokenizer = load_chat_tokenizer(tokenizer)
    model = load_model(source)
    return to_hf(model, out_dir, tokenizer=None if tokenizer is False else tokenizer, dtype=dtype,
                 generation_config=generation_config, chat_template=chat_template, overwrite=overwrite,
                 max_shard_size=max_shard_size)
