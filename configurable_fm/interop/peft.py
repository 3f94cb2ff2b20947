"""PEFT adapter directories (adapter_config.json + adapter_model.safetensors) <-> adapters attached to our models.

    model = from_peft(base, "peft_dir")        # LoRA (+ rsLoRA, DoRA) or IA3 from PEFT: base with the adapter attached
    to_peft(model, "out", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")   # what PeftModel.from_pretrained loads

The adapter modules themselves are `configurable_fm.bricks.adapters` (kinds 'lora', 'dora', 'ia3'; this layer builds
them through the models.structure extension registry, so import that package first: `from configurable_fm.bricks
import adapters`, which also re-exports these two functions).

Names. A PEFT key is `base_model.model.<module as named in the transformers model>.<tensor>`; the module names are
those of the HF mapping of the model's family (interop/hf_*.py: `layers.0.self_attn.q_proj.kernel` <->
`model.layers.0.self_attn.q_proj.weight`), with GPT2LMHeadModel's `transformer.` before the blocks (and a
`transformer.` / `bert.` prefix accepted on reading, as from_hf does). Tensors (ours are (in, out) kernels):

    lora_A.weight (r, in)      = lora_aᵀ            lora_B.weight (out, r) = lora_bᵀ
    lora_magnitude_vector (out,) = lora_magnitude   (DoRA, use_dora=true)
    ia3_l (out, 1) = ia3_scale (output side)        ia3_l (1, in) = ia3_scale (feedforward_modules)

GPT-2's Conv1D stores (in, out) weights (PEFT's fan_in_fan_out=true), but its lora_A / lora_B are oriented as for
nn.Linear, so the conversion is the same; fan_in_fan_out is written true for gpt2 and ignored on reading (PEFT sets
it from the module type too). Scale: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern and
alpha_pattern are honoured (PEFT's matching) and written when modules differ.

LoRA on a Mixtral model's stacked expert weights (bricks.adapters.attach_experts) <-> PEFT's target_parameters on
transformers' experts (`model.layers.<i>.mlp.experts.gate_up_proj` / `down_proj`): peft_experts.py has the layout
(gate and up share PEFT's A; ours is exact at rank r_gate + r_up) and the nesting of the key names.

Prompt learning (PROMPT_TUNING, PREFIX_TUNING) maps to models.virtual_tokens.VirtualTokens: task_type CAUSAL_LM for a
causal decoder, FEATURE_EXTRACTION for a Bert (PEFT's PeftModelForFeatureExtraction around BertModel; the task-head
types SEQ_CLS, TOKEN_CLS, QUESTION_ANS carry a head the encoder lacks and are refused). The one tensor
`prompt_embeddings` is the prompt (P, D), or the prefix (P, L·2·K·H) = our (P, L, 2, K, H) (layer l's keys at row
block 2l, values at 2l + 1; K key-value heads: PEFT's num_attention_heads for GQA models, a Bert's heads). A prefix
trained with prefix_projection is saved by PEFT as the MLP's output, which is what is read.

What is refused, with an error naming the key or option (nothing is written on failure; outputs appear atomically):
other peft_types (AdaLoRA, ...), encoder-decoder or classification prompts, options that change the computation in ways not implemented
(bias != 'none', lora_bias, modules_to_save, layer_replication, target_parameters other than a Mixtral model's
experts, trainable tokens, aLoRA/QA-LoRA/Arrow/... variants, PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA initialisations, which
change the base weights), unknown options with a non-empty value, tensors of modules the model lacks or that are not
Linear (embeddings),
modules that target_modules does not select (PEFT would ignore their weights) or selects without tensors in the
file (PEFT would initialise them afresh), shapes that do not fit, ranks that disagree with r / rank_pattern,
option values of the wrong JSON type, a missing, corrupt or pickle-only (.bin) weights file.
"""
from __future__ import annotations

import collections.abc as cabc
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError
from configurable_fm.interop.atomic import atomic_directory, check_overwritable
from configurable_fm.interop.hf import Family, UnsupportedModel, family_for
from configurable_fm.interop.peft_experts import (attach_expert_adapters, check_mixtral, expert_adapters, expert_key,
                                                  read_expert_adapters, write_expert_tensors)
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore, read_json_object
from configurable_fm.models.layers import Linear
from configurable_fm.models.moe import EXPERT_LORA_KIND
from configurable_fm.models.structure import (check_consistent, extension_specs, node_at, registered_extensions,
                                              variables_of)
from configurable_fm.models.bert import Bert
from configurable_fm.models.virtual_tokens import VirtualTokens, geometry, supports, with_virtual_tokens

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# The adapter kinds of bricks.adapters and the parameter leaves each adds to an adapted Linear module.
ADAPTER_LEAVES = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "lora_magnitude"),
                  "ia3": ("ia3_scale",)}
