"""Multi-stage merges (mergekit 0.1.5's `mergekit-multi`): one YAML file of several documents, each a merge.

    chain = load_multistage("multi.yml", output="merged/")     # intermediates in merged.stages/ by default
    run_multistage(chain)                                     # stage 1/3 'first-merge': ... (one line per stage)

The format and its semantics are mergekit-multi's (mergekit/scripts/multimerge.py):

- documents are separated by `---`; each is an ordinary mergekit YAML (mergekit_yaml.py: every key, checked the
  same way) plus an optional `name:`. A named document is an intermediate merge written to
  `<intermediate_dir>/<name>`; the one document without a name (or with `name: null`) is the final merge, written
  to `output`. Which document is final does not depend on its position. At most one document may be unnamed;
  without one every stage is an intermediate (mergekit then needs no output: `output=None` here; with an
  `output`, an all-named file is an error, as nothing would be written there);
- a model reference (`model:`, `base_model:`, a slice source's `model:` or a slice's `base_model:`) equal to a
  stage's name, as a whole string, is that stage's output. The name wins over a directory or registry model of the
  same name (as in mergekit, where the name replaces the path without looking at the disk); `./name` or an
  absolute path is a path. Tokenizer settings name models of their document as usual (by name or directory);
- the stages run in dependency order (topological; ties in document order; the final merge last). Every named
  stage runs, used by the final merge or not;
- errors, each naming the file and the line: a duplicate name, two unnamed documents, a name that is not a
  plain directory name (a string, without '/' or '\\', not starting with '.'), a stage referring to itself or a
  cycle (the chain of names), a reference that is neither a path, a registry model nor a stage name.
  Empty documents (a stray `---`) are skipped (mergekit-multi fails on them with a TypeError).

Intermediates and reruns: mergekit needs `--intermediate-dir` (no default) and, lazily, skips a stage whose
directory already holds config.json and weights, whatever they were made from. Here `intermediate_dir` defaults to
`<output>.stages` (a sibling of the output) and a stage is reused only when it is known to be current: next to each
stage directory a manifest `.<name>.stage.json` records a hash of the stage's document (its YAML value, `name` left
out), of its inputs' identity (a directory or file input: its resolved path and every file's size and mtime; a
registry model: its name; a stage input: that stage's hash, so a change propagates down the chain) and, for
randomised methods, of the seed; the arithmetic (`compute_dtype`) when it is not float32; and the size and mtime of
every file the stage wrote. A stage whose manifest is missing or differs is merged again, replacing its previous
output (an intermediate directory holding files this library did not write, e.g. mergekit-multi's own, is refused,
never deleted: OutputExists before any work). Every output is written by stream.merge_checkpoints (a temporary name
renamed when complete), the manifest after it, so an interrupted run leaves nothing partial and reruns from the
first stage that is not current.
The final output follows the single-document rules: an existing one is refused unless `overwrite`, checked
before any stage runs (mergekit-multi's lazy mode would skip it). `max_shard_size` is not part of the hash
(it changes the files' layout, not the tensors).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from configurable_fm.errors import OutputExists, SourceNotFound
from configurable_fm.ops.merge.mergekit_yaml import MergekitYamlError, MergePlan, ModelRef, parse_mergekit_node

LOG = logging.getLogger(__name__)
MANIFEST_FORMAT = 1
STAGES_SUFFIX = ".stages"  # the default intermediate directory: <output>.stages


@dataclasses.dataclass(frozen=True)
class Stage:
    """One document: `name` (None: the final merge), its plan (model references to other stages point at their
    output directories), `line` (the document's first line in the file), `out` (its output directory),
    `depends` (names of the stages it reads, in order of appearance) and `document` (its YAML value without
    `name`: what the hash covers)."""

    name: Optional[str]
    plan: MergePlan
    line: int
    out: Optional[Path]
    depends: tuple[str, ...]
    document: Any

    @property
    def label(self) -> str:
        return "(final)" if self.name is None else repr(self.name)


@dataclasses.dataclass(frozen=True)
class MultiStagePlan:
    """The stages of a multi-document file in the order they run (dependencies first, the final merge last)."""

    source: str
    stages: tuple[Stage, ...]
    intermediate_dir: Path
    output: Optional[Path]

    @property
    def final(self) -> Optional[Stage]:
        return next((s for s in self.stages if s.name is None), None)


def _compose(text: str, source: str) -> tuple[yaml.SafeLoader, list[yaml.Node]]:
    """Every document node of `text` (empty documents included), lines counted over the whole file."""
    loader = yaml.SafeLoader(text)
    nodes = []
    try:
        while loader.check_node():
            nodes.append(loader.get_node())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        what = "; ".join(str(x) for x in (e.context, e.problem) if x)
        raise MergekitYamlError(f"{where}: not valid YAML ({what})") from None
    except yaml.YAMLError as e:
        raise MergekitYamlError(f"{source}: not valid YAML ({e})") from None
    return loader, nodes


def document_count(text: str) -> int:
    """How many YAML documents `text` holds (empty ones included); a syntax error after the first document counts
    as a further document (so that the multi-document parser reports it with its line); one in the first: 1."""
    loader = yaml.SafeLoader(text)
    n = 0
    try:
        while loader.check_node():
            loader.get_node()
            n += 1
    except yaml.YAMLError:
        return n + 1 if n else 1
    finally:
        loader.dispose()
    return n


def is_multi_document(path: str | os.PathLike) -> bool:
    """Whether the YAML file `path` has more than one document (False for a missing or unreadable file: the
    single-document loader reports those)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    return document_count(text) > 1


def default_intermediate_dir(output: str | os.PathLike) -> Path:
    """`<output>.stages`, next to the output."""
    output = Path(output)
    return output.with_name(output.name + STAGES_SUFFIX)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _split_name(loader: yaml.SafeLoader, node: yaml.MappingNode, source: str) -> tuple[Optional[str], Optional[int],
                                                                                      yaml.MappingNode]:
    """(name or None, line of the name or None, the document without its `name` key)."""
    found, rest = [], []
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.tag == "tag:yaml.org,2002:str" and k.value == "name":
            found.append((k, v))
        else:
            rest.append((k, v))
    if len(found) > 1:
        raise MergekitYamlError(f"{source}, line {_line(found[1][0])}: duplicate key 'name'")
    stripped = yaml.MappingNode(node.tag, rest, node.start_mark, node.end_mark, node.flow_style)
    if not found:
        return None, None, stripped
    vnode = found[0][1]
    name = None if _is_null(vnode) else loader.construct_object(vnode, deep=True)
    line = _line(vnode)
    if name is None:
        return None, line, stripped
    if not isinstance(name, str) or not name.strip():
        raise MergekitYamlError(f"{source}, line {line}: a stage name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise MergekitYamlError(f"{source}, line {line}: stage name {name!r} must be a plain directory name (no "
                                "'/' or '\\', not starting with '.'): the stage is written to "
                                "<intermediate_dir>/<name>")
    return name, line, stripped


def parse_multistage(text: str, *, source: str = "<yaml>", yaml_dir: Optional[Path] = None,
                     intermediate_dir: str | os.PathLike, output: Optional[str | os.PathLike] = None
                     ) -> MultiStagePlan:
    """The MultiStagePlan of a multi-document mergekit YAML text (module docstring). Every document is parsed and
    checked as mergekit_yaml does (MergekitYamlError naming the key and its line), references to stages resolved
    to `<intermediate_dir>/<name>`; then names, cycles and the output are checked (MergekitYamlError naming the
    line). Nothing is read but the YAML and the inputs' config.json."""
    loader, nodes = _compose(text, source)
    try:
        docs = []  # (index, root node)
        for i, node in enumerate(nodes):
            if _is_null(node):
                continue
            if not isinstance(node, yaml.MappingNode):
                raise MergekitYamlError(f"{source}, line {_line(node)}: document {i + 1} must be a mapping (a merge "
                                        "configuration), got a " + ("list" if isinstance(node, yaml.SequenceNode)
                                                                    else "scalar"))
            docs.append((i, node))
        if not docs:
            raise MergekitYamlError(f"{source}: no merge configuration (every document is empty)")
        inter = Path(intermediate_dir).absolute()
        out = None if output is None else Path(output).absolute()

        named: dict[str, tuple[int, int]] = {}  # name -> (document index, line of the name)
        unnamed: Optional[int] = None
        split = []
        for i, node in docs:
            name, name_line, stripped = _split_name(loader, node, source)
            where = f"{source}, line {name_line or _line(node)}"
            if name is None:
                if unnamed is not None:
                    raise MergekitYamlError(
                        f"{where}: document {i + 1} has no name, and neither has the document at line {unnamed}; "
                        "only the final merge may be unnamed: give the others a `name:` (their outputs go to the "
                        "intermediate directory, later documents refer to them by that name)")
                unnamed = _line(node)
            elif name in named:
                raise MergekitYamlError(f"{where}: duplicate stage name {name!r} (first given at line "
                                        f"{named[name][1]})")
            else:
                named[name] = (i, name_line)
            split.append((i, name, stripped))

        if out is not None and unnamed is None:
            raise MergekitYamlError(
                f"{source}: every document has a `name:`, so none is the final merge to write to {output} "
                "(mergekit-multi writes such files into the intermediate directory only); remove the `name:` of "
                "the final document")
        if out is None and unnamed is not None:
            raise MergekitYamlError(f"{source}, line {unnamed}: the unnamed document is the final merge and needs "
                                    "an output directory")
        if out is not None:
            if out == inter or inter in out.parents or out in inter.parents:
                raise MergekitYamlError(f"{source}: the output {output} and the intermediate directory "
                                        f"{intermediate_dir} must not contain one another")

        stage_dirs = {name: inter / name for name in named}
        stages: dict[Optional[str], Stage] = {}
        order_in_file: list[Optional[str]] = []
        for i, name, stripped in split:
            plan = parse_mergekit_node(loader, stripped, source=source, yaml_dir=yaml_dir, stages=stage_dirs)
            refs = _all_refs(plan)
            depends = tuple(dict.fromkeys(r.name for r in refs if r.name in stage_dirs))
            line = _line(stripped)
            plan = dataclasses.replace(plan, source=f"{source} (stage {'(final)' if name is None else repr(name)}, "
                                                    f"line {line})")
            for r in refs:
                if r.name in stage_dirs and r.name != name and _shadowed(r.name, yaml_dir):
                    LOG.warning("%s, line %d: %r is the name of a stage and also an existing path or registry "
                                "model; the stage is used (as mergekit-multi)", source, r.line, r.name)
            stages[name] = Stage(name, plan, line, stage_dirs[name] if name is not None else out, depends,
                                 loader.construct_object(stripped, deep=True))
            order_in_file.append(name)
    finally:
        loader.dispose()
    _check_cycles(stages, order_in_file, source)
    return MultiStagePlan(source, _topological(stages, order_in_file), inter, out)


def _all_refs(plan: MergePlan) -> list[ModelRef]:
    """Every model reference of a plan in order of appearance (the base first)."""
    return list(plan.refs.values())


def _shadowed(name: str, yaml_dir: Optional[Path]) -> bool:
    from configurable_fm.models import registry

    if name in registry.MODELS or Path(name).expanduser().exists():
        return True
    return yaml_dir is not None and not Path(name).is_absolute() and (yaml_dir / name).exists()


def _ref_line(stage: Stage, dep: str) -> int:
    return next((r.line for r in _all_refs(stage.plan) if r.name == dep), stage.line)


def _check_cycles(stages: dict[Optional[str], Stage], order: list[Optional[str]], source: str) -> None:
    """MergekitYamlError naming the line of the reference that closes a cycle, and the cycle's names."""
    state: dict[Optional[str], int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in stages[name].depends:
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                if dep == name:
                    raise MergekitYamlError(f"{source}, line {_ref_line(stages[name], dep)}: stage {name!r} refers to "
                                            "itself")
                raise MergekitYamlError(f"{source}, line {_ref_line(stages[name], dep)}: circular dependency between "
                                        "stages: " + " -> ".join(repr(n) for n in cycle))
            if state.get(dep) is None:
                visit(dep, path + [dep])
        state[name] = 2

    for name in order:
        if state.get(name) is None:
            visit(name, [name])


def _topological(stages: dict[Optional[str], Stage], order: list[Optional[str]]) -> tuple[Stage, ...]:
    """Dependencies first, ties in document order, the final merge last (nothing can depend on it)."""
    done: list[Optional[str]] = []
    pending = [n for n in order if n is not None]
    while pending:
        ready = next(n for n in pending if all(d in done for d in stages[n].depends))
        done.append(ready)
        pending.remove(ready)
    if None in stages:
        done.append(None)
    return tuple(stages[n] for n in done)


def load_multistage(path: str | os.PathLike, *, output: Optional[str | os.PathLike] = None,
                    intermediate_dir: Optional[str | os.PathLike] = None) -> MultiStagePlan:
    """Reads a multi-document mergekit YAML file (relative model paths: working directory, then the file's);
    `intermediate_dir` defaults to `<output>.stages`."""
    path = Path(path)
    if not path.is_file():
        raise SourceNotFound(f"mergekit YAML {path} does not exist")
    if intermediate_dir is None:
        if output is None:
            raise MergekitYamlError(f"{path}: give an intermediate directory (or an output, next to which it goes)")
        intermediate_dir = default_intermediate_dir(output)
    return parse_multistage(path.read_text(), source=str(path), yaml_dir=path.parent,
                            intermediate_dir=intermediate_dir, output=output)


# ---------------------------------------------------------------------------------------------------------------
# Running: hashes, manifests, reuse
# ---------------------------------------------------------------------------------------------------------------


def _files(path: Path) -> list[list]:
    """[relative path, size, mtime_ns] of every file under `path` (a file: itself), sorted."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def _input_identity(ref: ModelRef, keys: dict[str, str]) -> dict:
    if ref.name in keys:
        return {"stage": keys[ref.name]}
    if ref.path is None:
        return {"registry": ref.registry}
    return {"path": str(ref.path), "files": _files(ref.path) if ref.path.exists() else None}


def stage_hash(stage: Stage, keys: dict[str, str], *, seed: int, compute_dtype: Optional[str] = None) -> str:
    """The hex sha256 of what a stage's output is made from (module docstring); `keys`: the hashes of the stages
    it depends on; compute_dtype: the arithmetic (stream.merge_checkpoints), part of the hash when not float32."""
    from configurable_fm.ops.merge.registry import get_method

    payload = {"format": MANIFEST_FORMAT, "document": stage.document,
               "inputs": {r.name: _input_identity(r, keys) for r in _all_refs(stage.plan)}}
    if get_method(stage.plan.method).randomized:
        payload["seed"] = int(seed)
    if compute_dtype not in (None, "float32"):
        payload["compute_dtype"] = compute_dtype
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_path(stage_dir: Path) -> Path:
    """`<intermediate_dir>/.<name>.stage.json` (outside the stage directory, which holds only what the merge
    wrote)."""
    return stage_dir.with_name(f".{stage_dir.name}.stage.json")


def _current(stage: Stage, key: str) -> bool:
    """Whether the stage's directory is complete and made from exactly this document and these inputs."""
    from configurable_fm.interop.atomic import MANIFEST

    try:
        recorded = json.loads(manifest_path(stage.out).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("hash") != key:
        return False
    if not (stage.out / MANIFEST).is_file():
        return False
    return recorded.get("files") == _files(stage.out)


def _describe(plan: MergePlan) -> str:
    n = len(plan.models) + (plan.base is not None)
    what = f" in {len(plan.slices)} slice(s)" if plan.slices is not None else ""
    return f"{plan.method} of {n} model(s){what}"


def run_multistage(chain: MultiStagePlan, *, overwrite: bool = False, max_shard_size: int | str = "5GB",
                   progress: bool = True, seed: int = 0, prefetch: int = 1, device=None,
                   log: Optional[Callable[[str], None]] = print,
                   compute_dtype: Optional[str] = None) -> Optional[Path]:
    """Runs the stages in order with stream.merge_checkpoints (module docstring); returns the final output (None
    when every stage is named). compute_dtype: every stage's arithmetic (stream.merge_checkpoints). `overwrite`
    applies to the final output only; intermediates that are not current are always replaced (when they are
    outputs of this library). `log`: one line per stage (None: silent)."""
    from configurable_fm.interop.atomic import check_overwritable, write_json_atomic
    from configurable_fm.ops.merge import stream

    say = log or (lambda _: None)
    if chain.output is not None:
        check_overwritable(chain.output, overwrite,  # before any work, as a single merge
                           inputs=[r.path for s in chain.stages for r in _all_refs(s.plan)])
    if chain.intermediate_dir.exists() and not chain.intermediate_dir.is_dir():
        raise OutputExists(f"the intermediate directory {chain.intermediate_dir} exists and is not a directory")
    keys: dict[str, str] = {}
    todo: dict[Optional[str], bool] = {}
    for stage in chain.stages:
        if stage.name is None:
            continue
        keys[stage.name] = stage_hash(stage, keys, seed=seed, compute_dtype=compute_dtype)
        todo[stage.name] = not _current(stage, keys[stage.name])
        if todo[stage.name]:
            check_overwritable(stage.out, True)  # a foreign directory is refused before any work
    n = len(chain.stages)
    for i, stage in enumerate(chain.stages, 1):
        head = f"stage {i}/{n} {stage.label}"
        if stage.name is not None and not todo[stage.name]:
            say(f"{head}: up to date, reusing {stage.out}")
            continue
        why = ""
        if stage.name is not None and stage.out.exists():
            why = " (its document or inputs changed)"
        say(f"{head}: merging {_describe(stage.plan)} into {stage.out}{why}")
        if stage.name is None:
            stream.merge_checkpoints(stage.plan, stage.out, overwrite=overwrite, max_shard_size=max_shard_size,
                                     progress=progress, seed=seed, prefetch=prefetch, device=device,
                                     compute_dtype=compute_dtype)
            continue
        manifest = manifest_path(stage.out)
        manifest.unlink(missing_ok=True)  # the old manifest goes first: a crash below leaves the stage to redo
        chain.intermediate_dir.mkdir(parents=True, exist_ok=True)
        stream.merge_checkpoints(stage.plan, stage.out, overwrite=True, max_shard_size=max_shard_size,
                                 progress=progress, seed=seed, prefetch=prefetch, device=device,
                                 compute_dtype=compute_dtype)
        write_json_atomic(manifest, {"format": MANIFEST_FORMAT, "stage": stage.name, "hash": keys[stage.name],
                                     "source": chain.source, "line": stage.line, "files": _files(stage.out)})
    return chain.output
