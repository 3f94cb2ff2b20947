"""The model as the trainer holds it: three partitions of its variables, and the state carried between steps.

Every nnx.Variable of the model (at its dotted path, `layers.3.mlp.down_proj.kernel`) is in exactly one
partition:
    trainable : selected by `config.trainable`; differentiated, updated by the optimizer, in its state;
    frozen    : the other parameters (nnx.Param and subclasses): constants of the step, no gradient, no
                optimizer state, not checkpointed (rebuilt from the initial model on resume);
    other     : the other variables (non-Param nnx.Variable subclasses: masks, statistics, ...): carried
                through the step unchanged unless the task assigns them, and checkpointed.

Selectors (`config.trainable`, a tuple; the union of what each entry selects):
    'GLOB'        the parameters (nnx.Param and its subclasses) whose dotted path matches GLOB
                  (bricks.select globs: '*' within a segment, '**' any number of segments);
    'TYPE:GLOB'   the variables of type TYPE (a class name, matched against the variable's class and its
                  bases, so 'Param:' includes LoRA-style Param subclasses and 'Variable:' is everything)
                  whose path matches GLOB.
E.g. ('**',) every parameter (the default); ('layers.*.mlp.**',) MLP bricks; ('LoRAParam:**',) LoRA factors
only; ('**', 'MaskRamp:**') every parameter and every MaskRamp variable. New variable kinds need no code here.
Each entry must select something; trainable variables must have a floating dtype.

`ModelParts.merge(trainable, frozen, other)` rebuilds the model from {path: array} dicts covering every
variable (the graphdef keeps each variable's type and metadata). `TrainState` (step, trainable, opt_state,
other) is what one training step maps to the next.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.paths import path_str
from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.errors import ConfigError


class TrainState(NamedTuple):
    """What a step carries: step (int32, the number of steps done), trainable ({path: array}), opt_state (the
    optimizer's state over `trainable`), other ({path: array}, the 'other' partition)."""

    step: jax.Array
    trainable: dict
    opt_state: Any
    other: dict


def variable_values(model) -> dict[str, jax.Array]:
    """{dotted path: value} of every variable of `model` (any type), in the model's order."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def type_names(var_type: type) -> set[str]:
    """The names a 'TYPE:' selector may use for variables of `var_type`: its class and its bases."""
    return {c.__name__ for c in var_type.__mro__}


def parse_selector(entry: str) -> tuple[str, str]:
    """'layers.*.mlp.**' -> ('Param', 'layers.*.mlp.**'); 'LoRAParam:**' -> ('LoRAParam', '**')."""
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"trainable entry {entry!r} is not a glob or 'TYPE:GLOB' string")
    if ":" in entry:
        kind, glob = entry.split(":", 1)
        if not kind.isidentifier() or not glob:
            raise ConfigError(f"trainable entry {entry!r}: expected 'TYPE:GLOB', e.g. 'LoRAParam:**'")
        return kind, glob
    return "Param", entry


def select_variables(types: dict[str, type], selectors: Sequence[str]) -> list[str]:
    """The paths of `types` ({path: variable type}) selected by any of `selectors` (module docstring), in the
    model's order; an entry that selects nothing is an error naming it."""
    if isinstance(selectors, str):
        selectors = (selectors,)
    chosen: set[str] = set()
    for entry in selectors:
        kind, glob = parse_selector(entry)
        of_kind = [p for p, t in types.items() if kind in type_names(t)]
        if not of_kind:
            present = sorted({t.__name__ for t in types.values()})
            raise ConfigError(f"trainable entry {entry!r}: the model has no variable of type {kind}; "
                             f"its variable types: {present}")
        hits = {p for p in of_kind if re.fullmatch(glob_to_regex(glob), p)}
        if not hits:
            what = "parameter" if ":" not in entry else f"{kind} variable"
            raise ConfigError(f"trainable glob {entry!r} matches no {what}; e.g. {of_kind[:4]}")
        chosen |= hits
    return [p for p in types if p in chosen]


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model as (graphdef, the dotted paths of its variables in three partitions); `merge` rebuilds it.

    `ModelParts.of(model, trainable=('**',))` selects with `config.trainable` selectors (module docstring)."""

    graphdef: Any
    keys: dict[str, tuple]  # every variable: dotted path -> nnx path tuple
    types: dict[str, type]  # dotted path -> variable type
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    other: tuple[str, ...]

    @classmethod
    def of(cls, model, trainable: Sequence[str] = ("**",)) -> "ModelParts":
        graphdef, state = nnx.split(model)
        flat = list(nnx.to_flat_state(state))
        keys = {path_str(p): p for p, _ in flat}
        types = {path_str(p): type(v) for p, v in flat}
        chosen = select_variables(types, trainable)
        values = {path_str(p): v.get_value() for p, v in flat}
        not_float = [p for p in chosen if not jnp.issubdtype(jnp.result_type(values[p]), jnp.floating)]
        if not_float:
            raise ConfigError(f"trainable variables must be floating point; not: "
                             f"{[(p, str(jnp.result_type(values[p]))) for p in not_float[:6]]}")
        picked = set(chosen)
        frozen = tuple(p for p in keys if p not in picked and issubclass(types[p], nnx.Param))
        other = tuple(p for p in keys if p not in picked and not issubclass(types[p], nnx.Param))
        return cls(graphdef, keys, types, tuple(chosen), frozen, other)

    def split(self, model) -> tuple[dict, dict, dict]:
        """(trainable, frozen, other) {path: array} dicts of `model` (of this structure)."""
        values = variable_values(model)
        return tuple({k: values[k] for k in names} for names in (self.trainable, self.frozen, self.other))

    def merge(self, *flats: dict) -> nnx.Module:
        """The model whose variables hold the values of the {path: array} dicts `flats` (together: every path)."""
        items = {k: v for flat in flats for k, v in flat.items()}
        if len(items) != len(self.keys):
            missing = [k for k in self.keys if k not in items]
            unknown = [k for k in items if k not in self.keys]
            raise KeyError(f"ModelParts.merge: missing variables {missing[:6]}, unknown {unknown[:6]}")
        return nnx.merge(self.graphdef, nnx.from_flat_state([(self.keys[k], items[k]) for k in self.keys]))

    def read_other(self, model, like: dict) -> dict:
        """The 'other' partition of `model` (e.g. after a task assigned some of it), cast to the dtypes of `like`;
        a changed shape is an error naming the variable."""
        values = variable_values(model)
        out = {}
        for k in self.other:
            v = jnp.asarray(values[k])
            if v.shape != like[k].shape:
                raise ValueError(f"the task changed the shape of variable {k} from {like[k].shape} to {v.shape}")
            out[k] = v.astype(like[k].dtype)
        return out
