"""The activation-sparsity brick: a Linear that zeroes the small entries of its input (TEAL, Liu et al. 2024).

    sparse = sparsify_activations(model, {"layers.3.mlp.down_proj": 0.12, ...})   # a new model; `model` unchanged
    thresholds_of(sparse)                      # {path: t}
    dense = desparsify(sparse)                 # the plain Linears back (the same kernels and biases)

A SparseLinear replaces the `models.layers.Linear` at its path, keeps its `kernel` (in, out) and `bias` at the same
paths, and adds one non-trainable variable, `threshold` (a float32 scalar, a SparsityThreshold: not an nnx.Param,
so trainers leave it alone and orbax stores it under variables/), and with score 'scaled' a second, `scale` (in,)
float32 (a SparsityScale). For x (..., in):

    a_i  = |x_i|                                score 'magnitude' (TEAL's, the default)
    a_i  = |x_i| * ||W_i||_2                    score 'weighted': W_i the weight row (out,) that x_i multiplies, so
                                                a_i is the size of x_i's whole contribution to y (WINA, Chen et al.
                                                2025); the threshold is then on that scale
    a_i  = |x_i| * s_i                          score 'scaled': s (in,) a per-input scale held by the module (the
                                                variable `scale`), e.g. fisher.fisher_scales' sqrt(E[(dL/dx_i)^2]),
                                                which makes a_i^2 the second-order estimate of the loss change of
                                                dropping x_i (the threshold is on that scale)
    kept = not (a <= t)                         (elementwise; NaN entries are kept, so they stay visible)
    y    = (x * kept) W + b                     in the Linear's compute dtype, as Linear computes y = x W + b

A threshold t < 0 keeps every entry, and t = 0 zeroes only entries that are already zero: both compute the dense
Linear exactly (the same dot product of the same values). The zeroed entries are those whose weight rows a sparse
kernel would not read; here the product stays dense (there is no sparse kernel in this package), so the brick
measures accuracy, not speed.

Tap points (configurable_fm.analysis), for a SparseLinear at `<path>`: `<path>.input` (x, before the mask),
`<path>.score` (a, float32: what calibration histograms for the 'weighted' and 'scaled' scores), `<path>.kept` (the
boolean mask (..., in); an intervention on it changes what the module keeps, e.g. `replace(True,
positions=range(P))` leaves the first P tokens dense), `<path>.output`.

The module is an extension of kind 'activation_sparsity' (models/structure.py), registered when this package is
imported: the model's config is unchanged, `check_consistent` passes, orbax checkpoints round-trip (load them after
`import configurable_fm.analysis.sparsity`), and `to_hf` refuses the model by name (interop/hf.py lists the
extension's path and kind): `desparsify` it first (an HF checkpoint cannot express the thresholds).
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.errors import ConfigError
from configurable_fm.models.gpt2 import GPT2Config
from configurable_fm.models.layers import Linear
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import (abstract_model, build_options, check_consistent, extension_specs, fill,
                                              register_extension, variables_of)
from configurable_fm.models.taps import tap, tapped

KIND = "activation_sparsity"
SCORES = ("magnitude", "weighted", "scaled")  # a_i = |x_i|, |x_i| * ||W_i|| or |x_i| * s_i (module docstring)

# TEAL's targets: the input of every projection of every block (LM head and embeddings excluded).
DEFAULT_TARGETS = {
    "llama": ("layers.*.self_attn.q_proj", "layers.*.self_attn.k_proj", "layers.*.self_attn.v_proj",
              "layers.*.self_attn.o_proj", "layers.*.mlp.gate_proj", "layers.*.mlp.up_proj", "layers.*.mlp.down_proj"),
    "gpt2": ("h.*.attn.c_attn", "h.*.attn.c_proj", "h.*.mlp.c_fc", "h.*.mlp.c_proj"),
}
# The FFN neurons: the input of each block's FFN output projection is h = act(gate x) * (up x) (llama) or act(x W_fc)
# (gpt2), one entry per neuron, so zeroing a fraction p of it leaves 1 - p of the FFN neurons active per token.
FFN_TARGETS = {"llama": ("layers.*.mlp.down_proj",), "gpt2": ("h.*.mlp.c_proj",)}


class SparsityError(ConfigError):
    """An activation-sparsity argument, path or model that cannot be used as given; the message names it (a
    ConfigError, hence a UserError and a ValueError)."""


class SparsityThreshold(nnx.Variable):
    """The magnitude threshold t of a SparseLinear, a float32 scalar: not a parameter (no gradient, not trained)."""


class SparsityScale(nnx.Variable):
    """The per-input scale s (in,) float32 of a SparseLinear with score 'scaled': not a parameter (not trained)."""


def dense_linear(x, kernel, bias, dtype):
    """y = x W (+ b) as models.layers.Linear computes it (compute dtype `dtype`, or the promoted type)."""
    dtype = dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


def check_score(score, op: str = "sparsity") -> str:
    if score not in SCORES:
        raise SparsityError(f"{op}: score must be one of {list(SCORES)}, got {score!r}")
    return score


class SparseLinear(Linear):
    """y = (x * [a > t]) W + b, a = |x|, |x| * ||W_i|| or |x| * s (module docstring); built around the Linear it
    replaces. With score 'scaled', `scale` is s (in,) (ones when not given)."""

    kind = KIND

    def __init__(self, base: Linear, threshold: float = 0.0, score: str = "magnitude", scale=None):
        if type(base) is not Linear:
            raise SparsityError(f"activation sparsity wraps a plain models.layers.Linear, got {type(base).__name__}")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.threshold = SparsityThreshold(jnp.asarray(threshold, jnp.float32))
        self.score = check_score(score)
        if score != "scaled" and scale is not None:
            raise SparsityError(f"activation sparsity: a scale is for score 'scaled', not {score!r}")
        n = int(base.kernel.get_value().shape[0])
        self.scale = SparsityScale(jnp.ones((n,), jnp.float32) if scale is None else
                                   jnp.asarray(scale, jnp.float32)) if score == "scaled" else None

    @classmethod
    def from_options(cls, base, options: Mapping[str, Any]) -> "SparseLinear":
        unknown = sorted(set(options) - {"score"})
        if unknown:
            raise SparsityError(f"the {KIND!r} extension takes only the option 'score' (its threshold is a variable), "
                                f"got {dict(options)}")
        return cls(base, score=check_score(options.get("score", "magnitude"), f"the {KIND!r} extension"))

    def structure_spec(self):
        return {"kind": KIND, "options": {} if self.score == "magnitude" else {"score": self.score}}

    @property
    def in_features(self) -> int:
        return int(self.kernel.get_value().shape[0])

    @property
    def out_features(self) -> int:
        return int(self.kernel.get_value().shape[1])

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        t = self.threshold[...]
        a = jnp.abs(x).astype(jnp.float32)
        if self.score == "weighted":
            a = a * jnp.sqrt(jnp.sum(jnp.square(self.kernel[...].astype(jnp.float32)), axis=1))
        elif self.score == "scaled":
            a = a * self.scale[...]
        a = tap(self, "score", a)
        kept = tap(self, "kept", jnp.logical_not(a <= t))
        x = jnp.where(kept, x, jnp.zeros((), x.dtype))
        return dense_linear(x, self.kernel[...], None if self.bias is None else self.bias[...], self.dtype)


register_extension(KIND, lambda base, options, *, rngs: SparseLinear.from_options(base, options))


# ------------------------------------------------------------------------------------------------ paths
def module_paths(model) -> dict[str, nnx.Module]:
    """{dotted path: module} of every sub-module of `model`, in tree order."""
    return {".".join(str(k) for k in path): m for path, m in nnx.iter_modules(model) if path}


def family_of(model) -> str:
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, LlamaConfig):
        return "llama"
    if isinstance(cfg, GPT2Config):
        return "gpt2"
    return type(cfg).__name__ if cfg is not None else type(model).__name__


def _describe(node) -> str:
    spec = getattr(type(node), "structure_spec", None)
    if callable(spec) and not isinstance(node, SparseLinear):
        try:
            return f"a {type(node).__name__} (an extension of kind {node.structure_spec()['kind']!r})"
        except Exception:  # a broken extension: its class name is enough here
            pass
    return f"a {type(node).__name__}"


def _linears(modules: Mapping[str, nnx.Module]) -> list[str]:
    return [p for p, m in modules.items() if type(m) is Linear or isinstance(m, SparseLinear)]


def _no_linear(pattern: str, modules: Mapping[str, nnx.Module], linears: Sequence[str], op: str) -> SparsityError:
    """The error for a path or glob that names no plain Linear."""
    rx = re.compile(glob_to_regex(pattern))
    hits = [p for p in modules if rx.fullmatch(p)]
    if hits == [pattern]:
        return SparsityError(f"{op}: {pattern} is {_describe(modules[pattern])}, not a Linear; activation sparsity "
                             "applies to the input of a plain Linear")
    if hits:
        return SparsityError(f"{op}: {pattern!r} matches no plain Linear; it matches {hits[:4]} "
                             f"({_describe(modules[hits[0]])}, ...)")
    close = difflib.get_close_matches(pattern, list(linears), n=4, cutoff=0.6)
    return SparsityError(f"{op}: no module at {pattern!r}" + (f"; close matches: {close}" if close else
                                                                f"; Linear paths are e.g. {list(linears)[:4]}"))


def resolve_targets(model, targets: Optional[Sequence[str]] = None, *, op: str = "sparsity") -> list[str]:
    """The paths (tree order) of the Linear modules that `targets` names: exact dotted paths or globs over them
    (bricks.select: `*` one segment, `**` any number); None: the family's DEFAULT_TARGETS (llama: q/k/v/o_proj and
    gate/up/down_proj of every layer; gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj). Each entry must name at least
    one plain Linear (or a SparseLinear); SparsityError naming the entry otherwise: a path with no module (with
    close matches), or a module that is not a Linear."""
    modules = module_paths(model)
    linears = _linears(modules)
    if targets is None:
        family = family_of(model)
        if family not in DEFAULT_TARGETS:
            raise SparsityError(f"{op}: no default targets for a {family} model; name the Linear paths (e.g. "
                                f"{linears[:3]})")
        patterns = [p for p in DEFAULT_TARGETS[family] if any(re.fullmatch(glob_to_regex(p), q) for q in linears)]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad or not patterns:
            raise SparsityError(f"{op}: targets are non-empty path strings or globs, got {targets!r}")
    chosen: set[str] = set()
    for pattern in patterns:
        rx = re.compile(glob_to_regex(pattern))
        good = [p for p in linears if rx.fullmatch(p)]
        if not good:
            raise _no_linear(pattern, modules, linears, op)
        chosen.update(good)
    return [p for p in linears if p in chosen]


def sparse_linears(model) -> dict[str, SparseLinear]:
    """{path: SparseLinear} of a model, in tree order."""
    return {p: m for p, m in module_paths(model).items() if isinstance(m, SparseLinear)}


def thresholds_of(model) -> dict[str, float]:
    """{path: t} of every SparseLinear of `model`."""
    return {p: float(m.threshold.get_value()) for p, m in sparse_linears(model).items()}


def scales_of(model) -> dict[str, np.ndarray]:
    """{path: s (in,)} of every SparseLinear of `model` with score 'scaled'."""
    return {p: np.asarray(m.scale.get_value()) for p, m in sparse_linears(model).items() if m.scale is not None}


def check_scales(scales, paths: Sequence[str], shapes: Mapping[str, tuple[int, int]], op: str) -> dict[str, np.ndarray]:
    """{path: s as float32 (in,)} for each of `paths` (other entries of `scales` are not used): SparsityError naming
    a path without a scale, a shape that is not the Linear's (in,), or an entry that is negative or not finite."""
    if not isinstance(scales, Mapping):
        raise SparsityError(f"{op}: score 'scaled' needs scales {{Linear path: s (in,)}}, got {scales!r}")
    missing = [p for p in paths if p not in scales]
    if missing:
        raise SparsityError(f"{op}: no scale for {missing[:4]} (score 'scaled' needs one per sparsified Linear)")
    out = {}
    for p in paths:
        s = np.asarray(scales[p], np.float32)
        if s.shape != (shapes[p][0],):
            raise SparsityError(f"{op}: the scale for {p} has shape {s.shape}; its Linear takes {shapes[p][0]} "
                                f"inputs, so ({shapes[p][0]},)")
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise SparsityError(f"{op}: the scale for {p} has negative or non-finite entries")
        out[p] = s
    return out


