"""Bricks: named sub-trees of a model's parameters with metadata, and brick sets on disk.

    mlps = extract(model, "layers.*.mlp", source="smollm2-135m")   # one Brick per selected module
    save_bricks(mlps, "out/mlps")                                   # bricks.safetensors + bricks.json
    model2 = insert(other_model, load_bricks("out/mlps"))           # a new model; shapes checked

A `Brick` is (name, kind, source, params, metadata): `params` maps parameter paths *relative to the brick*
(`down_proj.kernel`) to arrays. `extract` names each brick by its module path (`layers.3.mlp`), which is
also where `insert` puts it back (override with `at={name: path}`).

On disk a brick set is a directory of two files, written atomically:
* `bricks.safetensors`: one tensor per parameter, named `<brick>/<relative path>` (`layers.3.mlp/down_proj.kernel`);
* `bricks.json`: `{"format": "configurable_fm.bricks", "version": 1, "bricks": {name: {"kind", "source",
  "metadata", "params": {relative path: {"shape": [...], "dtype": "bfloat16"}}}}}`, in brick order.
`load_bricks` checks one against the other and reports every disagreement at once. Nothing uses pickle;
metadata must be JSON data (tuples come back as lists).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.bricks.select import Selection, SelectionError, module_index, select
from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore, read_json_object

FORMAT = "configurable_fm.bricks"
VERSION = 1
TENSORS_FILE = "bricks.safetensors"
INDEX_FILE = "bricks.json"


def _check_name(name, what: str) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{what} must be a non-empty string without '/', got {name!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Brick:
    """A named sub-tree of a model's parameters: {relative param path: array} plus what it is and where it
    came from. Immutable (params and metadata are read-only mappings)."""

    name: str  # where it lives in its model, e.g. 'layers.3.mlp'
    kind: str  # what it is, e.g. 'LlamaMLP', 'attention', 'lora'
    source: str  # where it came from, e.g. 'smollm2-135m-instruct'
    params: Mapping[str, jax.Array]  # relative path -> array, e.g. 'down_proj.kernel' -> (F, D)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_name(self.name, "brick name")
        for field in ("kind", "source"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"brick {self.name!r}: {field} must be a string, got {getattr(self, field)!r}")
        for key, value in self.params.items():
            _check_name(key, f"brick {self.name!r}: parameter path")
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise TypeError(f"brick {self.name!r}: parameter {key!r} is a {type(value).__name__}, not an array")
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.params.values())

    def __repr__(self) -> str:
        return (f"Brick({self.name!r}, kind={self.kind!r}, source={self.source!r}, "
                f"{len(self.params)} tensors, {self.num_params:,} params)")

    def __treescope_repr__(self, path, subtree_renderer):
        from treescope import repr_lib
        attributes = {"name": self.name, "kind": self.kind, "source": self.source,
                      "params": dict(self.params), "metadata": dict(self.metadata)}
        return repr_lib.render_object_constructor(type(self), attributes, path, subtree_renderer)


class BrickSet(Mapping[str, Brick]):
    """An ordered, immutable mapping {brick name: Brick}."""

    def __init__(self, bricks: Iterable[Brick] | Mapping[str, Brick] = ()):
        items = list(bricks.items()) if isinstance(bricks, Mapping) else [(b.name, b) for b in bricks]
        self._bricks: dict[str, Brick] = {}
        for name, brick in items:
            if not isinstance(brick, Brick):
                raise TypeError(f"BrickSet entry {name!r} is a {type(brick).__name__}, not a Brick")
            if name != brick.name:
                raise ValueError(f"BrickSet key {name!r} differs from the brick's name {brick.name!r}")
            if name in self._bricks:
                raise ValueError(f"two bricks are named {name!r}")
            self._bricks[name] = brick

    def __getitem__(self, name: str) -> Brick:
        try:
            return self._bricks[name]
        except KeyError:
            raise KeyError(f"no brick named {name!r}; the set has {list(self._bricks)[:10]}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._bricks)

    def __len__(self) -> int:
        return len(self._bricks)

    def tensors(self) -> dict[str, jax.Array]:
        """Flat {'<brick>/<relative param path>': array}, the tensor names of `bricks.safetensors`."""
        return {f"{name}/{key}": value for name, b in self._bricks.items() for key, value in b.params.items()}

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self._bricks.values())

    def __repr__(self) -> str:
        lines = [f"BrickSet of {len(self)} brick(s), {self.num_params:,} params"]
        width = max((len(n) for n in list(self._bricks)[:20]), default=0)
        for name, b in list(self._bricks.items())[:20]:
            lines.append(f"  {name:<{width}}  kind={b.kind} source={b.source} "
                         f"({len(b.params)} tensors, {b.num_params:,} params)")
        if len(self) > 20:
            lines.append(f"  ... and {len(self) - 20} more")
        return "\n".join(lines)

    def __treescope_repr__(self, path, subtree_renderer):
        from treescope import repr_lib
        return repr_lib.render_dictionary_wrapper(type(self), dict(self._bricks), path, subtree_renderer)


# ---------------------------------------------------------------------- model <-> bricks
def extract(model: nnx.Module, selection_or_paths: Selection | str | Sequence[str], *, source: str,
            kind: str | None = None) -> BrickSet:
    """One Brick per selected module: name = its dotted path, params = its nnx.Params relative to it.

    `selection_or_paths` is a Selection, a glob, or a sequence of globs/exact paths. `kind` defaults to the
    module's class name. metadata = {'module': class name, 'axes': {relative path: logical axis names}}.
    The arrays are the model's own (immutable) arrays: nothing is copied.
    """
    root = select(model)
    if isinstance(selection_or_paths, Selection):
        nodes = module_index(model)
        unknown = [p for p in selection_or_paths.paths if p not in nodes]
        if unknown:
            raise SelectionError(f"extract: the selection has paths that are not in this model: {unknown[:10]}")
        paths = list(selection_or_paths.paths)
    else:
        globs = [selection_or_paths] if isinstance(selection_or_paths, str) else list(selection_or_paths)
        chosen = {p for g in globs for p in root.at(g).paths}
        nodes = root._nodes
        paths = [p for p in nodes if p in chosen]
    variables = flat_state(model)
    bricks = []
    for path in paths:
        node = nodes[path][1]
        if not path:
            raise SelectionError("extract: the whole model is not a brick; select its parts (e.g. 'layers.*')")
        if not isinstance(node, nnx.Pytree):
            parent = path.rsplit(".", 1)[0]
            raise SelectionError(f"extract: {path} is a {type(node).__name__}, not a module; bricks are modules "
                                 f"(select {parent!r} instead)")
        prefix = path + "."
        params = {k[len(prefix):]: v.get_value() for k, v in variables.items() if k.startswith(prefix)}
        axes = {k[len(prefix):]: (list(a) if (a := v.get_metadata().get("out_sharding")) is not None else None)
                for k, v in variables.items() if k.startswith(prefix)}
        bricks.append(Brick(path, kind or type(node).__name__, source, params,
                            {"module": type(node).__name__, "axes": axes}))
    return BrickSet(bricks)


def insert(model: nnx.Module, bricks: BrickSet | Brick, *, at: Mapping[str, str] | None = None) -> nnx.Module:
    """A new model with each brick's parameters written under its path (`brick.name`, or `at[name]`).

    Every brick must supply exactly the parameters the model has under that path, with the same shapes;
    all problems are reported in one ValueError. Values are cast to the model's parameter dtypes; the
    Variables keep their metadata. The input model is untouched.
    """
    if isinstance(bricks, Brick):
        bricks = BrickSet([bricks])
    at = dict(at or {})
    unknown = [n for n in at if n not in bricks]
    if unknown:
        raise KeyError(f"insert: `at` names bricks that are not in the set: {unknown}; the set has {list(bricks)[:10]}")
    variables = flat_state(model)
    problems, new, writer = [], {}, {}
    for name, brick in bricks.items():
        mount = at.get(name, name)
        prefix = mount + "."
        have = {k[len(prefix):]: v for k, v in variables.items() if k.startswith(prefix)}
        label = f"brick {name!r}" + (f" (at {mount})" if mount != name else "")
        if not have:
            problems.append(f"{label}: the model has no parameters under {mount!r}")
            continue
        for rel in brick.params:
            if rel not in have:
                problems.append(f"{label}: {prefix}{rel} is not a parameter of the model")
        for rel in have:
            if rel not in brick.params:
                problems.append(f"{label}: lacks {prefix}{rel}, which the model has")
        for rel, value in brick.params.items():
            if rel not in have:
                continue
            target = prefix + rel
            if tuple(value.shape) != tuple(have[rel].shape):
                problems.append(f"{label}: {target} is {tuple(have[rel].shape)} in the model but "
                                f"{tuple(value.shape)} in the brick")
            if target in writer:
                problems.append(f"{label}: {target} is also written by brick {writer[target]!r}")
            writer[target] = name
            new[target] = jnp.asarray(value, dtype=have[rel].get_value().dtype)
    if problems:
        raise ValueError(f"insert: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return with_params(model, new)


# ---------------------------------------------------------------------- disk
def save_bricks(bricks: BrickSet | Brick, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes `directory/bricks.safetensors` and `directory/bricks.json` atomically; returns the directory.

    An existing directory is refused unless `overwrite` (it is then replaced only once the new one is complete).
    """
    if isinstance(bricks, Brick):
        bricks = BrickSet([bricks])
    index = {"format": FORMAT, "version": VERSION, "bricks": {}}
    for name, b in bricks.items():
        try:
            metadata = json.loads(json.dumps(dict(b.metadata)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"brick {name!r}: metadata is not JSON data ({e})") from None
        index["bricks"][name] = {
            "kind": b.kind, "source": b.source, "metadata": metadata,
            "params": {k: {"shape": list(v.shape), "dtype": str(np.dtype(v.dtype))} for k, v in b.params.items()}}
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in bricks.tensors().items()}
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "np", "content": FORMAT})
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return Path(directory)


