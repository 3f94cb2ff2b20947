"""mergekit 0.1.5 YAML files (merging.md 1.5) -> a plain, validated merge plan.

    plan = load_mergekit_yaml("ties.yml")      # MergePlan(method, base, models, parameters, dtype, out_dtype)
    stream.merge_checkpoints(plan, "out_dir")

Supported keys (everything else is a `MergekitYamlError` naming the key and its line, never ignored):

    merge_method: ties                 # a method of our registry (registry.get_method)
    base_model: path-or-registry-name
    models:                            # each: {model: REF, parameters: {name: setting}}
      - model: ./ft_a
        parameters: {weight: [0.0, 1.0], density: 0.5}
    slices:                            # instead of `models` (exactly one of the two): layer ranges per slice
      - sources:                       # each: {model: REF, layer_range: [start, end), parameters: {...}}
          - model: ./ft_a
            layer_range: [0, 24]
        parameters: {scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]}   # per-model and shared settings
        base_model: ./ft_a             # optional, overrides the global base_model for this slice
    parameters: {normalize: true, weight: [{filter: mlp, value: 0.3}, {value: 0.5}]}
    dtype: bfloat16                    # inputs are cast to it on load (float16|bfloat16|float32|float64)
    out_dtype: bfloat16                # output cast (default: dtype, else the reference input's dtype)
    tokenizer_source: union            # or base, or a model of the plan: the output vocabulary (vocab.py)
    tokenizer:                         # instead of tokenizer_source (at most one of the two)
      source: union                    # union (default) | base | a model of the plan
      pad_to_multiple_of: 64           # pad the vocabulary rows (and config vocab_size) to a multiple
      tokens:                          # per-token rows: {source: MODEL | {kind: zero} | {kind: model_token,
        <|im_start|>: {source: ft_a, force: true}    #  model, token | token_id}, force: bool}
    chat_template: auto                # auto | chatml | llama3 | alpaca | mistral | exaone | a Jinja string

`tokenizer_source` / `tokenizer` -> `MergePlan.tokenizer` (a TokenizerPlan; model names in `source` and `tokens`
must be models of the plan, as written or as the same directory); the vocabulary tensors are aligned by token
before the merge (stream.py). `chat_template` -> `MergePlan.chat_template` (a name is checked here and resolved
to its text by `chat_template_text`; 'auto' is resolved from the inputs when writing). Without them the
tokenizer donor's files are copied (mergekit's default --copy-tokenizer). `modules` raises NotImplementedError
naming the key and the line.

A model reference is a local HF directory (config.json; relative paths are tried from the working directory,
then from the YAML's directory) or a name of models.registry.MODELS; LoRA (`a+b`) and revision (`a@rev`)
references are refused. Multi-document files (mergekit-multi) are multistage.py's: each document goes through
`parse_mergekit_node`, where a reference equal to a stage's `name` is that stage's output directory.

Model order as mergekit (plan.py normalize_config): the `models:` order; for methods that use the base, the
entry equal to `base_model` is removed from the inputs and becomes the base (its parameters are unused, as in
mergekit); for methods that ignore the base (linear, ...), `base_model` is an ordinary input, appended last when
`models:` does not list it. Setting values are validated for form here (scalar, gradient, {filter, value}
entries) and resolved per tensor later by params.py; parameter names are checked against the method.

`slices:` (ops/merge/slices.py has the semantics) gives a plan with `slices` set: `base` is the global
`base_model` as written (the config and tokenizer donor; for methods that ignore the base its tensors are not
read), `models` every other model referenced (sources and slice-level base models, in order of appearance),
`model_parameters` None for each (settings live in the slices). Checked here, naming the line: a layer_range
outside the model's layers (from its config.json), sources of one slice with different spans, a model twice in
one slice, the method's input count per slice (passthrough: exactly one source), a base that is not one of the
slice's sources, parameter names (sources: per-model ones; slices: per-model and shared).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from configurable_fm.checks import is_int
from configurable_fm.errors import SourceNotFound, UserError
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.chat_templates import CHAT_TEMPLATES
from configurable_fm.ops.merge.registry import MergeMethod, get_method

DTYPES = ("float16", "bfloat16", "float32", "float64")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template")
NOT_IMPLEMENTED_KEYS = {
    "modules": "per-module merges ('modules:') are not implemented; list whole models under 'models:'",
}
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")

MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "parameters", "base_model")
SOURCE_KEYS = ("model", "layer_range", "parameters")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class MergekitYamlError(UserError, ValueError):
    """An invalid or unsupported mergekit YAML; the message names the file, the key and the line."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One input: `name` as written in the YAML; `path` (an HF directory, a .gguf file or an orbax model
    checkpoint: whatever sources.open_source opens) or `registry` (a registry name)."""

    name: str
    path: Optional[Path] = None
    registry: Optional[str] = None
    line: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizerPlan:
    """mergekit's `tokenizer_source: X` (= {source: X}) or `tokenizer: {source, tokens, pad_to_multiple_of}`.

    source: 'union' | 'base' | a model name of the plan; tokens: {token: vocab.TokenOverride} (model names are
    the plan's); base: the YAML's `base_model` name (the tokenizer base and the row rules' merge base, also for
    methods that ignore the base; None: the first model, or for `slices:` the config donor)."""

    source: str = "union"
    tokens: Optional[dict] = None
    pad_to_multiple_of: Optional[int] = None
    base: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A validated merge: `models` are the non-base inputs in mergekit's order, `model_parameters` one dict (or
    None) per model, `parameters` the global settings (raw settings, resolved per tensor by params.py)."""

    method: str
    base: Optional[ModelRef]
    models: tuple[ModelRef, ...]
    model_parameters: tuple[Optional[dict], ...]
    parameters: dict
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    source: str = "<plan>"
    slices: Optional[tuple] = None  # tuple[slices.OutputSlice, ...] for a `slices:` merge (module docstring)
    tokenizer: Optional[TokenizerPlan] = None  # None: the tokenizer donor's files are copied
    chat_template: Optional[str] = None  # 'auto', a name of CHAT_TEMPLATES or a Jinja template

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def refs(self) -> dict[str, ModelRef]:
        """{name: ModelRef} of every model of the plan (the base first)."""
        return {r.name: r for r in ([self.base] if self.base is not None else []) + list(self.models)}


class _Doc:
    """Converts composed YAML nodes to Python values while keeping their lines for error messages."""

    def __init__(self, text: Optional[str], source: str, *, composed: Optional[tuple] = None,
                 stages: Optional[Mapping[str, Path]] = None):
        self.source = source
        self.stages = stages  # {stage name: output directory} of a multi-document file (multistage.py), or None
        if composed is not None:  # (loader, node): one document of a stream composed by the caller
            self.loader, self.root = composed
            return
        self.loader = yaml.SafeLoader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.YAMLError as e:
            raise MergekitYamlError(f"{source}: not a valid single YAML document ({e})") from None
        if self.root is None:  # an empty file, or only comments
            raise MergekitYamlError(f"{source}: the YAML document is empty; 'merge_method' and 'models' (or "
                                    "'slices') are required")

    def line(self, node) -> int:
        return node.start_mark.line + 1

    def error(self, node, msg: str, cls=MergekitYamlError):
        return cls(f"{self.source}, line {self.line(node)}: {msg}")

    def value(self, node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.error(node, f"cannot read value ({e})") from None

    def mapping(self, node, what: str) -> list[tuple[str, Any]]:
        """[(key, value node)] of a mapping node; duplicate or non-string keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping")
        seen, out = set(), []
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str):
                raise self.error(k, f"{what}: keys must be strings, got {key!r}")
            if key in seen:
                raise self.error(k, f"{what}: duplicate key {key!r}")
            seen.add(key)
            out.append((key, v))
        return out


_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")


def _number(v: Any) -> Any:
    """YAML 1.1 reads '1e-3' as a string; mergekit's pydantic validation makes it a number for numeric params."""
    return float(v) if isinstance(v, str) and _FLOAT.match(v.strip()) else v


_TRUE = ("1", "on", "t", "true", "y", "yes")
_FALSE = ("0", "off", "f", "false", "n", "no")


def _setting(doc: _Doc, node, where: str, numeric: bool = False, boolean: bool = False) -> Any:
    """A parameter setting checked for form: scalar | [scalars] | {filter?, value} | [{filter?, value}...].
    With `numeric`, number-like strings ('1e-3') become floats (as mergekit's type validation); with `boolean`
    (a flag such as `normalize`), values become bools as pydantic reads them ('false', 'no', 0 -> False; 'true',
    'yes', 1 -> True) and anything else is an error (a string such as 'false' was truthy)."""
    scalar = (bool, int, float, str)
    conv = _number if numeric else (lambda v: v)
    if boolean:
        def conv(v):
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)) and v in (0, 1):
                return bool(v)
            if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
                return v.strip().lower() in _TRUE
            raise doc.error(node, f"{where}: must be a boolean (true or false), got {v!r}")

    def cond(n):
        entries = dict(doc.mapping(n, where))
        extra = sorted(set(entries) - {"filter", "value"})
        if extra:
            raise doc.error(n, f"{where}: unsupported key(s) {extra} in a conditional entry (only 'filter', "
                               "'value')")
        if "value" not in entries:
            raise doc.error(n, f"{where}: a conditional entry needs 'value'")
        out = {"value": value_or_gradient(entries["value"])}
        if "filter" in entries:
            flt = doc.value(entries["filter"])
            if flt is not None and not isinstance(flt, str):
                raise doc.error(entries["filter"], f"{where}: filter must be a string, got {flt!r}")
            out["filter"] = flt
        return out

    def value_or_gradient(n):
        v = doc.value(n)
        if isinstance(v, scalar):
            return conv(v)
        if isinstance(v, list) and v and all(isinstance(e, scalar) for e in v):
            return [conv(e) for e in v]
        raise doc.error(n, f"{where}: a conditional value must be a scalar or a gradient list, got {v!r}")

    if isinstance(node, yaml.MappingNode):
        return cond(node)
    if isinstance(node, yaml.SequenceNode):
        if node.value and all(isinstance(n, yaml.MappingNode) for n in node.value):
            return [cond(n) for n in node.value]
        v = doc.value(node)
        if all(isinstance(e, scalar) for e in v):
            return [conv(e) for e in v]
        raise doc.error(node, f"{where}: a list must be a gradient (scalars) or {{filter, value}} entries, "
                              f"got {v!r}")
    v = doc.value(node)
    if isinstance(v, scalar):
        return conv(v)
    raise doc.error(node, f"{where}: unsupported value {v!r}")


