"""Selectors over a model's sub-trees, and functional replacement (penzai's `pz.select`, equinox's `tree_at`).

    sel = select(model).at("layers.*.mlp")                      # the MLP of every layer
    sel.paths                                                   # ('layers.0.mlp', 'layers.1.mlp', ...)
    wider = sel.apply(lambda mlp: grow(mlp))                    # a NEW model; `model` is untouched
    doubled = select(model).at("layers.1.mlp.**.kernel").apply(lambda w: 2 * w)
    model2 = tree_at(model, "layers.0.mlp", new_mlp)

Nodes are the model's sub-modules (anything NNX iterates as a child: `nnx.Module`, `nnx.List`, `nnx.Dict`) and
its Variables (`nnx.Param`, ...), each addressed by the dotted path of `bricks.paths`
(`layers.3.mlp`, `layers.3.mlp.down_proj.kernel`). `select(model)` selects the whole model (the root, path '');
each refinement keeps the nodes that match it *at or under* a currently selected node, so chaining narrows:
`select(m).at("layers.0").at_instances_of(Linear)` are the Linear layers of layer 0, and
`select(m).at("layers.*.mlp").at_instances_of(LlamaMLP)` intersects. A refinement that matches nothing raises
`SelectionError` with the paths one could have meant.

Globs match whole dotted paths segment by segment: `*` is any text within one segment (never a dot), `?` one
character, `[seq]`/`[!seq]` a character class, and a `**` segment any number (zero or more) of segments:
`layers.*.mlp`, `layers.1?.self_attn.q_proj`, `**.kernel`, `layers.3.**`.

Replacement is functional: the model is cloned (`nnx.clone`: new modules and Variables, same immutable
arrays) and the selected nodes of the clone are replaced, so the input is never modified. A parameter is
replaced by a new Variable of the same type and metadata (logical axes) holding the new array (never a bare
array: see the `eqx.tree_at` gotcha); a module by the returned module (cloned, so no state is shared).
"""
from __future__ import annotations

import collections.abc as cabc
import difflib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.errors import UserError
from configurable_fm.bricks.paths import flat_params, path_str


class SelectionError(UserError, ValueError):
    """A glob, regex, type or path selected nothing, or a selection cannot be applied as asked."""


def _children(node) -> list[tuple[Any, Any]]:
    return list(nnx.iter_children(node)) if isinstance(node, nnx.Pytree) else []


def module_index(model) -> dict[str, tuple[tuple, Any]]:
    """{dotted path: (path tuple, node)} for the root ('') and every descendant, parents first, in the
    model's order (the order of `flat_params`: attributes sorted by name, list items by index)."""
    out: dict[str, tuple[tuple, Any]] = {}

    def walk(path: tuple, node, ancestors: frozenset):
        out.setdefault(path_str(path), (path, node))
        if id(node) in ancestors:  # a cycle in the object graph: do not recurse forever
            return
        for key, child in _children(node):
            walk(path + (key,), child, ancestors | {id(node)})

    walk((), model, frozenset())
    return out


def _under(path: str, roots: cabc.Collection[str]) -> bool:
    """True when `path` is one of `roots` or lies inside one of them ('' is the whole model)."""
    if "" in roots or path in roots:
        return True
    parts = path.split(".")
    return any(".".join(parts[:i]) in roots for i in range(1, len(parts)))