# (prefix, names without it) of module names in the transformers class to_hf writes, where it nests the blocks.
_HF_CLASS_PREFIX = {"gpt2": ("transformer.", ("lm_head",))}
_MAX_LISTED = 8

# adapter_config.json options: read (and used or harmless for inference) ...
_COMMON = {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
           "auto_mapping", "fan_in_fan_out", "target_modules", "exclude_modules", "modules_to_save"}
_LORA_READ = _COMMON | {
    "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern", "init_lora_weights", "lora_dropout", "bias", "lora_bias", "megatron_core", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying", "target_parameters"}
_IA3_READ = _COMMON | {"feedforward_modules", "init_ia3_weights"}
# Prompt learning: PEFT's peft_type -> our VirtualTokens kind, and the options read (the saved prompt_embeddings are
# what the model uses: prefix_projection's MLP output is saved, not the MLP; the init options only shaped training).
PROMPT_TYPES = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
_PROMPT_READ = _COMMON | {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                          "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                          "tokenizer_kwargs", "encoder_hidden_size", "prefix_projection", "init_weights"}
PROMPT_KEY = "prompt_embeddings"
# ... and initialisations whose adapter applies to the unchanged base (the others rewrite the base weights).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _empty(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _listing(problems: list[str]) -> str:
    more = "\n  ..." if len(problems) > _MAX_LISTED else ""
    return f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more


def _few(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------ module names
def linear_modules(model) -> dict[str, tuple[str, Any]]:
    """{our module path: (HF module name as PEFT sees it in the transformers class to_hf writes, the module)} for
    every Linear-like module (a Linear or an adapted Linear: anything with a `kernel` variable) that the family's HF
    mapping writes as one `<name>.weight` tensor."""
    family = family_for(model)
    modules = {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
    prefix, exempt = _HF_CLASS_PREFIX.get(family.name, ("", ()))
    out = {}
    for m in family.tensor_map(model.cfg):
        if len(m.hf_keys) != 1 or not m.path.endswith(".kernel") or not m.hf_keys[0].endswith(".weight"):
            continue
        path, name = m.path[:-len(".kernel")], m.hf_keys[0][:-len(".weight")]
        module = modules.get(path)
        if module is None or not isinstance(getattr(module, "kernel", None), nnx.Variable):
            continue
        out[path] = (name if not prefix or name.startswith(exempt) else prefix + name, module)
    return out


def _path_of(family: Family, modules: Mapping[str, tuple[str, Any]]):
    """name -> our module path (or None) for the module names of PEFT keys: the names PEFT gives them in the
    transformers class to_hf writes, also without (or with another of) the family's key prefixes ('transformer.',
    'bert.'), as from_hf reads checkpoints."""
    prefixes = [p for p in (*family.key_prefixes, _HF_CLASS_PREFIX.get(family.name, ("",))[0]) if p]
    out = {}
    for path, (name, _) in modules.items():
        out[name] = path
        for prefix in prefixes:
            if name.startswith(prefix):
                out[name[len(prefix):]] = path

    def lookup(name: str):
        if name in out:
            return out[name]
        for prefix in prefixes:
            if name.startswith(prefix) and name[len(prefix):] in out:
                return out[name[len(prefix):]]
        return None
    return lookup


# ------------------------------------------------------------------------------------ PEFT's matching rules
def _targeted(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT (tuners_utils.check_target_module_exists) puts an adapter on the module `name`."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":  # resolved by PEFT before saving; trust the file
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    indexes, patterns = config.get("layers_to_transform"), config.get("layers_pattern")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _pattern_value(pattern: Mapping[str, Any], name: str, default):
    """PEFT's get_pattern_key: the first key k of `pattern` with re.match(rf'(.*\\.)?({k})$', name)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _feedforward(config: Mapping[str, Any], name: str) -> bool | None:
    """PEFT's IA3 _check_target_module_feedforward (None when the config does not say)."""
    ff = config.get("feedforward_modules")
    if ff is None:
        return None
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff)


# ------------------------------------------------------------------------------------ reading
def _check_options(config: dict, file: Path) -> str:
    """The peft_type ('LORA' | 'IA3') after checking every option; one UnsupportedModel naming every problem."""
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise UnsupportedModel(f"{file}: peft_type {peft_type!r} is not supported (supported: 'LORA' with rsLoRA and "
                               "DoRA, 'IA3', and through from_peft 'PROMPT_TUNING' and 'PREFIX_TUNING')")
    read = _LORA_READ if peft_type == "LORA" else _IA3_READ
    problems = [f"{k}={v!r}" for k, v in config.items() if k not in read and not _empty(v)]
    if not _empty(config.get("modules_to_save")):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (full copies of modules)")
    if peft_type == "LORA":
        if config.get("bias", "none") != "none":
            problems.append(f"bias={config['bias']!r} (trained base biases)")
        if not _empty(config.get("lora_bias")):
            problems.append(f"lora_bias={config['lora_bias']!r} (a bias on lora_B)")
        if config.get("init_lora_weights", True) not in _PLAIN_INITS:
            problems.append(f"init_lora_weights={config['init_lora_weights']!r} (it changes the base weights; "
                            "convert the adapter to a plain LoRA with PEFT's save_pretrained(..., "
                            "path_initial_model_for_weight_conversion=...))")
    if problems:
        raise UnsupportedModel(f"{file}: {peft_type} option(s) not supported: {'; '.join(problems)}")
    _check_values(config, file, peft_type)
    return peft_type


def _strings(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def _ints(v) -> bool:
    return is_int(v) or (isinstance(v, list) and all(is_int(t) for t in v))


# The option values the matching and scaling read, with their JSON types (None: the option is absent or null).
_VALUE_TYPES = {
    "target_modules": (_strings, "a string or a list of strings"),
    "exclude_modules": (_strings, "a string or a list of strings"),
    "layers_pattern": (_strings, "a string or a list of strings"),
    "layers_to_transform": (_ints, "an int or a list of ints"),
    "rank_pattern": (lambda v: isinstance(v, dict), "an object {pattern: r}"),
    "alpha_pattern": (lambda v: isinstance(v, dict), "an object {pattern: lora_alpha}"),
    "use_dora": (lambda v: isinstance(v, bool), "a bool"),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "feedforward_modules": (_strings, "a string or a list of strings"),
}


def _check_values(config: Mapping[str, Any], file: Path, peft_type: str) -> None:
    """CheckpointError naming the first option of `config` whose value has the wrong JSON type (_VALUE_TYPES;
    LoRA's options for LORA, feedforward_modules for IA3), before the matching reads it."""
    read = _LORA_READ if peft_type == "LORA" else _IA3_READ
    for key, (ok, want) in _VALUE_TYPES.items():
        if key in read and config.get(key) is not None and not ok(config[key]):
            raise CheckpointError(f"{file}: {key}={config[key]!r} is not a valid value ({want})")


def _number(config, key, file, ok=is_real, minimum=None):
    value = config.get(key)
    if not ok(value) or (minimum is not None and value < minimum):
        raise CheckpointError(f"{file}: {key}={value!r} is not a valid value")
    return value


_LORA_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
                  "lora_magnitude_vector.weight": "magnitude"}


def _split_key(key: str, peft_type: str) -> tuple[str, str] | None:
    """(PEFT module name, tensor role) of a PEFT key, None when it is not an adapter tensor of a module."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    suffixes = _LORA_SUFFIXES if peft_type == "LORA" else {"ia3_l": "ia3"}
    for suffix, role in suffixes.items():
        if name.endswith("." + suffix):
            return name[:-len(suffix) - 1], role
    return None


def read_peft(model, adapter_dir) -> list[dict]:
    """The adapter of the PEFT directory `adapter_dir`, checked against `model` (module docstring), as
    [{"path": our module path, "kind": 'lora' | 'dora' | 'ia3', "options": {...}, "values": {leaf: array}}] in the
    model's module order, then a Mixtral model's expert LoRAs (kind 'expert_lora', path = the stacked weight's,
    peft_experts.read_expert_adapters). Raises CheckpointError / UnsupportedModel naming the file, key or option."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = _adapter_files(adapter_dir)
    config = read_json_object(config_file, what="PEFT adapter config")
    peft_type = _check_options(config, config_file)
    store = TensorStore(weights_file)
    family = family_for(model)
    modules = linear_modules(model)
    path_of = _path_of(family, modules)
    found: dict[str, dict[str, str]] = {}  # our path -> {role: key}
    names: dict[str, str] = {}  # our path -> PEFT module name
    expert_keys: dict[tuple[int, int], dict[str, str]] = {}  # (layer, nesting depth) -> {role: key} (peft_experts)
    problems = []
    for key in store:
        split = _split_key(key, peft_type)
        experts_at = expert_key(split[0]) if split is not None and peft_type == "LORA" else None
        if experts_at is not None:
            expert_keys.setdefault(experts_at, {})[split[1]] = key
            continue
        if split is None:
            hint = (" (LoRA on an embedding is not supported)" if "lora_embedding_" in key else
                    " (modules_to_save copies are not supported)" if "modules_to_save" in key else "")
            wanted = "lora_A.weight, lora_B.weight, lora_magnitude_vector" if peft_type == "LORA" else "ia3_l"
            problems.append(f"{key} is not an adapter tensor of a module ({wanted}){hint}")
            continue
        name, role = split
        path = path_of(name)
        if path is None:
            problems.append(f"{key}: the {family.name} model has no Linear module {name!r} "
                            f"(its Linear modules are named like {_few(list(v[0] for v in modules.values()), 4)})")
            continue
        if role in found.setdefault(path, {}):
            problems.append(f"{key}: a second {role} tensor for {path}")
        found[path][role] = key
        names[path] = name
    if problems:
        raise CheckpointError(f"{weights_file} does not fit the model {_listing(problems)}")
    if not found and not expert_keys:
        raise CheckpointError(f"{weights_file}: holds no adapter tensors")
    adapters = []
    for path in modules:
        if path not in found:
            continue
        name, module, roles = names[path], modules[path][1], found[path]
        if type(module) is not Linear:
            problems.append(f"{path} is a {type(module).__name__}, not a plain Linear (an adapter is attached there "
                            "already, or another extension); detach or merge it first")
            continue
        if not _targeted(config, name):
            problems.append(f"{_few(roles.values(), 3)}: {name} is not selected by {CONFIG_FILE}'s target_modules "
                            f"{config.get('target_modules')!r} (PEFT would ignore these weights)")
            continue
        d_in, d_out = (int(n) for n in module.kernel.get_value().shape)
        try:
            adapters.append({"path": path, **(_lora(config, store, name, roles, d_in, d_out, config_file)
                                             if peft_type == "LORA" else
                                             _ia3(config, store, name, roles, d_in, d_out))})
        except CheckpointError as e:
            problems.append(str(e))
    problems += _untensored(config, family, modules, found)
    if problems:
        raise CheckpointError(f"{adapter_dir}: the adapter does not fit the model {_listing(problems)}")
    if expert_keys:
        adapters += _experts(model, config, store, expert_keys, config_file)
    return adapters


def _untensored(config, family: Family, modules: Mapping[str, tuple[str, Any]], found) -> list[str]:
    """The Linear modules that the config's target_modules select (under every form of their name: with and
    without the family's key prefixes, so whichever class the adapter was saved from) but that have no tensors in
    the file: PEFT gives them a freshly initialised adapter (random with init_lora_weights / init_ia3_weights
    false), which the file cannot reproduce. None / 'all-linear' targets are not resolved here (no check)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return []
    prefixes = [p for p in (*family.key_prefixes, _HF_CLASS_PREFIX.get(family.name, ("",))[0]) if p]
    out = []
    for path, (name, _) in modules.items():
        forms = [name] + [name[len(p):] for p in prefixes if name.startswith(p)]
        if path not in found and all(_targeted(config, n) for n in forms):
            out.append(f"{name}: selected by {CONFIG_FILE}'s target_modules {targets!r}, but the file has no "
                       "tensors for it (PEFT would give it a freshly initialised adapter)")
    return out


def _experts(model, config, store, keys, file) -> list[dict]:
    """The expert LoRAs of a LORA adapter's target_parameters tensors (peft_experts), with the file's r / lora_alpha /
    use_rslora (rank_pattern / alpha_pattern entries for the experts modules are refused)."""
    if config.get("use_dora"):
        raise UnsupportedModel(f"{file}: use_dora with target_parameters (PEFT refuses it too)")
    names = [f"model.layers.{layer}.mlp.experts" for layer, _ in keys]
    patterned = [n for n in names for pattern in ("rank_pattern", "alpha_pattern")
                 if _pattern_value(config.get(pattern) or {}, n, None) is not None]
    if patterned:
        raise UnsupportedModel(f"{file}: rank_pattern / alpha_pattern entries for the experts modules "
                               f"({_few(sorted(set(patterned)), 3)}) are not read; one r and lora_alpha for them")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{file}: use_rslora={rslora!r} is not a bool")
    options = {"rank": _number(config, "r", file, is_int, 1), "alpha": float(_number(config, "lora_alpha", file)),
               "rslora": rslora}
    return read_expert_adapters(model, config, keys, options, file,
                                lambda key, shape, what: _tensor(store, key, shape, what))


def _tensor(store, key, shape, what) -> np.ndarray:
    got = tuple(store.shape(key))
    if got != tuple(shape):
        raise CheckpointError(f"{key} is {got} but {what} needs {tuple(shape)}")
    value = store[key]
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
        raise CheckpointError(f"{key} has dtype {value.dtype}, not a floating dtype")
    return np.asarray(value, np.float32)


def _lora(config, store, name, roles, d_in, d_out, file) -> dict:
    dora = bool(config.get("use_dora", False))
    missing = [r for r in ("lora_A", "lora_B") + (("magnitude",) if dora else ()) if r not in roles]
    if missing:
        raise CheckpointError(f"{name}: no {' / '.join(missing)} tensor ({KEY_PREFIX}{name}."
                              f"{'lora_magnitude_vector' if missing == ['magnitude'] else missing[0] + '.weight'})")
    if "magnitude" in roles and not dora:
        raise CheckpointError(f"{roles['magnitude']}: a DoRA magnitude, but {CONFIG_FILE} has use_dora=false")
    r = _pattern_value(config.get("rank_pattern") or {}, name, _number(config, "r", file, is_int, 1))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, _number(config, "lora_alpha", file))
    if not is_int(r) or r < 1 or not is_real(alpha):
        raise CheckpointError(f"{file}: rank_pattern / alpha_pattern give r={r!r}, lora_alpha={alpha!r} for {name}")
    a = _tensor(store, roles["lora_A"], (r, d_in), f"{name} (r={r} from {CONFIG_FILE}, {d_in} inputs)")
    b = _tensor(store, roles["lora_B"], (d_out, r), f"{name} ({d_out} outputs, r={r})")
    values = {"lora_a": a.T, "lora_b": b.T}
    if dora:
        values["lora_magnitude"] = _tensor(store, roles["magnitude"], (d_out,), f"{name} ({d_out} outputs)")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{file}: use_rslora={rslora!r} is not a bool")
    return {"kind": "dora" if dora else "lora", "values": values,
            "options": {"rank": r, "alpha": float(alpha), "rslora": rslora, "merged": False}}


def _ia3(config, store, name, roles, d_in, d_out) -> dict:
    key = roles["ia3"]
    shape = tuple(store.shape(key))
    ff = _feedforward(config, name)
    if ff is None:  # not in the config: the shape says it
        ff = shape == (1, d_in) and shape != (d_out, 1)
    want = (1, d_in) if ff else (d_out, 1)
    what = f"{name} ({'feedforward: one scale per input' if ff else 'one scale per output'})"
    return {"kind": "ia3", "values": {"ia3_scale": _tensor(store, key, want, what).reshape(-1)},
            "options": {"feedforward": ff, "merged": False}}


def _adapter_files(adapter_dir) -> tuple[Path, Path]:
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such directory (a PEFT adapter is a directory with {CONFIG_FILE} "
                              f"and {WEIGHTS_FILE})")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: no such file (not a PEFT adapter directory)")
    if not weights_file.is_file():
        pickled = " (only adapter_model.bin, a pickle, which is never loaded: re-save it with PEFT's default " \
                  "safe_serialization=True)" if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{weights_file}: no such file{pickled}")
    return config_file, weights_file


def virtual_token_geometry(model) -> dict[str, int]:
    """models.virtual_tokens.geometry of a causal decoder or a Bert; UnsupportedModel for any other model."""
    if not supports(model):
        raise UnsupportedModel(f"prompt and prefix tuning need a causal decoder (llama family, gpt2) or a Bert; "
                               f"{type(model).__name__} is neither")
    return geometry(model)


def prompt_task_type(model) -> str:
    """PEFT's task_type of a prompt-learning adapter for the base `model`: FEATURE_EXTRACTION for a Bert
    (PeftModelForFeatureExtraction), CAUSAL_LM for a causal decoder."""
    return "FEATURE_EXTRACTION" if isinstance(model, Bert) else "CAUSAL_LM"


def read_virtual_tokens(model, adapter_dir) -> tuple[str, np.ndarray]:
    """(kind, values) of a PEFT PROMPT_TUNING / PREFIX_TUNING directory, checked against `model`: 'prompt' with
    values (P, D), or 'prefix' with values (P, L, 2, K, H) (PEFT's (P, L·2·K·H) rows: layer l's keys at 2l, its
    values at 2l + 1, each K heads of H). CheckpointError / UnsupportedModel naming the option or tensor."""
    config_file, weights_file = _adapter_files(adapter_dir)
    config = read_json_object(config_file, what="PEFT adapter config")
    g = virtual_token_geometry(model)
    kind = PROMPT_TYPES.get(config.get("peft_type"))
    if kind is None:
        raise UnsupportedModel(f"{config_file}: peft_type {config.get('peft_type')!r} is not prompt learning "
                               f"({sorted(PROMPT_TYPES)})")
    problems = [f"{k}={v!r}" for k, v in config.items() if k not in _PROMPT_READ and not _empty(v)]
    task = prompt_task_type(model)
    if config.get("task_type") not in (task, None):
        problems.append(f"task_type={config.get('task_type')!r} (a {type(model).__name__} takes {task} prompts)")
    if config.get("num_transformer_submodules", 1) != 1:
        problems.append(f"num_transformer_submodules={config['num_transformer_submodules']!r} (encoder-decoder "
                        "prompts are not supported)")
    if not _empty(config.get("modules_to_save")):
        problems.append(f"modules_to_save={config['modules_to_save']!r} (full copies of modules)")
    if problems:
        raise UnsupportedModel(f"{config_file}: {config['peft_type']} option(s) not supported: {'; '.join(problems)}")
    p = _number(config, "num_virtual_tokens", config_file, is_int, 1)
    store = TensorStore(weights_file)
    keys = list(store)
    if keys != [PROMPT_KEY]:
        raise CheckpointError(f"{weights_file}: a {config['peft_type']} adapter holds one tensor {PROMPT_KEY!r}, "
                              f"found {_few(keys)}")
    if kind == "prompt":
        want, shape = (p, g["hidden"]), (p, g["hidden"])
    else:
        for key, value in (("num_layers", g["layers"]), ("num_attention_heads", g["kv_heads"]),
                           ("token_dim", g["kv_heads"] * g["head_dim"])):
            if config.get(key) is not None and config[key] != value:
                raise CheckpointError(f"{config_file}: {key}={config[key]!r} but the model has {value} "
                                      "(layers; key-value heads; key-value heads x head dim)")
        want = (p, g["layers"] * 2 * g["kv_heads"] * g["head_dim"])
        shape = (p, g["layers"], 2, g["kv_heads"], g["head_dim"])
    values = _tensor(store, PROMPT_KEY, want, f"{config['peft_type']} with {p} virtual tokens")
    return kind, np.asarray(values, np.float32).reshape(shape)


def from_peft(model, adapter_dir) -> nnx.Module:
    """A new model: `model` with the PEFT adapter of `adapter_dir` attached (LoRA/rsLoRA as 'lora', DoRA as 'dora',
    IA3 as 'ia3' modules of bricks.adapters) at the modules it names, or, for PROMPT_TUNING / PREFIX_TUNING, wrapped
    in a models.virtual_tokens.VirtualTokens (with_virtual_tokens); `model` is untouched. The model's other modules
    (and adapters already attached elsewhere) are kept. See the module docstring for the conversion and for what is
    refused (CheckpointError / UnsupportedModel naming the key or option)."""
    config_file, _ = _adapter_files(adapter_dir)
    if read_json_object(config_file, what="PEFT adapter config").get("peft_type") in PROMPT_TYPES:
        kind, values = read_virtual_tokens(model, adapter_dir)
        return with_virtual_tokens(model, kind, jnp.asarray(values))
    adapters = read_peft(model, adapter_dir)
    experts = [a for a in adapters if a["kind"] == EXPERT_LORA_KIND]
    adapters = [a for a in adapters if a["kind"] != EXPERT_LORA_KIND]
    builders = registered_extensions()
    missing = sorted({a["kind"] for a in adapters + experts} - set(builders))
    if missing:
        raise UnsupportedModel(f"from_peft: adapter kind(s) {missing} are not registered; import "
                               "configurable_fm.bricks.adapters first (it registers 'lora', 'dora', 'ia3' and "
                               "'expert_lora')")
    adapted = attach_built(model, adapters, builders)
    return attach_expert_adapters(adapted, experts) if experts else adapted


def attach_built(model, adapters, builders=None) -> nnx.Module:
    """A clone of `model` with each [{"path", "kind", "options", "values"}] module built by the registered
    extension builder of its kind around the Linear at `path`, its leaves set to `values` (shapes checked by the
    caller)."""
    builders = registered_extensions() if builders is None else builders
    new = nnx.clone(model)
    for adapter in adapters:
        parent_path, _, key = adapter["path"].rpartition(".")
        parent = node_at(new, parent_path)
        seq = isinstance(parent, cabc.Sequence)
        base = parent[int(key)] if seq else getattr(parent, key)
        module = builders[adapter["kind"]](base, dict(adapter["options"]), rngs=nnx.Rngs(0))
        for leaf, value in adapter["values"].items():
            var = getattr(module, leaf)
            setattr(module, leaf, var.replace(jnp.asarray(value, var.get_value().dtype)))
        if seq:
            parent[int(key)] = module
        else:
            setattr(parent, key, module)
    return new


# ------------------------------------------------------------------------------------ writing
def _target_list(adapted: list[str], names: list[str]) -> list[str]:
    """The shortest PEFT target_modules list (module-name suffixes of 1 or 2 segments, else the full names) that
    selects exactly the `adapted` names among all Linear `names` (PEFT: name == t or name ends with '.' + t)."""
    chosen = set(adapted)
    for depth in (1, 2):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in adapted})
        picks = {n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)}
        if picks == chosen:
            return suffixes
    return sorted(adapted)


def _common(values):
    """(the most common value, {name: value} for the others)."""
    counts = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=lambda v: (counts[v], -list(values.values()).index(v)))
    return common, {re.escape(n): v for n, v in values.items() if v != common}


def to_peft(model, out_dir, *, base_model_name_or_path: str | None = None, overwrite: bool = False,
            lora_dropout: float = 0.0) -> Path:
    """Writes the adapter attached to `model` as a PEFT directory `out_dir` (adapter_config.json +
    adapter_model.safetensors, float32) that `peft.PeftModel.from_pretrained(<the base model in transformers>,
    out_dir)` loads; returns the directory.

    One PEFT adapter has one type: all 'lora' modules (peft_type LORA), all 'dora' (LORA, use_dora) or all 'ia3'
    (IA3; feedforward_modules = the feedforward ones), and one use_rslora (LoRA / DoRA: `lora_dropout`, the training
    setting, recorded in the config; PEFT applies it only in training); ranks and alphas may differ per module
    (written as rank_pattern / alpha_pattern). LoRA on a Mixtral model's stacked expert weights (attach_experts) is
    written as PEFT's target_parameters of transformers' experts (peft_experts: one rank R for them, their scales
    folded into lora_B, so the file's r / lora_alpha are R / R and the Linear modules' own go to the patterns).
    A merged adapter (merge(keep=True)) is written as its adapter weights, to be applied to the unmerged base.
    Refused before anything is written (UnsupportedModel naming the paths): no adapter, mixed kinds, other
    extension modules, modules the HF mapping does not name, expert LoRAs of a model that is not a Mixtral; an
    existing `out_dir` unless `overwrite` (OutputExists); a lora_dropout outside [0, 1) (ConfigError).

    A VirtualTokens model (prompt / prefix tuning) on a base without other adapters is written as PEFT's
    PROMPT_TUNING / PREFIX_TUNING adapter (one tensor `prompt_embeddings`; prefix_projection false; task_type
    CAUSAL_LM for a decoder, FEATURE_EXTRACTION for a Bert)."""
    if isinstance(model, VirtualTokens):
        return _write_virtual_tokens(model, out_dir, base_model_name_or_path, overwrite)
    # NaN fails too (PEFT's nn.Dropout refuses p > 1 on loading)
    if not is_real(lora_dropout) or not 0.0 <= float(lora_dropout) < 1.0:
        raise ConfigError(f"to_peft: lora_dropout must be a number in [0, 1) (the training rate recorded for PEFT), "
                          f"got {lora_dropout!r}")
    family = family_for(model)
    check_consistent(model, "to_peft")
    specs = extension_specs(model)
    adapters = [s for s in specs if s["kind"] in ADAPTER_LEAVES]
    others = [f"{s['path']} ({s['kind']})" for s in specs
              if s["kind"] not in ADAPTER_LEAVES and s["kind"] != EXPERT_LORA_KIND]
    if others:
        raise UnsupportedModel(f"to_peft: the model has extension modules that are not adapters: {_few(others)}; "
                               "a PEFT adapter applies to a plain transformers base")
    experts = expert_adapters(model)  # LoRA on stacked expert weights: PEFT's target_parameters (peft_experts)
    if experts:
        check_mixtral(model, experts, "to_peft")
    if not adapters and not experts:
        raise UnsupportedModel("to_peft: the model has no adapter attached (bricks.adapters.attach / from_peft)")
    kinds = sorted({a["kind"] for a in adapters} | ({"lora"} if experts else set()))
    if len(kinds) > 1:
        by_kind = {k: [a["path"] for a in adapters if a["kind"] == k] for k in kinds}
        raise UnsupportedModel(f"to_peft: one PEFT adapter has one type, but this model mixes {kinds}: "
                               + "; ".join(f"{k} at {_few(v, 3)}" for k, v in by_kind.items()))
    kind = kinds[0]
    modules = linear_modules(model)
    unnamed = [a["path"] for a in adapters if a["path"] not in modules]
    if unnamed:
        raise UnsupportedModel(f"to_peft: the HF {family.name} mapping names no Linear module at {_few(unnamed)}")
    check_overwritable(out_dir, overwrite)
    variables = variables_of(model)
    names = {a["path"]: modules[a["path"]][0] for a in adapters}
    all_names = [name for name, _ in modules.values()]
    targets = _target_list(list(names.values()), all_names)
    tensors = {}
    config: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "task_type": "CAUSAL_LM" if callable(getattr(model, "init_cache", None)) else None,
        "inference_mode": True, "target_modules": targets or None, "exclude_modules": None,
        "fan_in_fan_out": family.name == "gpt2", "modules_to_save": None}
    if kind == "ia3":
        ff = {names[a["path"]] for a in adapters if a["options"]["feedforward"]}
        ff_targets = _target_list(sorted(ff), sorted(names.values())) if ff else []
        ff_picks = {n for n in names.values() if any(n.endswith(t) for t in ff_targets)}  # IA3's rule: no dot
        if ff and (not set(ff_targets) <= set(targets) or ff_picks != ff):  # PEFT: feedforward ⊆ target_modules
            targets = config["target_modules"] = sorted(names.values())
            ff_targets = sorted(ff)
        config.update(peft_type="IA3", feedforward_modules=ff_targets, init_ia3_weights=True)
        for a in adapters:
            scale = np.asarray(variables[a["path"] + ".ia3_scale"].get_value(), np.float32)
            shape = (1, -1) if a["options"]["feedforward"] else (-1, 1)
            tensors[f"{KEY_PREFIX}{names[a['path']]}.ia3_l"] = scale.reshape(shape)
    else:
        rslora = {a["options"]["rslora"] for a in adapters}
        if len(rslora) > 1:
            with_rs = [a["path"] for a in adapters if a["options"]["rslora"]]
            raise UnsupportedModel("to_peft: PEFT's use_rslora is one flag, but these adapters mix rsLoRA and LoRA "
                                   f"scaling: rslora at {_few(with_rs, 3)}")
        use_rslora = rslora.pop() if rslora else False
        ranks = {names[a["path"]]: a["options"]["rank"] for a in adapters}
        alphas = {names[a["path"]]: _json_number(a["options"]["alpha"]) for a in adapters}
        if experts:  # the experts' tensors carry their scales: the file's r and lora_alpha are theirs (scale 1)
            expert_tensors, config["target_parameters"], r = write_expert_tensors(model, experts, KEY_PREFIX)
            tensors.update(expert_tensors)
            alpha = _json_number(math.sqrt(r) if use_rslora else r)
            rank_pattern = {re.escape(n): v for n, v in ranks.items() if v != r}
            alpha_pattern = {re.escape(n): v for n, v in alphas.items() if v != alpha}
        else:
            r, rank_pattern = _common(ranks)
            alpha, alpha_pattern = _common(alphas)
        config.update(peft_type="LORA", r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      use_rslora=use_rslora, use_dora=kind == "dora", bias="none", lora_bias=False,
                      lora_dropout=float(lora_dropout), init_lora_weights=True, layers_to_transform=None, layers_pattern=None)
        for a in adapters:
            p, name = a["path"], f"{KEY_PREFIX}{names[a['path']]}"
            tensors[f"{name}.lora_A.weight"] = np.asarray(variables[p + ".lora_a"].get_value(), np.float32).T
            tensors[f"{name}.lora_B.weight"] = np.asarray(variables[p + ".lora_b"].get_value(), np.float32).T
            if kind == "dora":
                tensors[f"{name}.lora_magnitude_vector"] = np.asarray(variables[p + ".lora_magnitude"].get_value(),
                                                                      np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(out_dir)


def _write_virtual_tokens(model: VirtualTokens, out_dir, base_model_name_or_path, overwrite) -> Path:
    base = model.base
    family_for(base)
    check_consistent(base, "to_peft")
    others = [f"{s['path']} ({s['kind']})" for s in extension_specs(base)]
    if others:
        raise UnsupportedModel(f"to_peft: one PEFT adapter has one type, but the base of these virtual tokens has "
                               f"other adapters or extensions: {_few(others)}")
    check_overwritable(out_dir, overwrite)
    g = virtual_token_geometry(base)
    values = np.asarray(model.values, np.float32)
    p = model.num_virtual_tokens
    config: dict[str, Any] = {
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": prompt_task_type(base),
        "inference_mode": True, "num_virtual_tokens": p, "num_transformer_submodules": 1,
        "num_layers": g["layers"], "modules_to_save": None}
    if model.kind == "prompt":
        config.update(peft_type="PROMPT_TUNING", token_dim=g["hidden"], num_attention_heads=None,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                      tokenizer_kwargs=None)
        tensor = values
    else:
        config.update(peft_type="PREFIX_TUNING", token_dim=g["kv_heads"] * g["head_dim"],
                      num_attention_heads=g["kv_heads"], encoder_hidden_size=g["kv_heads"] * g["head_dim"],
                      prefix_projection=False, init_weights=None)
        tensor = values.reshape(p, -1)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({PROMPT_KEY: np.ascontiguousarray(tensor)}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(out_dir)


def _json_number(x: float):
    """alpha as PEFT writes it: an int when it is one."""
    return int(x) if float(x).is_integer() else float(x)
