"""Function-preserving width growth of llama-family models: hidden size, query heads, key-value heads, FFN width.

    wide = grow_width(model, hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560)
    wide = grow_width(model, hidden_size=1152, num_heads=18, intermediate_size=3072, method="hypercloning",
                      key=jax.random.key(0), noise=0.1)
    plan = plan_width(model.cfg, hidden_size=960, ...); wide = widen(model, plan)   # the same, in two steps
    flat = widen_params(flat_params(model), model.cfg, plan)   # {path: numpy array}, float64 in -> float64 out

Each axis grows independently to any target at least as large as the source; head_dim never changes (so RoPE,
the attention temperature 1/sqrt(head_dim) and rope scaling are untouched). Kernels are (in, out) (Flax), so a
layer reading the residual stream has it on axis 0 and a layer writing it on its last axis.

Notation: D, H, G, F the source hidden size, query heads, kv heads, FFN width; D', H', G', F' the target ones;
hd = head_dim; g an RMSNorm gain; eps its epsilon; RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g.

## The residual stream (hidden size), method "exact": zero extension (Gesmundo & Maile 2023, section 3.5)
The target stream is x' = [x, 0] (D' entries). Every writer of the stream (the embedding table, o_proj, down_proj
and their biases, the MoE experts' down projections) gets zeros in the new output columns, so the new entries stay
exactly 0 through the whole network. mean(x'^2) = (D/D') mean(x^2), hence with

    g'   = [sqrt(D/D') g, m]        (m = mean(sqrt(D/D') g): the new entries' gain, any value is exact)
    eps' = eps * D/D'               (config field rms_norm_eps)

    RMSNorm'(x') = [x, 0] / sqrt((D/D') (mean(x^2) + eps)) * g' = [RMSNorm(x), 0]

exactly, at every norm (input, post-attention and final). eps has to move with the scale: it sits inside the
square root, and keeping it would change every norm by the factor sqrt((mean + eps) / (mean + eps D'/D)), a relative
error of about eps (D'/D - 1) / (2 mean(x^2)) (~1e-7 for eps = 1e-6, rms ~ 1; larger where activations are small),
where this scheme is exact to rounding (1e-12 in float64 in the tests). Readers of the stream
(q/k/v, gate/up, the router and noisy_topk's noise weights, an untied lm_head) get arbitrary new input rows since
they multiply zeros; we copy existing rows (row D + j copies row j mod D) so that the new dimensions, once
training wakes them up, are read like trained ones, and gradients reach them from step 0 (a zero row would leave
the new dimensions without any gradient: a saddle). A tied head is the embedding table, whose new columns are zero
(it writes the stream): also exact. Works for any D' >= D.

## The residual stream, method "hypercloning": tiling (Samragh et al. 2024), D' = n D
The target stream is x' = tile(x, n) / s. mean(x'^2) = mean(x^2) / s^2, so with eps' = eps / s^2 and g' = tile(g),
RMSNorm'(x') = tile(RMSNorm(x)). Readers take rows tile(W, n) / n (they sum n equal copies), writers columns
tile(W, n) / s. Untied head: s = 1 (HyperCloning's choice; eps unchanged), lm_head rows tile/n. Tied head: the head
is the table E' = tile(E)/s, whose logits are sum over copies of (E/s) h' = (n/s) E h'; with s = sqrt(n) and the
final norm's gain scaled by c = s/n = 1/sqrt(n) the logits are exact (eps' = eps/n). Every unit keeps a nonzero
output: nothing starts dead, but the n copies are symmetric until noise or training separates them.

## FFN width F -> F'
"exact": new units t >= F copy the input weights (gate/up columns, their biases) of unit (t - F) mod F, and have
zero output weights (down_proj rows), so y is unchanged; they are readable (nonzero activation), their down rows
get gradient at once. "hypercloning" (F' = m F): every unit copied m times, down_proj rows divided by m (the m equal
activations sum back to the original). MoE experts grow the same way, expert by expert.

## Heads (head_dim fixed): H -> H' query heads, G -> G' key-value heads
Query head i reads kv head i // (H/G) (HF repeat_kv). "exact": the H/G query heads of source group g are placed in
consecutive target slots starting at g * ceil(r/r') * r', r = H/G, r' = H'/G'; the ceil(r/r') target kv heads they
fall into are exact copies of kv head g (duplicated kv heads are exact: attention reads them, nothing else). This
needs G * ceil(r/r') <= G' (GrowthError otherwise). Target kv heads after that are new (copies of kv head j mod G
whose only readers are new query heads); every other query slot is a new head copying a source query head of the
group its kv head copies, with zero o_proj rows. Examples: 9/3 -> 15/5 keeps the layout and adds two new groups;
3/1 -> 5/5 duplicates the single kv head into groups 0..2 (one old query head each) and adds groups 3, 4.
"hypercloning" (H' = k H): query heads tiled [h_0..h_{H-1}, h_0..] with o_proj rows / k; kv heads tiled the same
way (G' = k G), or a single kv head kept (G = G' = 1, MQA); then head i' = c H + i reads kv head c G + i // r, a copy
of kv head i // r.

## Noise (symmetry breaking, exact by construction; needs `key`)
Standard deviation noise * std(W) (std of the source tensor), drawn per tensor from a key that depends only on
(key, path) (prng.path_key):
"exact": added to the input weights of new units / new heads / new kv heads and to the new input rows of readers
(all of which the function ignores); "hypercloning": zero-sum across copies (N_c - mean_c N_c) added to readers'
input rows (the copies read equal inputs) and to the output rows of tiled units and heads (their activations are
equal), as HyperCloning's +N/-N pairs. Biases get no noise. Exact up to float rounding (<= 1e-5 on the logits in
the tests).

## Moments (optimizer state), `widen_moments`
The same index maps in "gather" mode (`gather_axis`): target entry t of an axis takes source entry src[t] with no
scaling (no 1/div, 1/n, 1/scale, sqrt(D/D') or final gain) and no noise, and 0 where the axis marks t new (new
units, new kv heads, the pad scheme's new stream entries, in every tensor that has them: the new rows of readers
too, although their parameters copy rows). Tiling marks nothing new: every copy gets the source's moments. The
rule and why it is MSG's: ops/grow/state.py.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_finite_real, is_int
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import rebuild
from configurable_fm.ops.grow.common import GrowthError, check_key, llama_config, normal
from configurable_fm.prng import path_key

METHODS = ("exact", "hypercloning")


@dataclasses.dataclass(frozen=True)
class Units:
    """How a unit axis (FFN units, query heads or kv heads) of the source maps onto the target.

    Target unit t takes the input weights of source unit src[t]. new[t]: nothing in the target's function depends on
    the unit (its output weights are zero; for a kv head: only new query heads read it), so its input weights may
    take noise. div[t]: how many live copies of src[t] the target has (its output weights are divided by it)."""

    src: tuple[int, ...]
    new: tuple[bool, ...]
    div: tuple[int, ...]

    @staticmethod
    def pad(n: int, n2: int) -> "Units":
        """Units 0..n-1 kept; units n..n2-1 new, copying unit (t - n) mod n."""
        return Units(tuple(t if t < n else (t - n) % n for t in range(n2)), tuple(t >= n for t in range(n2)),
                     (1,) * n2)

    @staticmethod
    def tile(n: int, k: int) -> "Units":
        """k copies [u_0..u_{n-1}, u_0..]: unit t is a copy of unit t mod n, outputs divided by k."""
        return Units(tuple(t % n for t in range(n * k)), (False,) * (n * k), (k,) * (n * k))

    def __len__(self):
        return len(self.src)


@dataclasses.dataclass(frozen=True)
class Residual:
    """The residual stream's layout: "pad" x' = [x, 0]; "tile" x' = tile(x, n) / scale; `final_gain` multiplies the
    final norm's gain (1/sqrt(n) for a tiled tied head)."""

    scheme: str
    size: int
    target: int
    scale: float = 1.0
    final_gain: float = 1.0

    @property
    def src(self) -> np.ndarray:
        t = np.arange(self.target)
        return np.where(t < self.size, t, (t - self.size) % self.size) if self.scheme == "pad" else t % self.size

    @property
    def new(self) -> np.ndarray:
        return np.arange(self.target) >= self.size