def glob_to_regex(glob: str) -> str:
    """Segment-wise glob over dotted paths -> a regular expression for `re.fullmatch` (see the module doc)."""
    parts = glob.split(".")
    segments = [s for i, s in enumerate(parts) if not (s == "**" and i and parts[i - 1] == "**")]  # '**.**' = '**'
    if segments == ["**"]:
        return r"[^.]+(?:\.[^.]+)*"
    out, need_dot = [], False
    for i, seg in enumerate(segments):
        if seg == "**":
            if i == 0:
                out.append(r"(?:[^.]+\.)*")  # zero or more leading segments, each with its dot
            else:
                out.append(r"(?:\.[^.]+)*")
                need_dot = True
            continue
        out.append(r"\." if need_dot else "")
        need_dot = True
        j = 0
        while j < len(seg):
            c = seg[j]
            if c == "*":
                out.append(r"[^.]*")
            elif c == "?":
                out.append(r"[^.]")
            elif c == "[" and _class_end(seg, j) > 0:
                end = _class_end(seg, j)
                body = seg[j + 1:end]
                neg = body.startswith("!")
                body = (body[1:] if neg else body).replace("\\", "\\\\").replace("^", "\\^").replace("]", "\\]")
                if neg and body.startswith("-"):  # after '^.' a leading '-' would make the range '.'..x
                    body = "\\" + body
                out.append(f"[^.{body}]" if neg else rf"(?!\.)[{body}]")  # a range may span '.': never a dot
                j = end
            else:
                out.append(re.escape(c))
            j += 1
    return "".join(out)


def _class_end(seg: str, start: int) -> int:
    """Index of the ']' closing the character class opened at seg[start] ('[!]...]' rules of fnmatch), or -1."""
    k = start + 1
    k += seg[k:k + 1] == "!"
    k += seg[k:k + 1] == "]"
    return seg.find("]", k)


def _patterns(paths) -> list[str]:
    """Distinct path shapes with list indices written as '*': 'layers.*.mlp.down_proj.kernel'."""
    return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", p) for p in paths))


def _describe(node) -> str:
    if isinstance(node, nnx.Variable):
        value = node.get_value()
        return f"{type(node).__name__} {tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', '')}".rstrip()
    if isinstance(node, nnx.Pytree):
        n = sum(int(np.prod(v.shape)) for v in flat_params(node).values())
        return f"{type(node).__name__}, {n:,} params"
    return type(node).__name__


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


