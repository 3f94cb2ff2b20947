"""mergekit `slices:` (frankenmerges, depth up-scaling, slice-wise merges) as a plan of per-tensor tasks.

    slices = [OutputSlice([SliceSource("A", (0, 24))]),
              OutputSlice([SliceSource("A", (8, 32), {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1}]})])]
    tasks, num_layers = plan_tensors(get_method("passthrough"), slices, {"A": names_of_A})   # 48 output layers

Semantics of mergekit 0.1.5 (plan.py, config.py):
- slice i contributes L_i = b − a output layers (every source of a slice spans the same L_i), numbered
  consecutively across slices; output layer j = (Σ_{i'<i} L_{i'}) + k merges layer a_s + k of every source s
  with the method; a tensor's layer number is rewritten in its name (`model.layers.N.` / our `layers.N.`).
- depth for gradients: t = k/(L_i − 1) inside slice i (t = 1 for a one-layer slice); t = 0 outside the layers.
- the tensors outside the layers are merged from the first slice's sources (those before the layers:
  embeddings, `PRE_TENSORS`) and from the last slice's sources (all the others: final norm, lm_head), with that
  slice's parameters and t = 0. As mergekit, the last slice's sources are cut to as many as the first slice has.
- parameter precedence: the source's `parameters` > the slice's `parameters` > the global `parameters` > the
  method's default; shared parameters come from the slice's and the global level only. Per-model settings are
  evaluated on the input tensor's name (its own layer number), shared ones on the output name (mergekit).
- base: the slice's `base_model`, else the global one; for methods that use a base it must be one of the slice's
  sources (that source becomes the base, its parameters unused); methods that ignore the base take every source.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

from configurable_fm.checks import is_int
from configurable_fm.errors import UserError
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.registry import MergeMethod

# Substrings of tensors outside the layers that come before them (merged from the first slice); every other
# non-layer tensor (final norm, lm_head, pooler) comes after them (merged from the last slice).
PRE_TENSORS = ("embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "position_embeddings",
               "token_type_embeddings", "tok_embeddings", "embeddings.")
_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d+)(?:\.|$)")


class SliceError(UserError, ValueError):
    """Invalid slices; the message names the slice, the source and the model."""


@dataclasses.dataclass(frozen=True)
class SliceSource:
    """Layers [a, b) of input `model` (a name), with its own settings (`parameters`, highest precedence)."""

    model: str
    layer_range: tuple[int, int]
    parameters: Optional[Mapping[str, Any]] = None
    line: int = 0  # YAML line of the entry (0: not from YAML)

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    """One output slice: its sources, its settings and an optional slice-level base model (a name)."""

    sources: tuple[SliceSource, ...]
    parameters: Optional[Mapping[str, Any]] = None
    base_model: Optional[str] = None
    line: int = 0

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


@dataclasses.dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made.

    name: the output tensor name; base: (model, input tensor name) or None; inputs: the non-base
    (model, input tensor name) pairs in the slice's source order; t: depth for gradients; shared_levels /
    model_levels: the settings dicts by precedence (params.resolve_levels); slice_index, layer_offset k and
    slice_layers L locate a layer tensor (None for the tensors outside the layers).
    """

    name: str
    base: Optional[tuple[str, str]]
    inputs: tuple[tuple[str, str], ...]
    t: float
    shared_levels: tuple[Optional[Mapping[str, Any]], ...]
    model_levels: tuple[tuple[Optional[Mapping[str, Any]], ...], ...]
    slice_index: Optional[int] = None
    layer_offset: Optional[int] = None
    slice_layers: Optional[int] = None

    @property
    def models(self) -> list[str]:
        return [m for m, _ in self.inputs]

    def resolve(self, method: MergeMethod) -> dict[str, Any]:
        """Keyword arguments of `method.kernel` for this tensor (params.resolve_levels)."""
        return P.resolve_levels(method, self.name, t=self.t, shared_levels=self.shared_levels,
                                model_levels=self.model_levels, model_names=self.models,
                                model_paths=[n for _, n in self.inputs])