def _field(entry: dict, key: str, kind: type, where: str):
    if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
        raise CheckpointError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    return entry[key]


def load_bricks(directory: str | os.PathLike) -> BrickSet:
    """Reads a brick set written by `save_bricks`, checking bricks.json against bricks.safetensors.

    Missing or extra tensors, and shape or dtype disagreements, are all reported in one CheckpointError
    that names the bricks and tensors. Arrays come back as jax arrays, bit for bit.
    """
    directory = Path(directory)
    index_file, tensors_file = directory / INDEX_FILE, directory / TENSORS_FILE
    for f in (index_file, tensors_file):
        if not f.is_file():
            raise CheckpointError(f"{f}: no such file (a brick set directory holds {INDEX_FILE} and {TENSORS_FILE})")
    index = read_json_object(index_file, what="brick set index", format=FORMAT, max_version=VERSION)
    entries = _field(index, "bricks", dict, str(index_file))
    store = TensorStore(tensors_file)
    problems, expected = [], {}
    for name, entry in entries.items():
        where = f"{index_file}: brick {name!r}"
        for key, kind in (("kind", str), ("source", str), ("metadata", dict), ("params", dict)):
            _field(entry, key, kind, where)
        for rel, spec in entry["params"].items():
            shape = _field(spec, "shape", list, f"{where}, parameter {rel!r}")
            dtype = _field(spec, "dtype", str, f"{where}, parameter {rel!r}")
            expected[f"{name}/{rel}"] = (name, tuple(shape), dtype)
    arrays, stored = {}, set(store)
    for tensor, (name, shape, dtype) in expected.items():
        if tensor not in stored:
            problems.append(f"brick {name!r}: tensor {tensor!r} is listed in {INDEX_FILE} but missing from "
                            f"{TENSORS_FILE}")
            continue
        array = store[tensor]
        if tuple(array.shape) != shape:
            problems.append(f"brick {name!r}: tensor {tensor!r} is {tuple(array.shape)} in {TENSORS_FILE} but "
                            f"{shape} in {INDEX_FILE}")
        if str(array.dtype) != dtype:
            problems.append(f"brick {name!r}: tensor {tensor!r} is {array.dtype} in {TENSORS_FILE} but "
                            f"{dtype} in {INDEX_FILE}")
        arrays[tensor] = array
    problems += [f"tensor {t!r} in {TENSORS_FILE} belongs to no brick listed in {INDEX_FILE}"
                 for t in sorted(stored - set(expected))]
    if problems:
        raise CheckpointError(f"{directory}: {INDEX_FILE} and {TENSORS_FILE} disagree:\n  " + "\n  ".join(problems))
    bricks = []
    for name, entry in entries.items():
        params = {rel: jnp.asarray(arrays[f"{name}/{rel}"]) for rel in entry["params"]}
        try:
            bricks.append(Brick(name, entry["kind"], entry["source"], params, entry["metadata"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{index_file}: brick {name!r} is invalid ({e})") from None
    return BrickSet(bricks)
