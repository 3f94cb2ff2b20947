"""The module tree is the truth: checking a model's config against its tree, deriving it, rebuilding from it.

A family model states its architecture twice: in `model.cfg` (what `build_model(cfg)` makes) and in its module tree
(what it computes). Tree surgery (`bricks.select(m).at(...).apply(fn)`, `bricks.tree_at`) changes only the tree,
while HF export, orbax checkpoints, generation and FLOP counts read the config. This module keeps the two together:

    structure_problems(model)               # [] or one line per path where tree and config-built model differ
    check_consistent(model, "to_hf")        # raises InconsistentModel listing them (save, export, generate call it)
    cfg = config_from_tree(model)           # the config the tree implies (an error when layers differ)
    model = sync_config(model)              # the same arrays in the model that config builds
    model = rebuild(model, {"intermediate_size": 256}, params={path: array, ...})   # a structural change
    model = rebuild(model, {}, options={"dtype": jnp.bfloat16, "remat": "dots"})    # same tree, other options

The reference a tree is compared with is `nnx.eval_shape(lambda: build_model(model.cfg, <the model's build
options>))` with the model's declared extensions attached: the same variable paths (every nnx.Variable type, not only
parameters; sown `nnx.Intermediate` values are transient and ignored), the same shapes, the same module class at
every path, and the same config-derived module attributes (a sub-module's own `cfg`, an MLP's `act`, a norm's `eps`,
a MoE's `k` and `rule`).

Extensions are modules an operation puts into the tree that no config builds (LoRA wrappers, growth masks,
adapters). Such a module describes itself as JSON and is rebuilt from that description:

    class ScaledLinear(nnx.Module):                      # wraps the Linear the config built at its path
        def structure_spec(self):  return {"kind": "scaled_linear", "options": {"init": 1.0}}
        def structure_base(self):  return self.base     # optional: the config-built module it wraps
    register_extension("scaled_linear", lambda base, options, *, rngs: ScaledLinear(base, **options))

`build(base, options, rngs=)` receives the module the config builds at the extension's path (None when the
extension adds a new attribute) and returns the extension module; it runs under `nnx.eval_shape`, so the values it
initialises are placeholders that a checkpoint or the existing tree fills. Extensions nest: they are listed parents
first, and each path names the tree as it is after the earlier ones are attached. `extension_specs(model)` lists
them as [{"path", "kind", "options"}] (orbax's model_config.json stores this list, so such models round-trip).
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import importlib
import inspect
import json
import re
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import jax.numpy as jnp
from flax import nnx

from configurable_fm.errors import UserError
from configurable_fm.models.factory import FAMILIES, build_model, family_name
from configurable_fm.models.layers import Embed, Linear

# Variables that exist only after a call (values sown by `Module.sow`): not architecture, never saved.
TRANSIENT = nnx.Intermediate
# Module attributes that come from the config and change what the module computes.
CONFIG_ATTRIBUTES = ("cfg", "act", "eps", "k", "rule")
# Keyword arguments of a family constructor that are not module options.
_NOT_OPTIONS = frozenset({"cfg", "rngs", "param_dtype", "dtype"})
_MAX_LISTED = 8


class InconsistentModel(UserError, ValueError):
    """A model's module tree disagrees with its config (or cannot be expressed by one config).

    `problems` holds one line per disagreement."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


# ------------------------------------------------------------------------------------ extensions
@runtime_checkable
class Extension(Protocol):
    """A module in the tree that no config builds; see the module docstring.

    structure_spec() -> {"kind": registered kind, "options": JSON object}; optionally structure_base() -> the
    config-built module it wraps (lets `config_from_tree` read the shapes through the wrapper). Both are looked up
    on the class, never on the instance (nnx.Rngs answers any attribute name with a stream)."""

    def structure_spec(self) -> Mapping[str, Any]: ...


ExtensionBuild = Callable[..., nnx.Module]  # build(base: nnx.Module | None, options: dict, *, rngs) -> nnx.Module
_EXTENSIONS: dict[str, ExtensionBuild] = {}
# The package's own extension kinds and the module whose import registers each: a checkpoint that one operation
# wrote (an activation-sparse model, a MoEfied one, adapters, routers) loads in every other command and notebook
# without that operation imported first. A kind outside this table must be registered by its user.
PACKAGE_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(("lora", "dora", "ia3", "expert_lora", "mixed_adapters", "bottleneck"),
                    "configurable_fm.bricks.adapters"),
    "masked_linear": "configurable_fm.models.masked", "masked_rms_norm": "configurable_fm.models.masked",
    "activation_sparsity": "configurable_fm.analysis.sparsity",
    "moefied_mlp": "configurable_fm.analysis.moefication",
    "arrow": "configurable_fm.ops.route", "weighted_adapters": "configurable_fm.ops.route",
}