class Selection:
    """Some nodes of a model, by dotted path. Immutable: every method returns a new Selection or model.

    Refine with `at`, `at_regex`, `at_instances_of`, `where` (each keeps matches at or under the current
    nodes); read with `paths`, `get`, `params`, `count`; replace with `apply` / `set` (new model).
    """

    def __init__(self, model, nodes: dict[str, tuple[tuple, Any]], selected: tuple[str, ...], how: str):
        self.model = model
        self._nodes = nodes
        self._selected = selected
        self._how = how

    # ------------------------------------------------------------------ refining
    def _refine(self, keep: Callable[[str, Any], bool], what: str, hint: Callable[[list[str]], str]):
        roots = set(self._selected)
        candidates = [p for p in self._nodes if p and _under(p, roots)]
        chosen = tuple(p for p in candidates if keep(p, self._nodes[p][1]))
        how = f"{self._how}.{what}"
        if not chosen:
            shown = ", ".join(self._selected[:3]) + (", ..." if len(roots) > 3 else "")
            where = "the model" if "" in roots else f"{len(roots)} selected node(s) ({shown})"
            raise SelectionError(f"{how} selects nothing under {where}; {hint(candidates)}")
        return Selection(self.model, self._nodes, chosen, how)

    def _path_hint(self, pattern: str):
        def hint(candidates: list[str]) -> str:
            close = sorted(difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.6), key=candidates.index)
            shapes = _patterns(candidates)
            more = f" (+{len(shapes) - 24} more)" if len(shapes) > 24 else ""
            return ((f"did you mean {close}? " if close else "")
                    + f"valid paths look like: {', '.join(shapes[:24])}{more}")
        return hint

    def at(self, glob: str) -> "Selection":
        """Nodes whose dotted path matches `glob` ('layers.*.mlp', 'layers.1?.self_attn.q_proj', '**.kernel')."""
        regex = re.compile(glob_to_regex(glob))
        return self._refine(lambda p, _: regex.fullmatch(p) is not None, f"at({glob!r})", self._path_hint(glob))

    def at_regex(self, pattern: str) -> "Selection":
        """Nodes whose dotted path fully matches the regular expression `pattern`."""
        regex = re.compile(pattern)
        return self._refine(lambda p, _: regex.fullmatch(p) is not None, f"at_regex({pattern!r})",
                            self._path_hint(pattern))

    def at_instances_of(self, *types: type) -> "Selection":
        """Nodes that are instances of any of `types` (module classes such as LlamaMLP, Linear, or nnx.Param)."""
        names = ", ".join(t.__name__ for t in types)

        def hint(candidates):
            present = sorted({type(self._nodes[p][1]).__name__ for p in candidates})
            return f"the types there are {present}"
        return self._refine(lambda _, node: isinstance(node, types), f"at_instances_of({names})", hint)

    def where(self, predicate: Callable[[str, Any], bool]) -> "Selection":
        """Nodes for which `predicate(path, node)` is true; `node` is the module or the nnx.Variable itself
        (`.shape`, metadata such as `.out_sharding`; read its array with `node[...]`)."""
        name = getattr(predicate, "__name__", "predicate")
        return self._refine(lambda p, node: bool(predicate(p, node)), f"where({name})",
                            lambda c: f"the predicate was false on all {len(c)} candidate nodes")

    # ------------------------------------------------------------------ reading
    @property
    def paths(self) -> tuple[str, ...]:
        """Selected dotted paths in model order ('' is the whole model)."""
        return self._selected

    def get(self) -> dict[str, Any]:
        """{path: node}: the module itself (a view: change it with `apply`, not in place) or the array."""
        out = {}
        for p in self._selected:
            node = self._nodes[p][1]
            out[p] = node.get_value() if isinstance(node, nnx.Variable) else node
        return out

    def params(self) -> dict[str, jax.Array]:
        """Flat {parameter path: array} of every nnx.Param at or under the selection, in model order."""
        roots = set(self._selected)
        return {k: v for k, v in flat_params(self.model).items() if _under(k, roots)}

    def count(self) -> int:
        return len(self._selected)

    def __len__(self) -> int:
        return len(self._selected)

    def __repr__(self) -> str:
        lines = [f"Selection of {len(self)} node(s) in {type(self.model).__name__}: {self._how}"]
        width = max((len(p) for p in self._selected[:20]), default=0)
        lines += [f"  {p or '<root>':<{width}}  {_describe(self._nodes[p][1])}" for p in self._selected[:20]]
        if len(self) > 20:
            lines.append(f"  ... and {len(self) - 20} more")
        return "\n".join(lines)

    def __treescope_repr__(self, path, subtree_renderer):
        from treescope import repr_lib
        # path=None: the rendered keys are selection paths, not attribute paths of this object.
        return repr_lib.render_dictionary_wrapper(type(self), self.get(), None, subtree_renderer)

    # ------------------------------------------------------------------ replacing
    def apply(self, fn: Callable[[Any], Any]) -> nnx.Module:
        """A new model in which each selected node x is replaced by fn(x); the input model is untouched.

        A module is passed as (a clone of) itself and must come back as an nnx module (same or different
        structure, e.g. a wider MLP). A parameter is passed as its array and must come back as an array
        (any shape; it is wrapped in a Variable of the same type and metadata) or as an nnx.Variable.
        Selected nodes must be disjoint (no selected node inside another).
        """
        return _replace(self.model, [self._nodes[p][0] for p in self._selected], lambda _, node: fn(node),
                        self._how)

    def set(self, value: Any) -> nnx.Module:
        """A new model with every selected node replaced by `value`, or by `value[path]` for a mapping
        {path: replacement} that names exactly the selected paths."""
        if isinstance(value, cabc.Mapping) and not isinstance(value, nnx.Pytree):
            missing = [p for p in self._selected if p not in value]
            extra = [k for k in value if k not in set(self._selected)]
            if missing or extra:
                raise SelectionError(f"set(mapping) must name exactly the selected paths: "
                                     f"missing {missing[:10]}, not selected {extra[:10]}")
            return _replace(self.model, [self._nodes[p][0] for p in self._selected],
                            lambda p, _: value[p], self._how)
        return _replace(self.model, [self._nodes[p][0] for p in self._selected], lambda *_: value, self._how)


