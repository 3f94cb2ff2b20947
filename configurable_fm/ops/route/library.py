"""A library of adapters of one base model: names, adapter brick sets and a few example inputs each, on disk.

    lib = AdapterLibrary.from_models({"code": code_lora, "prose": prose_lora},
                                     examples={"code": ["def f(x):", ...], "prose": ["The cat sat.", ...]})
    lib.save("out/library"); lib = AdapterLibrary.load("out/library")
    lib.model(base, "code")                     # base with that adapter attached
    mixed = lib.mix(base)                       # bricks.adapters.mix in library order (row ids = library order)
    m = arrow(base, lib.adapters, top_k=2)      # any routing operation takes lib.adapters (brick sets)
    router = build_router(encoder, lib.examples_by_name())

On disk (every file written atomically, nothing pickled):
    <dir>/library.json              {"format": "configurable_fm.adapter_library", "version": 1, "source": ...,
                                     "adapters": [{"name", "dir": "adapters/<name>", "examples": [...],
                                                   "metadata": {...}}, ...]}   (library order)
    <dir>/adapters/<name>/          the adapter's brick set (bricks.save_bricks: bricks.safetensors +
                                    bricks.json; bricks.adapters.adapter_bricks' layout)
Names are non-empty and made of letters, digits, '-', '_' and '.' (they name directories); they are unique.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from flax import nnx

from configurable_fm.bricks.adapters import adapter_bricks, attach_bricks, mix
from configurable_fm.bricks.brickset import BrickSet, load_bricks, save_bricks
from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.ops.route.common import RouteError, few

FORMAT = "configurable_fm.adapter_library"
VERSION = 1
INDEX_FILE = "library.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterLibrary:
    """names (N,), adapters (N,) brick sets, examples (N,) tuples of example inputs (may be empty), metadata (N,)
    JSON objects (description, task, ...), source: where the base came from."""

    names: tuple[str, ...]
    adapters: tuple[BrickSet, ...]
    examples: tuple[tuple[str, ...], ...]
    metadata: tuple[Mapping[str, Any], ...] = ()
    source: str = ""

    def __post_init__(self):
        n = len(self.names)
        meta = self.metadata or tuple({} for _ in range(n))
        object.__setattr__(self, "metadata", tuple(dict(m) for m in meta))
        single = [x for x, ex in zip(self.names, self.examples) if isinstance(ex, str)]
        if single:  # tuple(str) would make each character an example
            raise RouteError(f"AdapterLibrary: the examples of {single} are one string; give a list of strings")
        object.__setattr__(self, "examples", tuple(tuple(e) for e in self.examples))
        if not n or len(self.adapters) != n or len(self.examples) != n or len(self.metadata) != n:
            raise RouteError(f"AdapterLibrary: {n} names, {len(self.adapters)} adapters, {len(self.examples)} "
                             f"example lists and {len(self.metadata)} metadata objects (one of each per adapter, "
                             "at least one adapter)")
        bad = [x for x in self.names if not isinstance(x, str) or not NAME.fullmatch(x)]
        if bad:
            raise RouteError(f"AdapterLibrary: names {bad} are not [A-Za-z0-9][A-Za-z0-9_.-]* (they name "
                             "directories)")
        if len(set(self.names)) != n:
            raise RouteError(f"AdapterLibrary: names repeat: {list(self.names)}")
        not_sets = [x for x, a in zip(self.names, self.adapters) if not isinstance(a, BrickSet)]
        if not_sets:
            raise RouteError(f"AdapterLibrary: adapters {not_sets} are not brick sets (use from_models for models)")
        bad_ex = [x for x, ex in zip(self.names, self.examples) if not all(isinstance(e, str) for e in ex)]
        if bad_ex:
            raise RouteError(f"AdapterLibrary: the examples of {bad_ex} are not all strings")
        try:
            json.dumps([dict(m) for m in self.metadata])
        except (TypeError, ValueError) as e:
            raise RouteError(f"AdapterLibrary: metadata is not JSON data ({e})") from None

    @classmethod
    def from_models(cls, models: Mapping[str, nnx.Module], *, examples: Mapping[str, Sequence[str]] | None = None,
                    metadata: Mapping[str, Mapping[str, Any]] | None = None, source: str = "") -> "AdapterLibrary":
        """A library of the adapters of {name: adapted model} (bricks.adapters.adapter_bricks; the base weights are
        not kept), with examples / metadata by name (missing: none). RouteError for names not in `models`."""
        examples, metadata = dict(examples or {}), dict(metadata or {})
        unknown = [x for x in list(examples) + list(metadata) if x not in models]
        if unknown:
            raise RouteError(f"AdapterLibrary.from_models: examples / metadata for unknown adapters {few(unknown)}; "
                             f"the adapters are {list(models)}")
        names = tuple(models)
        return cls(names, tuple(adapter_bricks(models[x], source=source) for x in names),
                   tuple(examples.get(x, ()) for x in names), tuple(metadata.get(x, {}) for x in names),
                   source)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The position (row id in `mix`) of adapter `name`; RouteError listing the names."""
        if name not in self.names:
            raise RouteError(f"AdapterLibrary: no adapter {name!r}; the library has {list(self.names)}")
        return self.names.index(name)

    def examples_by_name(self) -> dict[str, tuple[str, ...]]:
        """{name: examples} of the adapters that have examples (what retrieval.build_router takes)."""
        return {x: ex for x, ex in zip(self.names, self.examples) if ex}

    def model(self, base: nnx.Module, name: str) -> nnx.Module:
        """`base` with adapter `name` attached (bricks.adapters.attach_bricks checks the fit)."""
        return attach_bricks(base, self.adapters[self.index(name)])

    def mix(self, base: nnx.Module, *, ids=None) -> nnx.Module:
        """bricks.adapters.mix(base, adapters) in library order (row id i = self.names[i])."""
        return mix(base, list(self.adapters), ids=ids)

    def select(self, names: Sequence[str]) -> "AdapterLibrary":
        """A library of the adapters `names`, in that order."""
        idx = [self.index(x) for x in names]
        return AdapterLibrary(tuple(self.names[i] for i in idx), tuple(self.adapters[i] for i in idx),
                              tuple(self.examples[i] for i in idx), tuple(self.metadata[i] for i in idx),
                              self.source)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes the library (module docstring) atomically; an existing directory is refused unless `overwrite`."""
        index = {"format": FORMAT, "version": VERSION, "source": self.source,
                 "adapters": [{"name": x, "dir": f"adapters/{x}", "examples": list(ex), "metadata": dict(meta)}
                              for x, ex, meta in zip(self.names, self.examples, self.metadata)]}
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            (tmp / "adapters").mkdir()
            for x, bricks in zip(self.names, self.adapters):
                save_bricks(bricks, tmp / "adapters" / x)
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AdapterLibrary":
        """Reads a library written by `save`; RouteError naming the file and field that is wrong (brick sets are
        checked by bricks.load_bricks)."""
        directory = Path(directory)
        index_file = directory / INDEX_FILE
        if not index_file.is_file():
            raise RouteError(f"{index_file}: no such file (an adapter library directory holds {INDEX_FILE})")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as e:
            raise RouteError(f"{index_file}: not JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise RouteError(f"{index_file}: not an adapter library (format {FORMAT!r})")
        if not isinstance(index.get("version"), int) or index["version"] > VERSION:
            raise RouteError(f"{index_file}: version {index.get('version')!r}; this code reads up to {VERSION}")
        entries = index.get("adapters")
        if not isinstance(entries, list) or not entries:
            raise RouteError(f"{index_file}: 'adapters' must be a non-empty list")
        names, adapters, examples, metadata = [], [], [], []
        for i, e in enumerate(entries):
            ok = isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("dir"), str) and \
                isinstance(e.get("examples", []), list) and isinstance(e.get("metadata", {}), dict)
            if not ok:
                raise RouteError(f"{index_file}: adapters[{i}] needs 'name' and 'dir' strings, an 'examples' list "
                                 "and a 'metadata' object")
            where = (directory / e["dir"]).resolve()
            if directory.resolve() not in where.parents:
                raise RouteError(f"{index_file}: adapters[{i}] dir {e['dir']!r} is outside the library")
            names.append(e["name"])
            adapters.append(load_bricks(where))
            examples.append(tuple(e.get("examples", [])))
            metadata.append(e.get("metadata", {}))
        return cls(tuple(names), tuple(adapters), tuple(examples), tuple(metadata), str(index.get("source", "")))