def _parameters(doc: _Doc, node, where: str, valid: set[str], method: MergeMethod) -> dict:
    out = {}
    if isinstance(node, yaml.ScalarNode) and doc.value(node) is None:
        return out
    for key, vnode in doc.mapping(node, where):
        if key not in valid:
            hint = (" (a shared parameter: give it in the top-level 'parameters')" if key in method.shared
                    else f"; valid here: {sorted(valid)}")
            raise doc.error(vnode, f"unsupported key {key!r} in {where} for merge_method {method.name!r}{hint}")
        name = "lambda" if key == "lambda_" else key
        numeric = name in method.per_model or not isinstance(method.shared.get(name), str)
        boolean = name not in method.per_model and isinstance(method.shared.get(name), bool)
        out[key] = _setting(doc, vnode, f"{where}.{key}", numeric, boolean)
    return out


def _model_ref(doc: _Doc, node, yaml_dir: Optional[Path]) -> ModelRef:
    from configurable_fm.models import registry

    ref = doc.value(node)
    if not isinstance(ref, str) or not ref:
        raise doc.error(node, f"a model reference must be a non-empty string, got {ref!r}")
    if doc.stages is not None and ref in doc.stages:  # a stage's name wins over a path or registry name (mergekit)
        return ModelRef(ref, path=Path(doc.stages[ref]), line=doc.line(node))
    if ref in registry.MODELS:
        return ModelRef(ref, registry=ref, line=doc.line(node))
    candidates = [Path(ref).expanduser()]
    if yaml_dir is not None and not Path(ref).is_absolute():
        candidates.append(yaml_dir / ref)
    from configurable_fm.interop.orbax_io import is_model_checkpoint

    for c in candidates:
        if (c / "config.json").is_file() or (c.suffix == ".gguf" and c.is_file()) or is_model_checkpoint(c):
            return ModelRef(ref, path=c.resolve(), line=doc.line(node))
    hint = ""
    if "+" in ref:
        hint = " (LoRA references 'model+lora' are not implemented)"
    elif "@" in ref:
        hint = " (revisions 'model@rev' are not implemented)"
    elif doc.stages is not None:
        hint = f" nor the name of a stage of this file {sorted(doc.stages)}"
    raise doc.error(node, f"model {ref!r} is neither an HF directory with config.json, a .gguf file, an orbax "
                          f"model checkpoint (model_config.json + params/) nor a registry name "
                          f"{sorted(registry.MODELS)}{hint}")