# ------------------------------------------------------------------------------------------------- construction
def as_slices(slices: Sequence[Any]) -> tuple[OutputSlice, ...]:
    """OutputSlice objects from OutputSlice objects or mergekit-style dicts
    {"sources": [{"model", "layer_range": [a, b], "parameters"}], "parameters", "base_model"}."""
    if isinstance(slices, (str, Mapping)) or not isinstance(slices, Sequence) or not slices:
        raise SliceError(f"slices must be a non-empty list of slices, got {slices!r}")
    out = []
    for i, s in enumerate(slices):
        if isinstance(s, OutputSlice):
            out.append(s)
            continue
        if not isinstance(s, Mapping):
            raise SliceError(f"slices[{i}] must be a mapping {{sources, parameters, base_model}}, got {s!r}")
        unknown = sorted(set(s) - {"sources", "parameters", "base_model"})
        if unknown:
            raise SliceError(f"slices[{i}]: unknown key(s) {unknown}; valid: ['base_model', 'parameters', 'sources']")
        srcs = s.get("sources")
        if isinstance(srcs, (str, Mapping)) or not isinstance(srcs, Sequence) or not srcs:
            raise SliceError(f"slices[{i}].sources must be a non-empty list of {{model, layer_range}}, got {srcs!r}")
        sources = []
        for j, src in enumerate(srcs):
            where = f"slices[{i}].sources[{j}]"
            if isinstance(src, SliceSource):
                sources.append(src)
                continue
            if not isinstance(src, Mapping):
                raise SliceError(f"{where} must be a mapping {{model, layer_range, parameters}}, got {src!r}")
            unknown = sorted(set(src) - {"model", "layer_range", "parameters"})
            if unknown or "model" not in src or "layer_range" not in src:
                raise SliceError(f"{where} needs 'model' and 'layer_range' (and optional 'parameters'), got keys "
                                 f"{sorted(src)}")
            sources.append(SliceSource(str(src["model"]), _layer_range(src["layer_range"], where),
                                       src.get("parameters") or None))
        out.append(OutputSlice(tuple(sources), s.get("parameters") or None, s.get("base_model")))
    return tuple(out)


def _layer_range(value, where: str) -> tuple[int, int]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(is_int(v) for v in value))
    if not ok:
        raise SliceError(f"{where}.layer_range must be two integers [start, end), got {value!r}")
    return int(value[0]), int(value[1])


def slice_base(method: MergeMethod, sl: OutputSlice, base: Optional[str]) -> Optional[str]:
    """The base of a slice: its own base_model, else the global one; None when the method ignores the base."""
    if method.base == "ignored":
        return None
    return sl.base_model if sl.base_model is not None else base


def problems(method: MergeMethod, slices: Sequence[OutputSlice], *, base: Optional[str] = None,
             num_layers: Optional[Mapping[str, int]] = None) -> list[tuple[tuple, str]]:
    """Every problem of `slices` as (location, message); location is (i,) for slice i or (i, j) for its
    source j, and (i, j, "layer_range") for a range. num_layers: {model: layer count} where known."""
    out: list[tuple[tuple, str]] = []
    for i, sl in enumerate(slices):
        if not sl.sources:
            out.append(((i,), f"slices[{i}] has no sources"))
            continue
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            where = f"slices[{i}].sources[{j}].layer_range [{a}, {b}] of model {src.model!r}"
            n = None if num_layers is None else num_layers.get(src.model)
            if a < 0 or b <= a:
                out.append(((i, j, "layer_range"), f"{where} must satisfy 0 <= start < end"))
            elif n is not None and b > n:
                out.append(((i, j, "layer_range"), f"{where} is out of the model's range: it has {n} layers "
                                                   f"(0..{n - 1})"))
        spans = [s.num_layers for s in sl.sources]
        if len(set(spans)) > 1:
            listed = ", ".join(f"{s.model!r} [{s.layer_range[0]}, {s.layer_range[1]}) = {s.num_layers}"
                               for s in sl.sources)
            out.append(((i,), f"slices[{i}]: all sources of a slice must span the same number of layers, got "
                              f"{listed}"))
        names = [s.model for s in sl.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            out.append(((i,), f"slices[{i}]: model(s) {dup} appear more than once among the sources (mergekit "
                              "refuses duplicate inputs in one tensor group)"))
        b = slice_base(method, sl, base)
        if b is not None and b not in names:
            out.append(((i,), f"slices[{i}]: base model {b!r} is not one of the slice's sources {names} "
                              f"({method.name} merges the base with the other sources)"))
        if method.base == "required" and b is None:
            out.append(((i,), f"slices[{i}]: {method.name} needs a base model (base_model, globally or in the "
                              "slice, naming one of its sources)"))
        n_inputs = len(names) - (1 if b is not None and b in names else 0)
        if n_inputs < method.min_inputs or (method.max_inputs is not None and n_inputs > method.max_inputs):
            want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                    else f"at least {method.min_inputs}" if method.max_inputs is None
                    else f"{method.min_inputs}..{method.max_inputs}")
            what = "source" if b is None else "non-base source"
            out.append(((i,), f"slices[{i}]: {method.name} needs {want} {what}(s) per slice, got {n_inputs} "
                              f"({names})"))
        for j, src in enumerate(sl.sources):
            try:
                P.check_names(method, None, [src.parameters], [f"{src.model} in slices[{i}].sources[{j}]"])
            except P.ParameterError as e:
                out.append(((i, j), str(e)))
        try:
            P.check_names(method, sl.parameters, None, [])
        except P.ParameterError as e:
            out.append(((i,), f"slices[{i}].parameters: {e}"))
    return out