def register_extension(kind: str, build: ExtensionBuild | None = None, *, replace: bool = False):
    """Registers how to rebuild extension modules of `kind`: build(base, options, *, rngs) -> module.

    Usable as a decorator (`@register_extension("lora")`). Registering another function under a taken kind is an
    error unless `replace`. Returns `build`."""
    if build is None:
        return lambda fn: register_extension(kind, fn, replace=replace)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"an extension kind must be a non-empty string, got {kind!r}")
    if not callable(build):
        raise TypeError(f"register_extension({kind!r}, ...): build must be callable, got {type(build).__name__}")
    old = _EXTENSIONS.get(kind)
    if old is not None and old is not build and not replace:
        raise ValueError(f"extension kind {kind!r} is already registered (to {getattr(old, '__qualname__', old)}); "
                         "pass replace=True to replace it")
    _EXTENSIONS[kind] = build
    _REFERENCES.clear()
    return build


def registered_extensions() -> dict[str, ExtensionBuild]:
    """{kind: build} of every registered extension kind."""
    return dict(_EXTENSIONS)


def extension_build(kind: str) -> ExtensionBuild | None:
    """The build function of `kind`; a kind of this package (PACKAGE_EXTENSIONS) is registered on first use by
    importing its module. None for a kind nobody registered."""
    if kind not in _EXTENSIONS and kind in PACKAGE_EXTENSIONS:
        importlib.import_module(PACKAGE_EXTENSIONS[kind])
    return _EXTENSIONS.get(kind)