def parse_mergekit_yaml(text: str, *, source: str = "<yaml>", yaml_dir: Optional[Path] = None) -> MergePlan:
    """The MergePlan of a mergekit YAML text (module docstring); MergekitYamlError / NotImplementedError name the
    key and its line; params.ParameterError / ValueError for the method's contract."""
    return _parse(_Doc(text, source), yaml_dir)


def parse_mergekit_node(loader: yaml.SafeLoader, node: yaml.Node, *, source: str = "<yaml>",
                        yaml_dir: Optional[Path] = None, stages: Optional[Mapping[str, Path]] = None) -> MergePlan:
    """parse_mergekit_yaml of one document already composed by `loader` (one of a multi-document stream: its
    lines are the stream's). `stages`: {name: output directory} of the file's named merges (mergekit-multi); a
    model reference equal to a name is that directory (it need not exist yet), before any path or registry name."""
    return _parse(_Doc(None, source, composed=(loader, node), stages=stages), yaml_dir)


def _parse(doc: _Doc, yaml_dir: Optional[Path]) -> MergePlan:
    source = doc.source
    top = doc.mapping(doc.root, "the top level")
    nodes = {}
    for key, vnode in top:
        if key in NOT_IMPLEMENTED_KEYS:
            raise doc.error(vnode, f"{key!r}: {NOT_IMPLEMENTED_KEYS[key]}", NotImplementedError)
        if key not in TOP_KEYS:
            raise doc.error(vnode, f"unsupported key {key!r}; supported: {list(TOP_KEYS)} (not implemented: "
                                   f"{sorted(NOT_IMPLEMENTED_KEYS)})")
        nodes[key] = vnode
    if "merge_method" not in nodes:
        raise doc.error(doc.root, "'merge_method' is required")
    method_name = doc.value(nodes["merge_method"])
    try:
        method = get_method(str(method_name))
    except ValueError as e:
        raise doc.error(nodes["merge_method"], str(e)) from None
    if "models" in nodes and "slices" in nodes:
        raise doc.error(nodes["slices"], "give exactly one of 'models' and 'slices', not both (line "
                                         f"{doc.line(nodes['models'])} has 'models')")
    if "models" not in nodes and "slices" not in nodes:
        raise doc.error(doc.root, "'models' (a list of {model, parameters}) or 'slices' (a list of {sources, "
                                  "parameters}) is required")

    dtypes = {}
    for key in ("dtype", "out_dtype"):
        if key in nodes:
            v = doc.value(nodes[key])
            v = v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v
            if v is not None and v not in DTYPES:
                raise doc.error(nodes[key], f"{key} must be one of {list(DTYPES)}, got {v!r}")
            dtypes[key] = v

    valid_model = set(method.per_model)
    valid_global = set(method.per_model) | set(method.shared) | ({"lambda_"} if "lambda" in method.shared else set())
    parameters = _parameters(doc, nodes["parameters"], "parameters", valid_global, method) \
        if "parameters" in nodes else {}

    base = _model_ref(doc, nodes["base_model"], yaml_dir) if "base_model" in nodes else None
    if "slices" in nodes:
        plan = _slices_plan(doc, nodes["slices"], method, base, parameters, dtypes, yaml_dir)
        return _with_tokenizer(doc, nodes, plan, None if base is None else base.name, yaml_dir)
    yaml_base = None if base is None else base.name
    mnode = nodes["models"]
    if not isinstance(mnode, yaml.SequenceNode) or not mnode.value:
        raise doc.error(mnode, "'models' must be a non-empty list of {model, parameters}")
    entries: list[tuple[ModelRef, Optional[dict]]] = []
    for item in mnode.value:
        if isinstance(item, yaml.ScalarNode):
            raise doc.error(item, "each entry of 'models' must be a mapping {model: REF, parameters: {...}}")
        fields = dict(doc.mapping(item, "a 'models' entry"))
        for key, vnode in fields.items():
            if key not in MODEL_KEYS:
                raise doc.error(vnode, f"unsupported key {key!r} in a 'models' entry; supported: {list(MODEL_KEYS)}")
        if "model" not in fields:
            raise doc.error(item, "a 'models' entry needs 'model'")
        ref = _model_ref(doc, fields["model"], yaml_dir)
        mp = _parameters(doc, fields["parameters"], f"models[{ref.name!r}].parameters", valid_model, method) \
            if "parameters" in fields else None
        if ref.name in [r.name for r, _ in entries]:
            raise doc.error(item, f"model {ref.name!r} is listed twice in 'models'")
        entries.append((ref, mp or None))

    if method.base == "ignored":
        if base is not None and base.name not in [r.name for r, _ in entries]:
            entries.append((base, None))
        base = None
    elif base is not None:
        entries = [(r, mp) for r, mp in entries if r.name != base.name]
    models = tuple(r for r, _ in entries)
    model_parameters = tuple(mp for _, mp in entries)
    plan = MergePlan(method.name, base, models, model_parameters, parameters, dtypes.get("dtype"),
                     dtypes.get("out_dtype"), source)
    check_contract(plan)
    return _with_tokenizer(doc, nodes, plan, yaml_base, yaml_dir)


