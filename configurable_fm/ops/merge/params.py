"""mergekit's parameter resolution (merging.md 1.4), as pure functions of (setting, tensor path, depth).

A *setting* is what a user writes for one parameter:

    0.5                                       a scalar (number, bool or string)
    [0.0, 1.0]  /  [1.0, 0.5, 0.2]            a gradient over depth (numbers: piecewise-linear interpolation)
    [True, False]                             a discrete list: list[int(t·(len−1))]
    [{"filter": "self_attn", "value": 0.3},   conditional entries: the first whose filter is a substring of the
     {"value": 0.5}]                          tensor path (or whose filter is absent or "*") wins; its value may
                                              itself be a gradient

Depth: t = layer_index/(num_layers − 1) for tensors of a layer (t = 1 when there is one layer, as mergekit),
t = 0 for every other tensor (embeddings, final norm, lm_head). A numeric gradient [v_0 .. v_{m−1}] at t is
s = t·(m−1), i = int(s), y = (1 − (s−i))·v_i + (s−i)·v_{min(i+1, m−1)}.

Precedence (highest first): the model's own parameters, then the global `parameters`, then the method's
default; a setting that resolves to None (an empty list, or no conditional entry matching) falls through to the
next level. Shared (non per-model) parameters come from the global `parameters` only.
`resolve_levels` takes the levels and t explicitly (used by `slices:` merges: source > slice > global, t per
slice). Layer indices are read from our dotted paths (`layers.3.mlp...`) and mergekit/HF names (`model.layers.3.mlp...`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from configurable_fm.checks import is_real
from configurable_fm.errors import UserError
from configurable_fm.ops.merge.registry import REQUIRED, MergeMethod

_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)(?:\.|$)")
_COND_KEYS = {"filter", "value"}


class ParameterError(UserError, ValueError):
    """A parameter setting that cannot be resolved; the message names the parameter and the tensor."""


def layer_index(path: str) -> Optional[int]:
    """The layer a tensor belongs to: 'layers.3.mlp.up_proj.kernel' -> 3, 'model.layers.12.x' -> 12, else None."""
    m = _LAYER.search(path)
    return None if m is None else int(m.group(1))


def num_layers_of(paths) -> int:
    """1 + the largest layer index among `paths` (0 when no path is inside a layer)."""
    idx = [i for i in (layer_index(p) for p in paths) if i is not None]
    return max(idx) + 1 if idx else 0


def depth_t(path: str, num_layers: int) -> float:
    """t in [0, 1] of a tensor: layer_index/(num_layers − 1); 1 with a single layer; 0 outside the layers."""
    i = layer_index(path)
    if i is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    if i >= num_layers:
        raise ParameterError(f"tensor {path!r} is in layer {i} but the model has num_layers={num_layers}")
    return i / (num_layers - 1)


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float, bool, str, np.integer, np.floating, np.bool_))


def evaluate(setting: Any, path: str, t: float = 0.0, *, name: str = "parameter") -> Any:
    """The value of one setting for tensor `path` at depth `t` (module docstring), or None if it gives none.

    Raises ParameterError naming the parameter and the tensor for a malformed setting.
    """
    where = f"parameter {name!r} for tensor {path!r}"
    if isinstance(setting, Mapping):
        setting = [setting]
    if setting is None or _is_scalar(setting):
        return setting
    if isinstance(setting, np.ndarray) and setting.ndim == 0:
        return setting.item()
    if isinstance(setting, (list, tuple, np.ndarray)):
        items = list(setting)
        if not items:
            return None
        if all(_is_scalar(e) for e in items):
            if not all(is_real(e) for e in items):
                return items[int(t * (len(items) - 1))]
            scaled = t * (len(items) - 1)
            i0 = int(scaled)
            i1 = min(len(items) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(items[i0]) + frac * float(items[i1])
        if all(isinstance(e, Mapping) for e in items):
            for entry in items:
                unknown = set(entry) - _COND_KEYS
                if unknown or "value" not in entry:
                    raise ParameterError(
                        f"{where}: a conditional entry needs 'value' and an optional 'filter' (substring of the "
                        f"tensor path or '*'), got keys {sorted(entry)}"
                    )
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ParameterError(f"{where}: filter must be a string, got {flt!r}")
                if flt is None or flt == "*" or flt in path:
                    return evaluate(entry["value"], path, t, name=name)
            return None
        raise ParameterError(
            f"{where}: a list must be all numbers/bools/strings (a gradient) or all {{filter, value}} entries, "
            f"got {setting!r}"
        )
    raise ParameterError(f"{where}: unsupported setting {setting!r} of type {type(setting).__name__}")


def resolve(name: str, levels: Sequence[Optional[Mapping[str, Any]]], path: str, t: float = 0.0,
            *, default: Any = REQUIRED, model: Optional[str] = None) -> Any:
    """The first non-None value of `name` over `levels` (highest precedence first), else `default`.

    Raises ParameterError when the parameter is required and no level gives it.
    """
    for level in levels:
        if level is not None and name in level:
            value = evaluate(level[name], path, t, name=name)
            if value is not None:
                return value
    if default is REQUIRED:
        who = f" of model {model!r}" if model is not None else ""
        raise ParameterError(f"missing required parameter {name!r}{who} for tensor {path!r}")
    return default


def check_names(method: MergeMethod, parameters: Optional[Mapping[str, Any]],
                model_parameters: Optional[Sequence[Optional[Mapping[str, Any]]]],
                model_names: Sequence[str]) -> None:
    """Unknown parameter names are an error (never ignored); the message lists the valid ones."""
    per_model, shared = set(method.per_model), set(method.shared)
    valid = per_model | shared
    problems = []
    for key in parameters or {}:
        if key not in valid and not (key == "lambda_" and "lambda" in valid):
            problems.append(f"{key!r} (global)")
    for name, mp in zip(model_names, model_parameters or ()):
        for key in mp or {}:
            if key in shared:
                problems.append(f"{key!r} (model {name!r}: a shared parameter, give it globally)")
            elif key not in per_model:
                problems.append(f"{key!r} (model {name!r})")
    if problems:
        raise ParameterError(
            f"{method.name}: unknown parameter(s) {', '.join(problems)}; per-model: {sorted(per_model)}, "
            f"shared: {sorted(shared)}"
        )


def resolve_for_tensor(method: MergeMethod, path: str, *, parameters: Optional[Mapping[str, Any]] = None,
                       model_parameters: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
                       model_names: Sequence[str], num_layers: int) -> dict[str, Any]:
    """Keyword arguments for `method.kernel` on tensor `path`.

    Shared parameters become Python scalars (from `parameters`, else the method's default); per-model ones a
    concrete float64 numpy array (N,) (model's own setting, then `parameters`, then the default), so that
    count-based kernels (ties, breadcrumbs) compute mergekit's exact int(d·n) (the kernels cast to float32).
    A per-model parameter whose default is None (e.g. passthrough's `scale`) is omitted when no model and no
    global setting gives it.
    """
    model_parameters = list(model_parameters or [None] * len(model_names))
    if len(model_parameters) != len(model_names):
        raise ParameterError(
            f"{method.name}: {len(model_parameters)} model_parameters entries for {len(model_names)} models "
            f"{list(model_names)}"
        )
    return resolve_levels(method, path, t=depth_t(path, num_layers), shared_levels=[parameters],
                          model_levels=[[mp, parameters] for mp in model_parameters], model_names=model_names)


def _lambda_alias(method: MergeMethod, level: Optional[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    if level is None or "lambda_" not in level or "lambda" not in method.shared:
        return level
    level = dict(level)
    level.setdefault("lambda", level.pop("lambda_"))
    return level


def resolve_levels(method: MergeMethod, path: str, *, t: float,
                   shared_levels: Sequence[Optional[Mapping[str, Any]]],
                   model_levels: Sequence[Sequence[Optional[Mapping[str, Any]]]], model_names: Sequence[str],
                   model_paths: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Keyword arguments for `method.kernel` on output tensor `path` at depth `t`, from explicit levels.

    shared_levels: settings dicts, highest precedence first, for the shared parameters (evaluated for `path`);
    model_levels[i]: the same for input i's per-model parameters, evaluated for model_paths[i] (the input's own
    tensor name, as mergekit does; default `path`). Values as `resolve_for_tensor`: shared ones Python scalars,
    per-model ones a float64 array (N,), omitted when the default is None and nothing gives them.
    """
    if len(model_levels) != len(model_names):
        raise ParameterError(f"{method.name}: {len(model_levels)} model levels for {len(model_names)} models "
                             f"{list(model_names)}")
    paths = list(model_paths) if model_paths is not None else [path] * len(model_names)
    shared_levels = [_lambda_alias(method, lv) for lv in shared_levels]
    kwargs: dict[str, Any] = {}
    for pname, default in method.shared.items():
        kwargs[pname] = resolve(pname, shared_levels, path, t, default=default)
        v = kwargs[pname]
        if is_real(v) and not np.isfinite(float(v)):  # NaN or inf: NaN tensors
            raise ParameterError(f"{method.name}: parameter {pname!r} for tensor {path!r} must be finite, got {v!r}")
    for pname, default in method.per_model.items():
        values = [resolve(pname, levels, p, t, default=default, model=m)
                  for m, levels, p in zip(model_names, model_levels, paths)]
        if all(v is None for v in values):
            continue
        bad = [(m, v) for m, v in zip(model_names, values) if not is_real(v) and not isinstance(v, bool)]
        if bad:
            raise ParameterError(
                f"{method.name}: parameter {pname!r} for tensor {path!r} must be a number for every model, got "
                + ", ".join(f"{v!r} for model {m!r}" for m, v in bad)
            )
        kwargs[pname] = np.asarray([float(v) for v in values], np.float64)
        bad = [(m, float(v)) for m, v in zip(model_names, kwargs[pname]) if not np.isfinite(v)]
        if bad:  # a NaN or infinite weight would write NaN tensors
            raise ParameterError(f"{method.name}: parameter {pname!r} for tensor {path!r} must be finite, got "
                                 + ", ".join(f"{v!r} for model {m!r}" for m, v in bad))
    return kwargs