def _extension_specs(nodes: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """([{"path", "kind", "options"}] parents first, [problem lines]) of the extension modules among the nodes of
    a tree (`_walk`). Options are normalised through JSON (tuples become lists), as a checkpoint gives them back."""
    specs, problems = [], []
    for path, node in nodes.items():
        if not path or isinstance(node, nnx.Variable) or not callable(getattr(type(node), "structure_spec", None)):
            continue
        what = f"{path} ({type(node).__name__})"
        try:
            spec = node.structure_spec()
        except Exception as e:  # a bug in a user's extension: report it with the path
            problems.append(f"{what}: structure_spec() failed ({type(e).__name__}: {e})")
            continue
        if (not isinstance(spec, Mapping) or not isinstance(spec.get("kind"), str) or set(spec) - {"kind", "options"}
                or not isinstance(spec.get("options", {}), Mapping)):
            problems.append(f"{what}: structure_spec() must return {{'kind': str, 'options': {{...}}}}, got {spec!r}")
            continue
        kind = spec["kind"]
        try:
            options = json.loads(json.dumps(dict(spec.get("options", {}))))
        except (TypeError, ValueError) as e:
            problems.append(f"{what}: the options of extension {kind!r} are not JSON ({e})")
            continue
        if kind not in _EXTENSIONS:
            problems.append(f"{what} is an extension of kind {kind!r}, which is not registered; call "
                            f"models.register_extension({kind!r}, build) (registered: {sorted(_EXTENSIONS)})")
            continue
        specs.append({"path": path, "kind": kind, "options": options})
    return specs, problems


def extension_specs(model) -> list[dict]:
    """The extension modules of `model` as JSON, parents first: [{"path": ..., "kind": ..., "options": {...}}].

    Raises InconsistentModel when an extension's spec is malformed or its kind is not registered."""
    specs, problems = _extension_specs(_walk(model))
    if problems:
        raise InconsistentModel(_listing("extension_specs: cannot describe the extension modules", problems),
                                problems)
    return specs


def attach_extensions(model: nnx.Module, specs) -> nnx.Module:
    """Attaches extensions described by `specs` to a freshly built `model`, in order, IN PLACE; returns it.

    For builders only (inside `nnx.eval_shape`, on a model nothing else holds); use `abstract_model` otherwise."""
    for spec in specs:
        path, kind = spec.get("path"), spec.get("kind")
        build = extension_build(kind) if isinstance(kind, str) else None
        if build is None:
            raise InconsistentModel(f"the extension at {path} has kind {kind!r}, which is not registered; import "
                                    f"the module that registers it (registered: {sorted(_EXTENSIONS)})")
        if not isinstance(path, str) or not path:
            raise InconsistentModel(f"extension {kind!r} has no valid path ({path!r}); the root cannot be one")
        parent_path, _, key = path.rpartition(".")
        parent = node_at(model, parent_path)
        if parent is None:
            raise InconsistentModel(f"extension {kind!r} at {path}: {parent_path} is not in the model its config "
                                    "builds")
        key = int(key) if isinstance(parent, cabc.Sequence) and key.isdigit() else key
        if isinstance(key, int) and key >= len(parent):
            raise InconsistentModel(f"extension {kind!r} at {path}: {parent_path} has only {len(parent)} items")
        base = _child(parent, key)
        new = build(base, dict(spec.get("options") or {}), rngs=nnx.Rngs(0))
        if not isinstance(new, nnx.Module):
            raise TypeError(f"the build function of extension {kind!r} returned a {type(new).__name__} for {path}, "
                            "not an nnx Module")
        if isinstance(parent, (cabc.MutableSequence, cabc.MutableMapping)):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return model


def abstract_model(cfg, extensions=(), *, param_dtype=jnp.float32, dtype=None, **options) -> nnx.Module:
    """The abstract (shape-only) model that `cfg` and the extension specs build (`nnx.eval_shape`)."""
    return nnx.eval_shape(lambda: attach_extensions(
        build_model(cfg, param_dtype=param_dtype, dtype=dtype, **options), extensions))


# ------------------------------------------------------------------------------------ walking the tree
def _key_str(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _walk(model) -> dict[str, Any]:
    """{dotted path: node} for the root ('') and every sub-module and Variable, parents first (transient sown
    values left out). Paths are those of `bricks.paths`."""
    out: dict[str, Any] = {}

    def visit(path: str, node, ancestors: frozenset):
        if isinstance(node, TRANSIENT) or path in out:
            return
        out[path] = node
        if isinstance(node, nnx.Variable) or not isinstance(node, nnx.Pytree) or id(node) in ancestors:
            return
        for key, child in nnx.iter_children(node):
            visit(f"{path}.{_key_str(key)}" if path else _key_str(key), child, ancestors | {id(node)})

    visit("", model, frozenset())
    return out


def _child(parent, key):
    """parent[key] for lists and dicts, getattr otherwise; None when absent."""
    if isinstance(parent, cabc.Sequence):
        return parent[key] if isinstance(key, int) and 0 <= key < len(parent) else None
    if isinstance(parent, cabc.Mapping):
        return parent.get(key)
    return getattr(parent, key, None)


def node_at(model, path: str):
    """The module or Variable at dotted `path` ('' the root; list items by index), None when there is none."""
    node = model
    for seg in path.split(".") if path else ():
        node = _child(node, int(seg) if isinstance(node, cabc.Sequence) and seg.isdigit() else seg)
        if node is None:
            return None
    return node


def _shape(var: nnx.Variable) -> tuple:
    return tuple(getattr(var.get_value(), "shape", ()))


def variables_of(model) -> dict[str, nnx.Variable]:
    """{dotted path: Variable} of every variable of the model, of any type except transient sown values, parents
    first. A Variable reachable by two paths (a shared reference) is listed under both, so a model rebuilt or
    restored from these entries holds two copies."""
    return {p: node for p, node in _walk(model).items() if isinstance(node, nnx.Variable)}


def _variables(model) -> dict[str, Any]:
    """{path: array} of `variables_of(model)`."""
    return {p: var.get_value() for p, var in variables_of(model).items()}


def fill(abstract: nnx.Module, values: Mapping[str, Any]) -> nnx.Module:
    """`abstract` (e.g. from `abstract_model`) with every Variable's value taken from `values` {path: array}.

    Every variable needs a value of its shape; unused values are an error too (both name the paths)."""
    graphdef, state = nnx.split(abstract)
    items, missing, misshaped = [], [], []
    for p, var in nnx.to_flat_state(state):
        key = ".".join(_key_str(k) for k in p)
        if key not in values:
            missing.append(f"{key} {_shape(var)}")
            continue
        value = values[key]
        if tuple(getattr(value, "shape", ())) != _shape(var):
            misshaped.append(f"{key} is {tuple(value.shape)} but the model needs {_shape(var)}")
            continue
        items.append((p, var.replace(value)))
    extra = sorted(set(values) - {".".join(_key_str(k) for k in p) for p, _ in nnx.to_flat_state(state)})
    if missing or misshaped or extra:
        raise ValueError("fill: the values do not match the model: "
                         + "; ".join(filter(None, [missing and f"no value for {_few(missing)}",
                                                   misshaped and _few(misshaped),
                                                   extra and f"no variable at {_few(extra)}"])))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def _few(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------ signatures and comparison
@dataclasses.dataclass(frozen=True)
class _Node:
    """What the comparison looks at in one node: module or variable, its class, a variable's shape, and a
    module's config-derived attributes."""

    is_variable: bool
    type: type
    shape: tuple | None = None
    attrs: tuple = ()


def _signature(nodes: dict[str, Any]) -> dict[str, _Node]:
    """The `_Node` of every node of a tree (`_walk`)."""
    sig = {}
    for path, node in nodes.items():
        if isinstance(node, nnx.Variable):
            sig[path] = _Node(True, type(node), _shape(node))
        else:
            own = vars(node) if hasattr(node, "__dict__") else {}
            sig[path] = _Node(False, type(node), None, tuple((a, own[a]) for a in CONFIG_ATTRIBUTES if a in own))
    return sig


def _config_of(model):
    cfg = getattr(model, "cfg", None)
    family_name(cfg)  # TypeError naming the known configs when it is none of them
    return cfg


def is_family_model(model) -> bool:
    """True when `model.cfg` is the config of a known family (the models these checks apply to)."""
    try:
        _config_of(model)
    except TypeError:
        return False
    return True


def build_options(model) -> dict[str, Any]:
    """The build_model arguments besides the config that reproduce `model`'s tree: param_dtype (of its first
    parameter), dtype (the compute dtype of its first Linear/Embed) and the family's module options (e.g. llama's
    `remat`) read from the same-named attributes of the root."""
    return _build_options(model, _walk(model))


def _build_options(model, nodes: dict[str, Any]) -> dict[str, Any]:
    module_type = FAMILIES[family_name(_config_of(model))][1]
    options: dict[str, Any] = {}
    for node in nodes.values():
        if "param_dtype" not in options and isinstance(node, nnx.Param):
            options["param_dtype"] = getattr(node.get_value(), "dtype", jnp.float32)
        if "dtype" not in options and isinstance(node, (Linear, Embed)):
            options["dtype"] = node.dtype
        if len(options) == 2:
            break
    own = vars(model)
    for name, p in inspect.signature(module_type.__init__).parameters.items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_OPTIONS and name in own:
            options[name] = own[name]
    return options


_REFERENCES: dict = {}  # (cfg, extension specs, options) -> signature of the model they build


def _reference(cfg, specs: list[dict], options: Mapping[str, Any]) -> dict[str, _Node]:
    """Signature of the model `cfg` + extensions build (memoised: generate and the trainer ask often)."""
    key = (cfg, json.dumps(specs, sort_keys=True), tuple(sorted(options.items(), key=lambda kv: kv[0])))
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _REFERENCES:
        return _REFERENCES[key]
    sig = _signature(_walk(abstract_model(cfg, specs, **options)))
    if key is not None:
        if len(_REFERENCES) >= 64:
            _REFERENCES.clear()
        _REFERENCES[key] = sig
    return sig


# Which config fields decide the nodes at a path: the first rule that matches and names a field of the config.
_LAYER = re.compile(r"^(layers|h|encoder\.layer)\.(\d+)(\.|$)")
_HINTS = [(re.compile(p), fields) for p, fields in [
    (r"(^|\.)experts(\.|$)", ("num_experts", "intermediate_size")),
    (r"(^|\.)router(\.|$)", ("num_experts",)),
    (r"\.mlp\.[^.]+\.bias$", ("mlp_bias",)),
    (r"\.o_proj\.bias$", ("o_proj_bias",)),
    (r"\.[qkv]_proj\.bias$", ("attention_bias",)),
    (r"\.(q_proj|o_proj)(\.|$)", ("num_heads", "head_dim")),
    (r"\.(k_proj|v_proj)(\.|$)", ("num_kv_heads", "head_dim")),
    (r"\.act$", ("hidden_act", "activation_function")),
    (r"\.eps$", ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")),
    (r"\.k$", ("num_experts_per_tok",)),
    (r"\.rule$", ("router",)),
    (r"(\.mlp(\.|$)|\.intermediate(\.|$)|^encoder\.layer\.\d+\.output\.dense(\.|$))", ("intermediate_size",)),
    (r"^lm_head(\.|$)", ("tie_word_embeddings", "vocab_size")),
    (r"^pooler(\.|$)", ("add_pooling_layer",)),
    (r"^wpe(\.|$)", ("n_positions",)),
    (r"(^|\.)position_embeddings(\.|$)", ("max_position_embeddings",)),
    (r"(^|\.)token_type_embeddings(\.|$)", ("type_vocab_size",)),
    (r"(^|\.)(embed_tokens|wte|word_embeddings)(\.|$)", ("vocab_size", "hidden_size")),
    (r"\.(attn|self_attn|attention)(\.|$)", ("hidden_size", "num_heads")),
    (r".", ("hidden_size",)),
]]


def _field_value(cfg, name: str):
    if name == "head_dim" and hasattr(cfg, "dim_per_head"):
        return cfg.dim_per_head
    return getattr(cfg, name)


def _hint(cfg, path: str, specs: list[dict]) -> str:
    """' (intermediate_size=128)': the config fields that decide `path`, or the extension it lies in."""
    for spec in reversed(specs):
        if path == spec["path"] or path.startswith(spec["path"] + "."):
            return f" (extension {spec['kind']!r} at {spec['path']}, options {json.dumps(spec['options'])})"
    m = _LAYER.match(path)
    if m and hasattr(cfg, "num_layers") and int(m.group(2)) >= cfg.num_layers:
        return f" (num_layers={cfg.num_layers})"
    for regex, names in _HINTS:
        if regex.search(path):
            present = [n for n in names if hasattr(cfg, n)]
            if present:
                return " (" + ", ".join(f"{n}={_field_value(cfg, n)!r}" for n in present) + ")"
    return ""


def _describe(path: str, sig: dict[str, _Node]) -> str:
    node = sig[path]
    if node.is_variable:
        return f"{node.type.__name__} {node.shape}"
    n = sum(1 for q, v in sig.items() if v.is_variable and q.startswith(path + "."))
    return f"{node.type.__name__}, {n} variable{'s' * (n != 1)}"


def _cfg_difference(a, b) -> str:
    if type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return f"it is {a!r}, model.cfg is {b!r}"
    diffs = [f"{f.name}={getattr(a, f.name)!r} there but {getattr(b, f.name)!r} in model.cfg"
             for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more fields)" if len(diffs) > 4 else "")


def _compare(actual: dict[str, _Node], expected: dict[str, _Node], cfg, specs: list[dict], *,
             compare_cfg: bool = True, there: str = "in the tree", reference: str = "the config") -> list[str]:
    """Lines naming each difference between two signatures; nothing is reported inside a subtree that is
    extra, missing or of another class (its root's line says it)."""
    lines, reported = [], []

    def inside_reported(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") for r in reported)

    for path, a in actual.items():
        if inside_reported(path):
            continue
        e = expected.get(path)
        name = path or "the model"
        hint = _hint(cfg, path, specs)
        if e is None:
            lines.append(f"{name} ({_describe(path, actual)}) is {there} but not in the model {reference} "
                         f"builds{hint}")
            reported.append(path)
        elif a.type is not e.type:
            lines.append(f"{name} is a {a.type.__name__} {there} but a {e.type.__name__} from {reference}{hint}")
            reported.append(path)
        elif a.is_variable and a.shape != e.shape:
            lines.append(f"{name} is {a.shape} {there} but {e.shape} from {reference}{hint}")
        elif not a.is_variable:
            mine, theirs = dict(a.attrs), dict(e.attrs)
            for attr in mine.keys() & theirs.keys():
                if attr == "cfg" and not compare_cfg:
                    continue
                try:
                    same = bool(mine[attr] == theirs[attr])
                except Exception:  # an attribute whose == is not a bool (an array): compare identity
                    same = mine[attr] is theirs[attr]
                if same:
                    continue
                if attr == "cfg":
                    lines.append(f"{path}.cfg disagrees with model.cfg: {_cfg_difference(mine[attr], theirs[attr])}")
                else:
                    lines.append(f"{path}.{attr} is {mine[attr]!r} {there} but {theirs[attr]!r} from {reference}"
                                 f"{_hint(cfg, f'{path}.{attr}', specs)}")
    for path, e in expected.items():
        if path not in actual and not inside_reported(path):
            lines.append(f"{path} ({_describe(path, expected)}) is built by {reference}{_hint(cfg, path, specs)} "
                         f"but missing {there}")
            reported.append(path)
    return lines


# ------------------------------------------------------------------------------------ checking
def structure_problems(model) -> list[str]:
    """Where `model`'s tree differs from what `model.cfg` (+ its declared extensions) builds: one line per path
    that is in one tree but not the other (a whole missing or extra sub-module is one line), per variable whose
    shape differs, per module of another class, and per config-derived attribute that differs (a sub-module's own
    `cfg`, `act`, `eps`, `k`, `rule`). [] for a consistent model. Raises TypeError for a model without a family
    config."""
    cfg = _config_of(model)
    nodes = _walk(model)
    specs, problems = _extension_specs(nodes)
    try:
        reference = _reference(cfg, specs, _build_options(model, nodes))
    except Exception as e:  # a broken extension builder or an invalid config: report it, do not crash the check
        return problems + [f"the model that model.cfg and the extensions build cannot be made "
                           f"({type(e).__name__}: {e})"]
    return problems + _compare(_signature(nodes), reference, cfg, specs)  # the root's class is compared too


def _listing(head: str, problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED]
    more = f"\n  (first {_MAX_LISTED} of {len(problems)} listed)" if len(problems) > _MAX_LISTED else ""
    return head + ":\n  " + "\n  ".join(shown) + more


def check_consistent(model, action: str) -> None:
    """Raises InconsistentModel when `model`'s tree disagrees with `model.cfg` (see `structure_problems`).

    `action` names the caller in the message ("to_hf", "save_model", "generate"); call it before anything is
    written or compiled."""
    problems = structure_problems(model)
    if problems:
        n = len(problems)
        raise InconsistentModel(
            _listing(f"{action}: the module tree disagrees with model.cfg at {n} path{'s' * (n != 1)}", problems)
            + "\nrebuild it with models.sync_config(model) (config from the tree) or models.rebuild(model, "
              "changes, params) (a new config and the arrays it needs)", problems)


# ------------------------------------------------------------------------------------ config from the tree
class _Values:
    """Config field values read at several places of the tree; one config needs them all equal."""

    def __init__(self, family: str):
        self.family = family
        self.seen: dict[str, dict[Any, list[str]]] = {}

    def add(self, where: str, field: str, value) -> None:
        self.seen.setdefault(field, {}).setdefault(_hashable(value), []).append(where)

    def resolve(self) -> dict[str, Any]:
        conflicts, out = [], {}
        for field, by_value in self.seen.items():
            if len(by_value) > 1:
                parts = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
                conflicts.append(f"{field} is " + " but ".join(f"{_unhashable(v)!r} at {_few(w, 6)}"
                                                              for v, w in parts))
            out[field] = _unhashable(next(iter(by_value)))
        if conflicts:
            raise InconsistentModel(_listing(
                f"config_from_tree: one {self.family} config cannot express this tree (its layers differ)",
                conflicts) + "\nmake the layers alike, or keep this model away from to_hf, save_model and generate",
                conflicts)
        return out


class _Box:
    """Wraps an unhashable value so `_Values` can group it."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Box) and self.value == other.value

    def __hash__(self):
        return 0


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return _Box(value)


def _unhashable(value):
    return value.value if isinstance(value, _Box) else value


def _unwrap(node):
    """The config-built module behind extensions that declare the module they wrap (`structure_base()`)."""
    seen = set()
    while callable(getattr(type(node), "structure_base", None)) and id(node) not in seen:
        seen.add(id(node))
        base = node.structure_base()
        if base is None:
            break
        node = base
    return node


def _at(node, rel: str, where: str = ""):
    """The node at dotted path `rel` below `node` (whose own path is `where`), looking through extensions that
    declare their base; InconsistentModel naming the path when the tree lacks it."""
    path = where
    for seg in rel.split("."):
        node = _unwrap(node)
        child = _child(node, int(seg) if isinstance(node, cabc.Sequence) and seg.isdigit() else seg)
        if child is None:
            raise InconsistentModel(f"config_from_tree: {path or 'the model'} ({type(node).__name__}) has no "
                                    f"{seg!r}; the tree does not have the family's layout there")
        node, path = child, f"{path}.{seg}" if path else seg
    return _unwrap(node)


def _shape_at(node, rel: str, where: str = "") -> tuple:
    var = _at(node, rel, where)
    if not isinstance(var, nnx.Variable):
        raise InconsistentModel(f"config_from_tree: {where + '.' if where else ''}{rel} is a {type(var).__name__}, "
                                "not a variable")
    return _shape(var)


def _has_bias(linear) -> bool:
    return isinstance(_child(_unwrap(linear), "bias"), nnx.Variable)


def _eps(node, rel: str, where: str, default) -> Any:
    return getattr(_at(node, rel, where), "eps", default)


def _llama_fields(model, cfg) -> dict[str, Any]:
    vocab, hidden = _shape_at(model, "embed_tokens.embedding")
    layers = list(_at(model, "layers"))
    out = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": len(layers),
           "tie_word_embeddings": _child(model, "lm_head") is None}
    values = _Values("llama")
    values.add("norm", "rms_norm_eps", _eps(model, "norm", "", cfg.rms_norm_eps))
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn, a = _at(layer, "self_attn", p), f"{p}.self_attn"
        acfg = getattr(attn, "cfg", cfg)
        head_dim = acfg.dim_per_head
        q, k = _shape_at(attn, "q_proj.kernel", a), _shape_at(attn, "k_proj.kernel", a)
        if q[1] % head_dim or k[1] % head_dim:
            raise InconsistentModel(f"config_from_tree: {a}.q_proj / k_proj have {q[1]} / {k[1]} outputs, not "
                                    f"multiples of head_dim={head_dim}")
        biases = {n: _has_bias(_at(attn, n, a)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if len({biases["q_proj"], biases["k_proj"], biases["v_proj"]}) > 1:
            raise InconsistentModel(f"config_from_tree: {a} biases some of q/k/v_proj but not all ({biases}); "
                                    "attention_bias covers all three")
        for field, value in [("num_heads", q[1] // head_dim), ("num_kv_heads", k[1] // head_dim),
                             ("head_dim", head_dim), ("attention_bias", biases["q_proj"]),
                             ("o_proj_bias", biases["o_proj"]), ("rope_theta", acfg.rope_theta),
                             ("rope_scaling", acfg.rope_scaling)]:
            values.add(a, field, value)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            values.add(f"{p}.{norm}", "rms_norm_eps", _eps(layer, norm, p, cfg.rms_norm_eps))
        mlp, m = _at(layer, "mlp", p), f"{p}.mlp"
        if _child(mlp, "experts") is not None and _child(mlp, "router") is not None:
            experts, _, f = _shape_at(mlp, "experts.gate_proj", m)
            values.add(m, "num_experts", experts)
            values.add(m, "num_experts_per_tok", getattr(mlp, "k", cfg.num_experts_per_tok))
            values.add(m, "router", getattr(mlp, "rule", cfg.router))
        else:
            f = _shape_at(mlp, "up_proj.kernel", m)[1]
            values.add(m, "num_experts", 0)
            values.add(m, "mlp_bias", _has_bias(_at(mlp, "up_proj", m)))
        values.add(m, "intermediate_size", f)
        values.add(m, "hidden_act", getattr(mlp, "act", cfg.hidden_act))
    out.update(values.resolve())
    head_dim = out.pop("head_dim", cfg.dim_per_head)
    heads = out.get("num_heads", cfg.num_heads)
    implied = out["hidden_size"] // heads if out["hidden_size"] % heads == 0 else None
    out["head_dim"] = None if cfg.head_dim is None and implied == head_dim else head_dim
    return out


def _gpt2_fields(model, cfg) -> dict[str, Any]:
    vocab, width = _shape_at(model, "wte.embedding")
    blocks = list(_at(model, "h"))
    out = {"vocab_size": vocab, "n_embd": width, "n_positions": _shape_at(model, "wpe.embedding")[0],
           "n_layer": len(blocks), "tie_word_embeddings": _child(model, "lm_head") is None}
    values = _Values("gpt2")
    values.add("ln_f", "layer_norm_epsilon", _eps(model, "ln_f", "", cfg.layer_norm_epsilon))
    for i, block in enumerate(blocks):
        p = f"h.{i}"
        acfg = getattr(_at(block, "attn", p), "cfg", cfg)
        for field in ("n_head", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            values.add(f"{p}.attn", field, getattr(acfg, field))
        mlp = _at(block, "mlp", p)
        values.add(f"{p}.mlp", "intermediate_size", _shape_at(mlp, "c_fc.kernel", f"{p}.mlp")[1])
        values.add(f"{p}.mlp", "activation_function", getattr(mlp, "act", cfg.activation_function))
        for norm in ("ln_1", "ln_2"):
            values.add(f"{p}.{norm}", "layer_norm_epsilon", _eps(block, norm, p, cfg.layer_norm_epsilon))
    out.update(values.resolve())
    inner = out.pop("intermediate_size", cfg.intermediate_size)
    out["n_inner"] = None if cfg.n_inner is None and inner == 4 * width else inner
    return out


def _bert_fields(model, cfg) -> dict[str, Any]:
    vocab, hidden = _shape_at(model, "embeddings.word_embeddings.embedding")
    layers = list(_at(model, "encoder.layer"))
    out = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": len(layers),
           "max_position_embeddings": _shape_at(model, "embeddings.position_embeddings.embedding")[0],
           "type_vocab_size": _shape_at(model, "embeddings.token_type_embeddings.embedding")[0],
           "add_pooling_layer": _child(model, "pooler") is not None}
    values = _Values("bert")
    values.add("embeddings.LayerNorm", "layer_norm_eps", _eps(model, "embeddings.LayerNorm", "", cfg.layer_norm_eps))
    for i, layer in enumerate(layers):
        p = f"encoder.layer.{i}"
        values.add(f"{p}.attention.self", "num_heads",
                   getattr(getattr(_at(layer, "attention.self", p), "cfg", cfg), "num_heads"))
        intermediate = _at(layer, "intermediate", p)
        values.add(f"{p}.intermediate", "intermediate_size", _shape_at(layer, "intermediate.dense.kernel", p)[1])
        values.add(f"{p}.intermediate", "hidden_act", getattr(intermediate, "act", cfg.hidden_act))
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            values.add(f"{p}.{norm}", "layer_norm_eps", _eps(layer, norm, p, cfg.layer_norm_eps))
    out.update(values.resolve())
    return out


_DERIVE = {"llama": _llama_fields, "gpt2": _gpt2_fields, "bert": _bert_fields}


def config_from_tree(model):
    """The config the module tree implies: `model.cfg` with its architecture fields read from the tree.

    llama: vocab_size/hidden_size (embedding), num_layers (len(layers)), intermediate_size (MLP or expert
    kernels), num_heads/num_kv_heads (q/k kernel widths over each layer's head_dim), num_experts,
    num_experts_per_tok/router (the MoE modules), tie_word_embeddings (no lm_head), attention/o_proj/mlp bias
    presence, rope and eps and activation from the layers. gpt2: vocab, n_embd, n_positions, n_layer, n_inner,
    n_head and the attention flags (each block's own config), eps, activation, tying. bert: vocab, hidden,
    positions, token types, layers, intermediate_size, heads, activation, eps, pooler. Other fields stay as in
    `model.cfg`. Values that differ between layers (one widened layer) cannot be one config: InconsistentModel
    names the field and the layers.
    """
    cfg = _config_of(model)
    family = family_name(cfg)
    fields = _DERIVE[family](model, cfg)
    try:
        return dataclasses.replace(cfg, **fields)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise InconsistentModel(f"config_from_tree: the {family} config the tree implies is invalid ({e}); "
                                f"derived fields: {fields}") from None


# ------------------------------------------------------------------------------------ rebuilding
def sync_config(model) -> nnx.Module:
    """A new model whose config (root and every sub-module holding one) is `config_from_tree(model)` and whose
    variables are the same arrays; its build options (compute dtype, e.g. remat) and extensions are kept.

    Raises InconsistentModel when the tree holds something that config cannot express (a module of another class,
    an undeclared variable), naming the paths. The result passes `check_consistent`."""
    new_cfg = config_from_tree(model)
    specs = extension_specs(model)
    abstract = abstract_model(new_cfg, specs, **build_options(model))
    lost = _compare(_signature(_walk(model)), _signature(_walk(abstract)), new_cfg, specs, compare_cfg=False,
                    reference="the derived config")
    if lost:
        raise InconsistentModel(_listing("sync_config: the config derived from the tree does not rebuild it", lost),
                                lost)
    return fill(abstract, _variables(model))


def rebuild(model, changes: Mapping[str, Any], params: Mapping[str, Any] | None = None, *,
            options: Mapping[str, Any] | None = None) -> nnx.Module:
    """The model `dataclasses.replace(model.cfg, **changes)` builds (with `model`'s extensions and build options,
    updated by `options`), holding `model`'s arrays where path and shape are unchanged and `params` elsewhere.

    params: flat {path: array} for the new or re-shaped variables (any variable type); an entry for an unchanged
    path replaces the kept array. Variables the new model does not have are dropped (e.g. the layers a smaller
    num_layers removes). Errors name: unknown config fields (with the valid ones), params paths the new model
    lacks, params of the wrong shape, and every new-shaped path left without a value.
    """
    cfg = _config_of(model)
    family = family_name(cfg)
    valid = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(changes) - set(valid))
    if unknown:
        raise ValueError(f"rebuild: unknown {family} config field(s) {unknown}; valid fields: {valid}")
    try:
        new_cfg = dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ValueError(f"rebuild: {dict(changes)} makes an invalid {family} config ({e})") from None
    specs = extension_specs(model)
    abstract = abstract_model(new_cfg, specs, **{**build_options(model), **dict(options or {})})
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in _variables(abstract).items()}
    old = _variables(model)
    params = dict(params or {})
    lacking = [k for k in params if k not in shapes]
    if lacking:
        raise KeyError(f"rebuild: the new model has no variable at {_few(lacking)}; it has e.g. {_few(shapes, 5)}")
    values, missing, misshaped = {}, [], []
    for path, shape in shapes.items():
        if path in params:
            got = tuple(getattr(params[path], "shape", ()))
            if got != shape:
                misshaped.append(f"{path} is {got} in params but the new model needs {shape}")
            values[path] = params[path]
        elif path in old and tuple(getattr(old[path], "shape", ())) == shape:
            values[path] = old[path]
        else:
            was = f", was {tuple(old[path].shape)}" if path in old else ", new"
            missing.append(f"{path} {shape}{was}")
    if misshaped:
        raise ValueError("rebuild: mis-shaped params: " + "; ".join(misshaped[:_MAX_LISTED]))
    if missing:
        raise ValueError(f"rebuild: {changes} needs values for {len(missing)} new or re-shaped variable(s): "
                         f"{_few(missing)}; pass them as params={{path: array}}")
    return fill(abstract, values)