def chat_template_text(value: str) -> Optional[str]:
    """The Jinja text of a `chat_template` setting, by mergekit 0.1.5's rules: 'auto' -> None (chosen from the
    inputs when writing); a short single-line string without '{' -> a name of CHAT_TEMPLATES; otherwise a
    literal template, which must contain '{' and have at least 20 characters. ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"chat_template must be a string, got {value!r}")
    if value == "auto":
        return None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[value]
        raise ValueError(f"chat_template {value!r} is not 'auto', a known template name {sorted(CHAT_TEMPLATES)} "
                         "or a Jinja template")
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"chat_template {value[:40]!r}... is neither a template name nor a Jinja template (a "
                         "template has '{' and at least 20 characters)")
    return value


def _plan_model(doc: _Doc, node, value: Any, refs: Mapping[str, ModelRef], yaml_dir: Optional[Path],
                where: str) -> str:
    """The plan's name of a model named in the tokenizer settings: as written, or the same directory."""
    if isinstance(value, str) and value in refs:
        return value
    if isinstance(value, str) and value:
        candidates = [Path(value).expanduser()]
        if yaml_dir is not None and not Path(value).is_absolute():
            candidates.append(yaml_dir / value)
        for c in candidates:
            if (c / "config.json").is_file():
                for name, r in refs.items():
                    if r.path is not None and r.path == c.resolve():
                        return name
    raise doc.error(node, f"{where}: {value!r} is not a model of the merge ({list(refs)})")