def check_threshold(path: str, t, op: str) -> float:
    """t as a float; SparsityError when it is not a real number or is NaN / +inf."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number, np.ndarray, jax.Array)) or np.ndim(t) != 0:
        raise SparsityError(f"{op}: the threshold for {path} must be a number, got {t!r}")
    t = float(t)
    if math.isnan(t) or t == math.inf:
        raise SparsityError(f"{op}: the threshold for {path} is {t}; it must be a finite number (or -inf: dense)")
    return t


# ------------------------------------------------------------------------------------------------ the transform
def sparsify_activations(model, thresholds: Mapping[str, float], *, score: str = "magnitude",
                         scales: Optional[Mapping[str, Any]] = None):
    """A new model in which the Linear at each path of `thresholds` is a SparseLinear with threshold t and `score`
    (module docstring: 'magnitude', 'weighted' or 'scaled'; thresholds calibrated for that score,
    `Calibration.score`); with 'scaled', `scales` {path: s (in,)} for every path of `thresholds` (e.g.
    fisher_scales; `Calibration.scales`). `model` is not modified. A path that is already a SparseLinear gets the
    new threshold, score and scale. Other extension modules of the model are kept. SparsityError names an unknown
    path (with close matches), a module that is not a plain Linear, a threshold that is not a real number, an
    unknown score, or scales that are missing, given for another score, or of the wrong shape."""
    op = "sparsify_activations"
    check_score(score, op)
    if scales is not None and score != "scaled":
        raise SparsityError(f"{op}: scales are for score 'scaled', not {score!r}")
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise SparsityError(f"{op}: thresholds are a non-empty mapping {{Linear path: t}}, got {thresholds!r}")
    check_consistent(model, op)
    modules = module_paths(model)
    linears = set(_linears(modules))
    values_t = {}
    for path, t in thresholds.items():
        if not isinstance(path, str) or any(c in path for c in "*?["):
            raise SparsityError(f"{op}: {path!r} is not a module path (expand globs with resolve_targets first)")
        if path not in linears:
            raise _no_linear(path, modules, sorted(linears), op)
        values_t[path] = check_threshold(path, t, op)
    if score == "scaled":
        scales = check_scales(scales, list(values_t), linear_shapes(model, list(values_t)), op)
    options = {} if score == "magnitude" else {"score": score}
    specs = [s for s in extension_specs(model) if not (s["kind"] == KIND and s["path"] in values_t)]
    specs += [{"path": p, "kind": KIND, "options": options} for p in values_t]
    abstract = abstract_model(model.cfg, specs, **build_options(model))
    values = {k: v.get_value() for k, v in variables_of(model).items()  # a re-sparsified path's old scale goes
              if not (k.endswith(".scale") and k[:-len(".scale")] in values_t)}
    values.update({f"{p}.threshold": jnp.asarray(t, jnp.float32) for p, t in values_t.items()})
    if score == "scaled":
        values.update({f"{p}.scale": jnp.asarray(s) for p, s in scales.items()})
    return fill(abstract, values)


def desparsify(model, paths: Optional[Iterable[str]] = None):
    """A new model with the SparseLinear at `paths` (all when None) replaced by the plain Linear they wrap (the same
    kernel and bias arrays); other extensions kept. SparsityError when the model has none, or a path is not one."""
    op = "desparsify"
    found = sparse_linears(model)
    if not found:
        raise SparsityError(f"{op}: the model has no activation-sparsity module (kind {KIND!r})")
    chosen = list(found) if paths is None else list(paths)
    missing = [p for p in chosen if p not in found]
    if missing:
        raise SparsityError(f"{op}: {missing[:4]} {'is' if len(missing) == 1 else 'are'} not activation-sparsity "
                            f"modules; the model has them at e.g. {list(found)[:4]}")
    drop = set(chosen)
    specs = [s for s in extension_specs(model) if not (s["kind"] == KIND and s["path"] in drop)]
    abstract = abstract_model(model.cfg, specs, **build_options(model))
    gone = {f"{p}.{name}" for p in drop for name in ("threshold", "scale")}
    values = {k: v.get_value() for k, v in variables_of(model).items() if k not in gone}
    return fill(abstract, values)


def linear_shapes(model, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{path: (in, out)} of the Linear (or SparseLinear) modules at `paths`."""
    modules = module_paths(model)
    return {p: tuple(int(s) for s in modules[p].kernel.get_value().shape) for p in paths}