@dataclasses.dataclass(frozen=True)
class WidthPlan:
    """Everything `widen` needs: the residual layout, the unit maps, and the config changes."""

    method: str
    residual: Residual
    ffn: Units
    heads: Units
    kv_heads: Units
    changes: Mapping[str, Any]


# ------------------------------------------------------------------------------------------ planning
def _target(name: str, value, current: int) -> int:
    if value is None:
        return current
    if not is_int(value):
        raise GrowthError(f"grow_width: {name} must be an int, got {value!r}")
    if value < current:
        raise GrowthError(f"grow_width: {name}={value} is smaller than the model's {current}; width growth only "
                          "grows (prune or distil to shrink)")
    return int(value)


def head_layout(num_heads: int, num_kv_heads: int, new_heads: int, new_kv_heads: int) -> tuple[Units, Units]:
    """(query-head Units, kv-head Units) of the "exact" method (module docstring), keeping every source query head
    on a copy of its own kv head. GrowthError when the target cannot group them so."""
    h, g, h2, g2 = num_heads, num_kv_heads, new_heads, new_kv_heads
    if h2 % g2:
        raise GrowthError(f"grow_width: num_heads={h2} is not a multiple of num_kv_heads={g2}")
    r, r2 = h // g, h2 // g2
    per = -(-r // r2)  # target groups per source group
    if g * per > g2:
        raise GrowthError(
            f"grow_width: {h} query heads in {g} kv group(s) of {r} cannot keep their key-value heads in {g2} "
            f"group(s) of {r2}: a group of {r} needs {per} target group(s), {g * per} in all; choose num_kv_heads "
            f">= {g * per} dividing num_heads, or more query heads per group")
    q_src, q_new = [None] * h2, [True] * h2
    kv_src, kv_new = [0] * g2, [True] * g2
    for group in range(g):
        for j in range(per):
            kv_src[group * per + j], kv_new[group * per + j] = group, False
        for u in range(r):
            q_src[group * per * r2 + u], q_new[group * per * r2 + u] = group * r + u, False
    for j in range(g * per, g2):
        kv_src[j] = (j - g * per) % g
    used = [0] * g
    for slot in range(h2):
        if q_src[slot] is None:  # a new head: copy a source head of the group its kv head copies
            group = kv_src[slot // r2]
            q_src[slot] = group * r + used[group] % r
            used[group] += 1
    return Units(tuple(q_src), tuple(q_new), (1,) * h2), Units(tuple(kv_src), tuple(kv_new), (1,) * g2)


def _multiple(name: str, new: int, old: int) -> int:
    if new % old:
        raise GrowthError(f"grow_width: method='hypercloning' tiles whole copies; {name}={new} is not a multiple of "
                          f"the model's {old} (use method='exact' for any larger size)")
    return new // old


def plan_width(cfg: LlamaConfig, *, hidden_size=None, num_heads=None, num_kv_heads=None, intermediate_size=None,
               method: str = "exact") -> WidthPlan:
    """The WidthPlan of `grow_width` (same arguments; None keeps a size, except num_kv_heads under hypercloning,
    which follows the query heads: k G, or 1 for MQA)."""
    if not isinstance(cfg, LlamaConfig):
        raise GrowthError(f"grow_width: needs a LlamaConfig, got {type(cfg).__name__}")
    if method not in METHODS:
        raise GrowthError(f"grow_width: method={method!r} is unknown; choose one of {list(METHODS)}")
    d, h, g, f, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.dim_per_head
    d2 = _target("hidden_size", hidden_size, d)
    h2 = _target("num_heads", num_heads, h)
    f2 = _target("intermediate_size", intermediate_size, f)
    if method == "exact":
        g2 = _target("num_kv_heads", num_kv_heads, g)
        heads, kv_heads = head_layout(h, g, h2, g2)
        residual = Residual("pad", d, d2)
        ffn = Units.pad(f, f2)
        eps = cfg.rms_norm_eps * d / d2
    else:
        n, k, m = _multiple("hidden_size", d2, d), _multiple("num_heads", h2, h), _multiple("intermediate_size", f2, f)
        g2 = _target("num_kv_heads", num_kv_heads, g) if num_kv_heads is not None else (g * k if g > 1 else 1)
        heads = Units.tile(h, k)
        if g2 == g * k:
            kv_heads = Units.tile(g, k)
        elif g == g2 == 1:
            kv_heads = Units((0,), (False,), (1,))
        else:
            raise GrowthError(f"grow_width: method='hypercloning' tiles the kv heads with the query heads (x{k}): "
                              f"num_kv_heads must be {g * k}" + (" (or 1, keeping MQA)" if g == 1 else "")
                              + f", got {g2}")
        scale = math.sqrt(n) if cfg.tie_word_embeddings else 1.0
        residual = Residual("tile", d, d2, scale, scale / n if cfg.tie_word_embeddings else 1.0)
        ffn = Units.tile(f, m)
        eps = cfg.rms_norm_eps / scale ** 2
    implied = d2 // h2 if d2 % h2 == 0 else None
    changes = {"hidden_size": d2, "num_heads": h2, "num_kv_heads": g2, "intermediate_size": f2,
               "head_dim": None if cfg.head_dim is None and implied == hd else hd,
               "rms_norm_eps": eps if d2 != d else cfg.rms_norm_eps}
    return WidthPlan(method, residual, ffn, heads, kv_heads, changes)


# ------------------------------------------------------------------------------------------ per-tensor kernels
# numpy on the host, in the input's float dtype (float64 in gives float64 out: the exactness tests check the algebra
# to 1e-12 that way); no compilation per shape.
def _along(v, axis: int, ndim: int, dtype) -> np.ndarray:
    """The 1-d `v` shaped to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = len(v)
    return np.asarray(v, dtype).reshape(shape)


def _split(x, axis: int, hd: int):
    """x with `axis` split into (units, hd)."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // hd, hd) + x.shape[axis + 1:])


def _merge(x, axis: int):
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _centred(z, src: np.ndarray, live: np.ndarray, axis: int):
    """z minus, along `axis`, the mean over the live entries with the same src (zero-sum noise across copies);
    entries that are not live become 0."""
    same = (src[:, None] == src[None, :]) & live[None, :] & live[:, None]
    mean_op = (same / np.maximum(same.sum(1, keepdims=True), 1)).astype(z.dtype)  # (n', n')
    zm = np.moveaxis(z, axis, 0)
    centred = (zm - np.tensordot(mean_op, zm, axes=1)) * _along(live, 0, zm.ndim, z.dtype)
    return np.moveaxis(centred, 0, axis)


def units_in(x, axis: int, units: Units, *, hd: int = 1, key=None, noise_std: float = 0.0) -> np.ndarray:
    """Input-side weights of a unit axis (gate/up columns, q/k/v columns of heads of hd entries): target unit t
    copies source unit src[t]; new units get N(0, noise_std^2) added."""
    x = np.asarray(x)
    y = np.take(_split(x, axis, hd), np.asarray(units.src), axis=axis)
    new = np.asarray(units.new)
    if noise_std and key is not None and new.any():
        y = y + _along(new, axis, y.ndim, y.dtype) * noise_std * normal(key, y.shape, y.dtype)
    return _merge(y, axis)


def units_out(x, axis: int, units: Units, *, hd: int = 1, key=None, noise_std: float = 0.0) -> np.ndarray:
    """Output-side weights of a unit axis (down_proj rows, o_proj rows of heads): W[src[t]] / div[t], zero for new
    units; with noise, zero-sum N(0, (noise_std / div)^2) across the copies of each source unit."""
    x = np.asarray(x)
    new, div = np.asarray(units.new), np.asarray(units.div)
    y = np.take(_split(x, axis, hd), np.asarray(units.src), axis=axis)
    y = y * _along(np.where(new, 0.0, 1.0 / div), axis, y.ndim, y.dtype)
    live = ~new & (div > 1)
    if noise_std and key is not None and live.any():
        z = normal(key, y.shape, y.dtype) * noise_std * _along(1.0 / div, axis, y.ndim, y.dtype)
        y = y + _centred(z, np.asarray(units.src), live, axis)
    return _merge(y, axis)


def reads_stream(x, axis: int, res: Residual, *, key=None, noise_std: float = 0.0) -> np.ndarray:
    """Rows of a layer reading the (normed) residual stream on `axis`. pad: rows kept, new rows copy row j mod D
    (+ N(0, noise_std^2)); tile: tile(W, n) / n (+ zero-sum N(0, (noise_std / n)^2) across the n copies)."""
    x = np.asarray(x)
    src = res.src
    y = np.take(x, src, axis=axis)
    if res.scheme == "pad":
        if noise_std and key is not None and res.new.any():
            y = y + _along(res.new, axis, y.ndim, y.dtype) * noise_std * normal(key, y.shape, y.dtype)
        return y
    n = res.target // res.size
    y = y / n
    if noise_std and key is not None and n > 1:
        z = normal(key, y.shape, y.dtype) * (noise_std / n)
        y = y + _centred(z, src, np.ones(res.target, bool), axis)
    return y


def writes_stream(x, axis: int, res: Residual) -> np.ndarray:
    """Columns of a tensor writing the residual stream on `axis`: pad [W, 0]; tile tile(W, n) / scale."""
    y = np.take(np.asarray(x), res.src, axis=axis)
    if res.scheme == "pad":
        return y * _along(~res.new, axis, y.ndim, y.dtype)
    return y / np.asarray(res.scale, y.dtype)


def norm_gain(g, res: Residual, *, final: bool = False) -> np.ndarray:
    """An RMSNorm gain: pad [sqrt(D/D') g, mean(sqrt(D/D') g)]; tile tile(g) (times final_gain for the final norm)."""
    g = np.asarray(g)
    if res.scheme == "pad":
        scaled = g * np.sqrt(np.asarray(res.size / res.target, g.dtype))
        return np.where(res.new, scaled.mean(), np.take(scaled, res.src))
    return np.take(g, res.src) * np.asarray(res.final_gain if final else 1.0, g.dtype)


def gather_axis(x, axis: int, src, new, *, hd: int = 1) -> np.ndarray:
    """The "gather" mode of the kernels above, for tensors that follow parameters without being them (optimizer
    moments): along `axis` (split into units of hd entries), target unit t is source unit src[t], unscaled, and 0
    where new[t]."""
    y = np.take(_split(np.asarray(x), axis, hd), np.asarray(src), axis=axis)
    return _merge(y * _along(~np.asarray(new, bool), axis, y.ndim, y.dtype), axis)


# What each llama parameter is, axis by axis: (axis, kernel, unit axis). Applied in order.
_L = r"layers\.\d+\."
_RULES = [(re.compile(p + r"$"), rule) for p, rule in [
    (r"embed_tokens\.embedding", [(1, "writes", None)]),
    (r"lm_head\.kernel", [(0, "reads", None)]),
    (r"norm\.weight", [(0, "final_gain", None)]),
    (_L + r"(input_layernorm|post_attention_layernorm)\.weight", [(0, "gain", None)]),
    (_L + r"self_attn\.q_proj\.(kernel|bias)", [(-1, "units_in", "heads"), (0, "reads", None)]),
    (_L + r"self_attn\.[kv]_proj\.(kernel|bias)", [(-1, "units_in", "kv_heads"), (0, "reads", None)]),
    (_L + r"self_attn\.o_proj\.kernel", [(0, "units_out", "heads"), (1, "writes", None)]),
    (_L + r"self_attn\.o_proj\.bias", [(0, "writes", None)]),
    (_L + r"mlp\.(gate_proj|up_proj)\.(kernel|bias)", [(-1, "units_in", "ffn"), (0, "reads", None)]),
    (_L + r"mlp\.down_proj\.kernel", [(0, "units_out", "ffn"), (1, "writes", None)]),
    (_L + r"mlp\.down_proj\.bias", [(0, "writes", None)]),
    (_L + r"mlp\.(router|noise)\.kernel", [(0, "reads", None)]),  # noise: noisy_topk's noise weights (D, E)
    (_L + r"mlp\.experts\.(gate_proj|up_proj)", [(2, "units_in", "ffn"), (1, "reads", None)]),
    (_L + r"mlp\.experts\.down_proj", [(1, "units_out", "ffn"), (2, "writes", None)]),
]]


def _rule(path: str):
    for regex, rule in _RULES:
        if regex.match(path):
            if path.endswith(".bias"):  # a bias has only the unit axis (or only the stream axis)
                return [(0, kind, unit) for _, kind, unit in rule if kind != "reads"]
            return rule
    raise GrowthError(f"grow_width: no width rule for the parameter {path}; the operator knows the llama family's "
                      "parameters only")


def new_entries(path: str, shape, plan: WidthPlan, head_dim: int) -> np.ndarray:
    """Boolean array of `shape` (the grown shape of the llama parameter at `path` under `plan`): True at the
    entries that belong to new structure, i.e. on an axis of a new FFN unit, query head or kv head (units
    `new` in the plan's Units, head_dim entries per head) or of a new residual dimension (`plan.residual.new`; only
    meaningful for the "pad" layout). The entries everything else is built from are False. Used by masked growth
    (ops/grow/masked.py) to draw fresh weights exactly where the plan adds structure."""
    shape = tuple(shape)
    out = np.zeros(shape, bool)
    units = {"ffn": (plan.ffn, 1), "heads": (plan.heads, head_dim), "kv_heads": (plan.kv_heads, head_dim)}
    for axis, kind, unit in _rule(path):
        axis = axis % len(shape)
        if kind in ("units_in", "units_out"):
            flags = np.repeat(np.asarray(units[unit][0].new, bool), units[unit][1])
        else:
            flags = plan.residual.new
        if len(flags) != shape[axis]:
            raise GrowthError(f"new_entries: {path} has {shape[axis]} entries on axis {axis} but the plan has "
                              f"{len(flags)}")
        out |= _along(flags, axis, len(shape), bool)
    return out


def _check_plan(cfg: LlamaConfig, plan: WidthPlan) -> None:
    problems = []
    for name, units, size, target in [("ffn", plan.ffn, cfg.intermediate_size, "intermediate_size"),
                                      ("heads", plan.heads, cfg.num_heads, "num_heads"),
                                      ("kv_heads", plan.kv_heads, cfg.num_kv_heads, "num_kv_heads")]:
        if len(units) != plan.changes[target] or not all(0 <= s < size for s in units.src):
            problems.append(f"{name} maps {len(units)} target units onto sources {sorted(set(units.src))} but the "
                            f"model has {size} and the plan's {target} is {plan.changes[target]}")
    if plan.residual.size != cfg.hidden_size or plan.residual.target != plan.changes["hidden_size"]:
        problems.append(f"the residual plan {plan.residual.size} -> {plan.residual.target} does not match "
                        f"hidden_size {cfg.hidden_size} -> {plan.changes['hidden_size']}")
    if problems:
        raise GrowthError("widen: the plan was made for another model: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ the operators
def widen_moments(moments: Mapping[str, Any], cfg: LlamaConfig, plan: WidthPlan) -> dict[str, np.ndarray]:
    """Tensors shaped like the parameters of a llama model with config `cfg` (any subset of its paths, e.g. Adam's
    mu or nu) mapped as their parameters are by `plan`, in gather mode (module docstring: Moments)."""
    _check_plan(cfg, plan)
    units = {"ffn": (plan.ffn, 1), "heads": (plan.heads, cfg.dim_per_head),
             "kv_heads": (plan.kv_heads, cfg.dim_per_head)}
    res = plan.residual
    stream_new = res.new if res.scheme == "pad" else np.zeros(res.target, bool)  # tiles are copies, none new
    out = {}
    for path, x in moments.items():
        y = np.asarray(x)
        for axis, kind, unit in _rule(path):
            axis = axis % y.ndim
            if unit is not None:
                y = gather_axis(y, axis, units[unit][0].src, units[unit][0].new, hd=units[unit][1])
            else:
                y = gather_axis(y, axis, res.src, stream_new)
        out[path] = y.astype(np.asarray(x).dtype)
    return out


def widen_params(params: Mapping[str, Any], cfg: LlamaConfig, plan: WidthPlan, *, key=None,
                 noise: float = 0.0) -> dict[str, np.ndarray]:
    """The flat {path: array} of a llama model with config `cfg`, grown by `plan`, as numpy arrays of the input
    dtypes (computed in float64 for float64 input, float32 otherwise). The per-tensor part of `widen`."""
    _check_plan(cfg, plan)
    if not is_finite_real(noise) or noise < 0:
        raise GrowthError(f"grow_width: noise={noise!r} must be a finite number >= 0")
    noise = float(noise)
    if noise:
        key = check_key(key, "grow_width", f"noise={noise}")
    units = {"ffn": (plan.ffn, 1), "heads": (plan.heads, cfg.dim_per_head),
             "kv_heads": (plan.kv_heads, cfg.dim_per_head)}
    out = {}
    for path, x in params.items():
        x = np.asarray(x)
        y = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
        # noise * std of the source tensor, for every axis the tensor grows on (not of the partly grown one)
        noise_std = 0.0 if path.endswith(".bias") or not noise else noise * float(y.std())
        for axis, kind, unit in _rule(path):
            axis = axis % y.ndim
            k = path_key(key, path, f"{kind}{axis}") if noise_std else None
            if kind == "units_in":
                y = units_in(y, axis, units[unit][0], hd=units[unit][1], key=k, noise_std=noise_std)
            elif kind == "units_out":
                y = units_out(y, axis, units[unit][0], hd=units[unit][1], key=k, noise_std=noise_std)
            elif kind == "reads":
                y = reads_stream(y, axis, plan.residual, key=k, noise_std=noise_std)
            elif kind == "writes":
                y = writes_stream(y, axis, plan.residual)
            else:
                y = norm_gain(y, plan.residual, final=kind == "final_gain")
        out[path] = y.astype(x.dtype)
    return out


def widen(model, plan: WidthPlan, *, key=None, noise: float = 0.0):
    """A new model: `model` grown by `plan` (from `plan_width`); the input is not modified. See the module
    docstring for the math and `grow_width` for the arguments."""
    cfg = llama_config(model, "grow_width")
    params = widen_params(flat_params(model), cfg, plan, key=key, noise=noise)
    return rebuild(model, plan.changes, params={k: jnp.asarray(v) for k, v in params.items()})


def grow_width(model, *, hidden_size: int | None = None, num_heads: int | None = None,
               num_kv_heads: int | None = None, intermediate_size: int | None = None, method: str = "exact",
               key=None, noise: float = 0.0):
    """A wider copy of a llama-family model computing the same function (module docstring: the math).

    hidden_size, num_heads, num_kv_heads, intermediate_size: targets, each >= the model's (None keeps it; head_dim
    stays). method: "exact" (zero-extended residual stream, new units with zero output weights; any sizes) or
    "hypercloning" (tiling; every target an integer multiple, kv heads tiled with the query heads or MQA kept).
    key, noise: symmetry-breaking noise of relative size `noise` where it keeps the function (module docstring);
    noise > 0 needs a key. Returns a new consistent model (models.rebuild): rms_norm_eps follows the stream's
    scale (eps D/D' for "exact"; eps/n for hypercloning with a tied head), head_dim is written explicitly when
    hidden_size / num_heads no longer implies it. Errors (GrowthError, a ConfigError) name the target and why.
    """
    cfg = llama_config(model, "grow_width")
    plan = plan_width(cfg, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      intermediate_size=intermediate_size, method=method)
    return widen(model, plan, key=key, noise=noise)