def _tokenizer_plan(doc: _Doc, nodes: Mapping[str, Any], refs: Mapping[str, ModelRef], yaml_base: Optional[str],
                    yaml_dir: Optional[Path]) -> Optional[TokenizerPlan]:
    """TokenizerPlan of `tokenizer_source` / `tokenizer` (module docstring), or None."""
    from configurable_fm.ops.merge.vocab import VocabularyError, parse_token_overrides

    ts = nodes.get("tokenizer_source")
    ts_value = None if ts is None else doc.value(ts)
    tk = nodes.get("tokenizer")
    tk_value = None if tk is None else doc.value(tk)
    if ts_value is not None and tk_value is not None:
        raise doc.error(tk, f"give at most one of 'tokenizer_source' (line {doc.line(ts)}) and 'tokenizer'")

    def source(node, value, where):
        if not isinstance(value, str) or not value:
            raise doc.error(node, f"{where} must be 'union', 'base' or a model of the merge, got {value!r}")
        if value in ("union", "base"):
            return value
        return _plan_model(doc, node, value, refs, yaml_dir, where)

    if ts_value is not None:
        return TokenizerPlan(source(ts, ts_value, "tokenizer_source"), base=yaml_base)
    if tk_value is None:
        return None
    fields = dict(doc.mapping(tk, "tokenizer"))
    for key, vnode in fields.items():
        if key not in TOKENIZER_KEYS:
            raise doc.error(vnode, f"unsupported key {key!r} in 'tokenizer'; supported: {list(TOKENIZER_KEYS)}")
    src = source(fields["source"], doc.value(fields["source"]), "tokenizer.source") if "source" in fields \
        else "union"
    pad = doc.value(fields["pad_to_multiple_of"]) if "pad_to_multiple_of" in fields else None
    if pad is not None and (not is_int(pad) or pad < 1):
        raise doc.error(fields["pad_to_multiple_of"], f"tokenizer.pad_to_multiple_of must be a positive integer, "
                                                      f"got {pad!r}")
    tokens = None
    if "tokens" in fields and doc.value(fields["tokens"]) is not None:
        tokens = {}
        for tok, vnode in doc.mapping(fields["tokens"], "tokenizer.tokens"):
            try:
                cfg = parse_token_overrides({tok: doc.value(vnode)})[tok]
            except VocabularyError as e:
                raise doc.error(vnode, f"tokenizer.{e}") from None
            if cfg.model is not None:
                cfg = dataclasses.replace(cfg, model=_plan_model(doc, vnode, cfg.model, refs, yaml_dir,
                                                                 f"tokenizer.tokens[{tok!r}].source"))
            tokens[tok] = cfg
    return TokenizerPlan(src, tokens or None, pad, yaml_base)