def check(method: MergeMethod, slices: Sequence[OutputSlice], *, base: Optional[str] = None,
          num_layers: Optional[Mapping[str, int]] = None) -> None:
    """Raises SliceError listing every problem of `problems`."""
    found = problems(method, slices, base=base, num_layers=num_layers)
    if found:
        raise SliceError(f"invalid slices for {method.name}:\n  " + "\n  ".join(m for _, m in found))


# ---------------------------------------------------------------------------------------------------- planning
def layer_template(name: str) -> Optional[tuple[str, int]]:
    """'model.layers.5.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 5); None outside layers."""
    m = _LAYER.search(name)
    if m is None:
        return None
    s, e = m.span(1)
    return name[:s].replace("{", "{{").replace("}", "}}") + "{}" + name[e:].replace("{", "{{").replace("}", "}}"), \
        int(m.group(1))


def layers_of(names: Sequence[str]) -> dict[int, list[str]]:
    """{layer index: [templates in `names` order]} of the tensors inside layers."""
    out: dict[int, list[str]] = {}
    for n in names:
        lt = layer_template(n)
        if lt is not None:
            out.setdefault(lt[1], []).append(lt[0])
    return out


def _task(method, name, sl_index, sl, models_in: Sequence[SliceSource], base, parameters, t, input_names,
          k=None) -> TensorTask:
    b = slice_base(method, sl, base)
    base_pair, inputs, levels = None, [], []
    for src, in_name in zip(models_in, input_names):
        if b is not None and src.model == b:
            base_pair = (src.model, in_name)
            continue
        inputs.append((src.model, in_name))
        levels.append((src.parameters, sl.parameters, parameters))
    return TensorTask(name, base_pair, tuple(inputs), float(t), (sl.parameters, parameters), tuple(levels),
                      sl_index if k is not None else None, k, sl.num_layers if k is not None else None)