def select(model: nnx.Module) -> Selection:
    """Selects the whole model; refine with `.at(glob)`, `.at_regex(re)`, `.at_instances_of(*types)`, `.where(pred)`."""
    if not isinstance(model, nnx.Pytree):
        raise TypeError(f"select() needs an nnx Module, got {type(model).__name__}")
    return Selection(model, module_index(model), ("",), f"select({type(model).__name__})")


def tree_at(model: nnx.Module, path: str, new_node: Any) -> nnx.Module:
    """A new model with the node at the exact dotted `path` replaced by `new_node` (a module, an array for a
    parameter, or an nnx.Variable); the input model is untouched (equinox's `tree_at`, addressed by path)."""
    nodes = module_index(model)
    if not path or path not in nodes:
        candidates = [p for p in nodes if p]
        close = sorted(difflib.get_close_matches(path, candidates, n=5, cutoff=0.6), key=candidates.index)
        raise SelectionError(f"tree_at: no node at path {path!r} in {type(model).__name__}; "
                             + (f"did you mean {close}? " if close else "")
                             + f"valid paths look like: {', '.join(_patterns(candidates)[:24])}")
    return _replace(model, [nodes[path][0]], lambda *_: new_node, f"tree_at({path!r})")


# ---------------------------------------------------------------------- the replacement itself
def _get_child(parent, key):
    return parent[key] if isinstance(parent, (cabc.Sequence, cabc.Mapping)) else getattr(parent, key)


def _set_child(parent, key, value) -> None:
    if isinstance(parent, (cabc.MutableSequence, cabc.MutableMapping)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _new_node(path: str, old, new, how: str):
    """Checks that `new` may replace `old` and returns the node to store (never shared with anything)."""
    if isinstance(old, nnx.Variable):
        if isinstance(new, nnx.Variable):
            return new.replace(new.get_value())
        if not _is_array(new):
            raise TypeError(f"{how}: parameter {path} ({type(old).__name__}) must be replaced by an array or an "
                            f"nnx.Variable, got {type(new).__name__}")
        axes = old.get_metadata().get("out_sharding")
        if axes is not None and len(axes) != new.ndim:
            raise ValueError(f"{how}: new value for {path} has shape {tuple(new.shape)} but its logical axes "
                             f"{tuple(axes)} name {len(axes)} dimension(s); return an nnx.Param with new axes")
        return old.replace(jnp.asarray(new))
    if isinstance(old, nnx.Pytree):
        if not isinstance(new, nnx.Pytree):
            raise TypeError(f"{how}: module {path} ({type(old).__name__}) must be replaced by an nnx Module, "
                            f"got {type(new).__name__}")
        return new if new is old else nnx.clone(new)
    return new


def _replace(model, paths: list[tuple], make: Callable[[str, Any], Any], how: str):
    """Clones `model`, then replaces the node at each path tuple by `make(dotted path, node of the clone)`
    (the node is given as its array for a Variable)."""
    dotted = [path_str(p) for p in paths]
    for p in dotted:
        if not p:
            raise SelectionError(f"{how}: cannot replace the root; select a part of the model first")
        inner = [q for q in dotted if q != p and q.startswith(p + ".")]
        if inner:
            raise SelectionError(f"{how}: selected nodes must be disjoint to be replaced, but {inner[:3]} lie "
                                 f"inside {p}; narrow the selection (e.g. with .at_instances_of or .at)")
    new_model = nnx.clone(model)
    for path, p in zip(paths, dotted):
        parent = new_model
        for key in path[:-1]:
            parent = _get_child(parent, key)
        old = _get_child(parent, path[-1])
        given = old.get_value() if isinstance(old, nnx.Variable) else old
        _set_child(parent, path[-1], _new_node(p, old, make(p, given), how))
    return new_model