def _with_tokenizer(doc: _Doc, nodes: Mapping[str, Any], plan: MergePlan, yaml_base: Optional[str],
                    yaml_dir: Optional[Path]) -> MergePlan:
    """`plan` with its `tokenizer` and `chat_template` from the YAML (validated, naming the line)."""
    tokenizer = _tokenizer_plan(doc, nodes, plan.refs, yaml_base, yaml_dir)
    chat = None
    if "chat_template" in nodes:
        chat = doc.value(nodes["chat_template"])
        if chat is not None:
            try:
                chat_template_text(chat)
            except ValueError as e:
                raise doc.error(nodes["chat_template"], str(e)) from None
    return dataclasses.replace(plan, tokenizer=tokenizer, chat_template=chat)


def _config_layers(ref: ModelRef) -> Optional[int]:
    """The layer count in an HF directory's config.json (None for registry models or without the key)."""
    import json

    if ref.path is None:
        return None
    try:
        config = json.loads((ref.path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _slices_plan(doc: _Doc, snode, method: MergeMethod, base: Optional[ModelRef], parameters: dict,
                 dtypes: dict, yaml_dir: Optional[Path]) -> MergePlan:
    """The MergePlan of a `slices:` list (module docstring); every problem of slices.problems with its line."""
    from configurable_fm.ops.merge import slices as S

    if not isinstance(snode, yaml.SequenceNode) or not snode.value:
        raise doc.error(snode, "'slices' must be a non-empty list of {sources, parameters}")
    valid_model = set(method.per_model)
    valid_slice = set(method.per_model) | set(method.shared) | ({"lambda_"} if "lambda" in method.shared else set())
    refs: dict[str, ModelRef] = {} if base is None else {base.name: base}
    lines: dict[tuple, int] = {}
    out = []
    for i, item in enumerate(snode.value):
        where = f"slices[{i}]"
        fields = dict(doc.mapping(item, where))
        for key, vnode in fields.items():
            if key == "residual_weight":
                raise doc.error(vnode, f"'residual_weight' in {where} is not used by mergekit 0.1.5's merge plan; "
                                       "remove it")
            if key not in SLICE_KEYS:
                raise doc.error(vnode, f"unsupported key {key!r} in {where}; supported: {list(SLICE_KEYS)}")
        if "sources" not in fields:
            raise doc.error(item, f"{where} needs 'sources' (a list of {{model, layer_range}})")
        srcs = fields["sources"]
        if not isinstance(srcs, yaml.SequenceNode) or not srcs.value:
            raise doc.error(srcs, f"{where}.sources must be a non-empty list of {{model, layer_range, parameters}}")
        lines[(i,)] = doc.line(item)
        sources = []
        for j, snode_j in enumerate(srcs.value):
            w = f"{where}.sources[{j}]"
            if not isinstance(snode_j, yaml.MappingNode):
                raise doc.error(snode_j, f"{w} must be a mapping {{model: REF, layer_range: [start, end]}}")
            sf = dict(doc.mapping(snode_j, w))
            for key, vnode in sf.items():
                if key not in SOURCE_KEYS:
                    raise doc.error(vnode, f"unsupported key {key!r} in {w}; supported: {list(SOURCE_KEYS)}")
            for key in ("model", "layer_range"):
                if key not in sf:
                    raise doc.error(snode_j, f"{w} needs {key!r}")
            ref = _model_ref(doc, sf["model"], yaml_dir)
            refs.setdefault(ref.name, ref)
            lr = doc.value(sf["layer_range"])
            if not (isinstance(lr, list) and len(lr) == 2
                    and all(is_int(v) for v in lr)):
                raise doc.error(sf["layer_range"], f"{w}.layer_range must be two integers [start, end), got {lr!r}")
            mp = _parameters(doc, sf["parameters"], f"{w}.parameters", valid_model, method) \
                if "parameters" in sf else None
            sources.append(S.SliceSource(ref.name, (lr[0], lr[1]), mp or None, doc.line(snode_j)))
            lines[(i, j)] = doc.line(snode_j)
            lines[(i, j, "layer_range")] = doc.line(sf["layer_range"])
        sp = _parameters(doc, fields["parameters"], f"{where}.parameters", valid_slice, method) \
            if "parameters" in fields else None
        sbase = None
        if "base_model" in fields:
            bref = _model_ref(doc, fields["base_model"], yaml_dir)
            refs.setdefault(bref.name, bref)
            sbase = bref.name
        out.append(S.OutputSlice(tuple(sources), sp or None, sbase, doc.line(item)))
    counts = {n: c for n, c in ((n, _config_layers(r)) for n, r in refs.items()) if c is not None}
    found = S.problems(method, out, base=None if base is None else base.name, num_layers=counts)
    if found:
        first = f"{doc.source}, line {lines[found[0][0]]}: {found[0][1]}"
        rest = [f"line {lines[loc]}: {msg}" for loc, msg in found[1:]]
        raise MergekitYamlError("\n  ".join([first] + rest))
    models = tuple(r for n, r in refs.items() if base is None or n != base.name)
    return MergePlan(method.name, base, models, (None,) * len(models), parameters, dtypes.get("dtype"),
                     dtypes.get("out_dtype"), doc.source, tuple(out))


def check_contract(plan: MergePlan) -> None:
    """The method's contract (base, input count, parameter names), by a dry run of tree.merge on empty inputs
    (for a `slices:` plan: slices.check on every slice)."""
    from configurable_fm.ops.merge import tree

    if plan.slices is not None:
        from configurable_fm.ops.merge import slices as S

        method = get_method(plan.method)
        S.check(method, plan.slices, base=None if plan.base is None else plan.base.name)
        P.check_names(method, plan.parameters, None, [])
        return
    names = plan.model_names
    if len(set(names)) != len(names):
        raise ValueError(f"{plan.source}: duplicate models {names}")
    tree.merge(plan.method, None if plan.base is None else {}, {n: {} for n in names},
               parameters=plan.parameters, model_parameters=list(plan.model_parameters))


def load_mergekit_yaml(path: str | Path) -> MergePlan:
    """Reads and validates a mergekit YAML file (relative model paths: working directory, then the file's)."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFound(f"mergekit YAML {path} does not exist")
    return parse_mergekit_yaml(path.read_text(), source=str(path), yaml_dir=path.parent)


def plan_from_dict(config: Mapping[str, Any], *, source: str = "<dict>") -> MergePlan:
    """The same validation for an already-loaded dict (e.g. from an experiment config)."""
    return parse_mergekit_yaml(yaml.safe_dump(dict(config), sort_keys=False), source=source)