def plan_tensors(method: MergeMethod, slices: Sequence[OutputSlice], names: Mapping[str, Sequence[str]], *,
                 base: Optional[str] = None, parameters: Optional[Mapping[str, Any]] = None,
                 reference: Optional[str] = None, pre_tensors: Sequence[str] = PRE_TENSORS
                 ) -> tuple[list[TensorTask], int]:
    """The tasks of every output tensor (tensors before the layers, the layers in output order, the tensors
    after them) and the number of output layers.

    names: {model: its tensor names}; reference: the model whose tensors outside the layers are written (the
    config donor: default the global base, else the first slice's first source). A tensor missing in a source
    is a tree.MergeInputError listing every one.
    """
    from configurable_fm.ops.merge.tree import MergeInputError

    slices = tuple(slices)
    check(method, slices, base=base, num_layers={m: P.num_layers_of(n) for m, n in names.items()})
    reference = reference or base or slices[0].sources[0].model
    have = {m: set(n) for m, n in names.items()}
    layers = {m: layers_of(n) for m, n in names.items()}
    missing: list[str] = []
    unknown = sorted({s.model for sl in slices for s in sl.sources} - set(names))
    if unknown or reference not in names:
        raise MergeInputError(f"no tensors for model(s) {unknown or [reference]}; known: {sorted(names)}")

    def need(model: str, tensor: str) -> None:
        if tensor not in have[model]:
            missing.append(f"tensor {tensor} is missing in {model}")

    outer = [n for n in names[reference] if layer_template(n) is None]
    pre = [n for n in outer if any(s in n for s in pre_tensors)]
    post = [n for n in outer if n not in pre]
    first, last = slices[0], slices[-1]
    tasks: list[TensorTask] = []
    for n in pre:
        for s in first.sources:
            need(s.model, n)
        tasks.append(_task(method, n, 0, first, first.sources, base, parameters, 0.0, [n] * len(first.sources)))
    j = 0
    for i, sl in enumerate(slices):
        length = sl.num_layers
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            src0 = sl.sources[0]
            templates = layers[src0.model].get(src0.layer_range[0] + k, [])
            if not templates:
                missing.append(f"layer {src0.layer_range[0] + k} of {src0.model} has no tensors (slices[{i}])")
            for tmpl in templates:
                ins = [tmpl.format(s.layer_range[0] + k) for s in sl.sources]
                for s, n in zip(sl.sources, ins):
                    need(s.model, n)
                tasks.append(_task(method, tmpl.format(j), i, sl, sl.sources, base, parameters, t, ins, k))
            for s in sl.sources[1:]:
                extra = sorted(set(layers[s.model].get(s.layer_range[0] + k, [])) - set(templates))
                missing += [f"tensor {e.format(s.layer_range[0] + k)} of {s.model} has no counterpart in layer "
                            f"{src0.layer_range[0] + k} of {src0.model} (slices[{i}])" for e in extra]
            j += 1
    last_sources = last.sources[:len(first.sources)]  # mergekit zips the last slice with the first one's weights
    last_base = slice_base(method, last, base)
    if last_base is not None and last_base not in [s.model for s in last_sources]:
        missing.append(f"the tensors after the layers merge the first {len(first.sources)} source(s) of the last "
                       f"slice (as many as the first slice has, as mergekit), which leave out its base {last_base!r}")
    for n in post:
        for s in last_sources:
            need(s.model, n)
        tasks.append(_task(method, n, len(slices) - 1, last, last_sources, base, parameters, 0.0,
                           [n] * len(last_sources)))
    if missing:
        raise MergeInputError("cannot plan the slices:\n  " + "\n  ".join(missing))
    return tasks, j


def check_shapes(tasks: Sequence[TensorTask], shape) -> None:
    """Every input of every task has the same shape (shape(model, tensor name) -> tuple); one
    tree.MergeInputError lists all mismatches, naming the output tensor and each input."""
    from configurable_fm.ops.merge.tree import MergeInputError

    bad = []
    for task in tasks:
        pairs = ([task.base] if task.base is not None else []) + list(task.inputs)
        shapes = [tuple(shape(m, n)) for m, n in pairs]
        if len(set(shapes)) > 1:
            bad.append(f"shape mismatch for {task.name}: " + ", ".join(f"{n} is {s} in {m}"
                                                                         for (m, n), s in zip(pairs, shapes)))
    if bad:
        raise MergeInputError("cannot merge the slices:\n  " + "\n  ".join(bad))


def resolve_all(method: MergeMethod, tasks: Sequence[TensorTask], *, source: str = "slices") -> list[dict]:
    """The resolved parameters of every task, before anything is read; a setting that fails for some tensors
    is one params.ParameterError listing them (at most 20)."""
    out, errors = [], []
    for task in tasks:
        try:
            out.append(task.resolve(method))
        except P.ParameterError as e:
            errors.append(str(e))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise P.ParameterError(f"{source}: {len(errors)} tensor(s) cannot be merged with these parameters:\n  "
                               + "\n  ".join(errors[:20]) + more)
    return out
