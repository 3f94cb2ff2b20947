"""Masked structural growth (MSG; Yao, Zhang, Li, Wang, ICLR 2024) of llama-family models: new structure with
ordinary random weights, gated by masks that a training task ramps from 0 to 1.

    grown = grow_masked(model, hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560,
                        num_layers=40, key=jax.random.key(0))          # r = 0: the source's function
    train(config, workdir, model=grown, task=MaskRampTask(start=0, steps=5000))   # train/ramp.py: r 0 -> 1
    plain = unmask(trained)                                            # every ramp at 1: fold the masks away

Unlike the zero-write "exact" scheme of grow_width / grow_depth (new output weights 0, new stream entries 0), every
new weight is drawn as a freshly built model's (N(0, 0.02) kernels and embedding columns, unit norm gains, zero
biases), and function preservation comes from the masks (models/masked.py): with m_u = 1 for an old unit and r for
a new one, the ramp r a `GrowthRamp` variable (not a Param) in every mask module, starting at `ramp` (default 0).

Notation as in width.py: D, H, G, F, L the source's hidden size, query heads, kv heads, FFN width, layers; primes
the targets; hd = head_dim (never changes).

- FFN width F -> F': new units t >= F (Units.pad) get fresh gate/up columns and down_proj rows; every layer's
  down_proj becomes a MaskedLinear over its F' input units, y = (h * m) @ W_down: new units add r * (their output).
- Heads H -> H', G -> G' (head_dim fixed): the layout of width.head_layout (every source query head keeps a copy
  of its kv head; duplicated kv heads are copies, which is exact); new query heads and new kv heads get fresh q/k/v
  columns and o_proj rows, and every o_proj becomes a MaskedLinear over H' units of hd features: new heads add
  r * (their output). (MSG masks the new heads' q/k/v; gating the head's output is the same function at r = 0
  and r = 1.)
- Hidden size D -> D' (x' = [x, x_new]): the new stream dims get fresh columns in every writer (embedding, o_proj,
  down_proj) and fresh rows in every reader (q/k/v, gate/up, lm_head), so they carry nonzero values from the
  start. Every reader sees the stream through an RMSNorm, and every RMSNorm (input, post-attention, final)
  becomes a MaskedRMSNorm with MSG's masked statistics,
      x_m = x' * m,   y = x_m / sqrt(sum(x_m^2) / (D + r (D' - D)) + eps) * g'      g' = [g, 1]
  At r = 0 the new dims read as exactly 0 and the old ones are normalised over the D old dims: [RMSNorm(x), 0],
  so readers' new rows multiply zeros and the old stream entries evolve as in the source; at r = 1 it is the plain
  RMSNorm over D' dims. eps and the old gains are kept (no sqrt(D/D') rescaling, unlike grow_width's "exact").
- Depth L -> L' (new layers at `positions`, or spread evenly to `num_layers`: grow_depth's placement,
  depth.depth_sources): each new layer is a freshly built layer whose o_proj and down_proj are MaskedLinears with
  every unit new, y = r (x W + b): both residual branches scaled by r,
      h1 = h + r attn(norm1(h)),   out = h1 + r mlp(norm2(h1))
  (the identity at r = 0, the plain layer at r = 1; MSG blends the whole block, h + c (Block(h) - h), which feeds
  the MLP h + attn instead of h + c attn in between; both ends are the same).

Exactness: at r = 0 the grown model computes the source's logits up to float rounding (zero terms added to sums;
<= 1e-5 in float32 in the tests) whatever the new weights; gradients reach the new structure once r > 0 (at r = 0
the masked inputs and outputs are 0, as in MSG). The new model has the target config with rms_norm_eps unchanged;
the masks are extension modules (models.structure), so check_consistent, orbax save/load and the trainer accept
the model (HF export does not: unmask first). Random draws depend only on (key, target path) (prng.path_key).
MoE models are refused (their experts' down projections are not Linears to mask); a model that already has
extension modules (e.g. masks of an earlier growth) must be unmasked first.

`unmask(model)` checks that every mask's ramp is exactly 1 and returns the same variables in the plain model the
config builds (MaskedLinear at r = 1 is the Linear, MaskedRMSNorm at r = 1 the RMSNorm over D' dims): the same
function up to rounding. `with_ramp(model, r)` is a copy with every ramp set to r.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_real
from configurable_fm.models.masked import MASK_KINDS, GrowthRamp, ranges_of
from configurable_fm.models.structure import abstract_model, build_options, extension_specs, fill, variables_of
from configurable_fm.ops.grow.common import GrowthError, check_key, fresh, llama_config
from configurable_fm.ops.grow.depth import depth_sources
from configurable_fm.ops.grow.width import new_entries, plan_width, widen_params
from configurable_fm.prng import path_key

OP = "grow_masked"


def _renamed(e: GrowthError, source: str) -> GrowthError:
    """The same error with `source:` (the operator whose planning raised it) named as grow_masked."""
    message = str(e)
    return GrowthError(OP + message[len(source):] if message.startswith(source) else f"{OP}: {message}")


def _ramp_value(ramp) -> float:
    if not is_real(ramp):
        raise GrowthError(f"{OP}: ramp={ramp!r} must be a number in [0, 1]")
    r = float(ramp)
    if not 0.0 <= r <= 1.0:
        raise GrowthError(f"{OP}: ramp={ramp!r} must lie in [0, 1]")
    return r


def grow_masked(model, *, hidden_size: int | None = None, num_heads: int | None = None,
                num_kv_heads: int | None = None, intermediate_size: int | None = None,
                num_layers: int | None = None, positions: Sequence[int] | None = None, key=None,
                ramp: float = 0.0):
    """A larger copy of a llama-family model whose new structure has fresh random weights behind growth masks
    (module docstring: the math). At ramp r = 0 (the default) it computes the source's function.

    hidden_size, num_heads, num_kv_heads, intermediate_size: width targets, each >= the model's (None keeps it;
    the head layout is width.head_layout's, so num_kv_heads must keep every source group on its own kv heads).
    num_layers / positions: new layers (grow_depth's placement: insertion points in source numbering, or a target
    count spread evenly); applied after the width growth (new layers have the target width). key: PRNG key (or int
    seed) of the fresh weights (required). ramp: the initial value of every mask's GrowthRamp.
    Returns a new consistent model (target config, rms_norm_eps unchanged) with MaskedLinear / MaskedRMSNorm
    extension modules; the input is untouched. GrowthError (a ConfigError) names a bad target or option."""
    cfg = llama_config(model, OP)
    if cfg.num_experts:
        raise GrowthError(f"{OP}: the model is a sparse MoE ({cfg.num_experts} experts); masked growth gates dense "
                          "MLPs only (grow the dense model, then upcycle)")
    r0 = _ramp_value(ramp)
    widths = dict(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                  intermediate_size=intermediate_size)
    deepen = num_layers is not None or positions is not None
    if all(v is None for v in widths.values()) and not deepen:
        raise GrowthError(f"{OP}: nothing to grow; pass a width target (hidden_size, num_heads, num_kv_heads, "
                          "intermediate_size) and/or num_layers or positions")
    key = check_key(key, OP, "masked growth (fresh weights for the new structure)")
    try:
        plan = plan_width(cfg, method="exact", **widths)
        layers = (depth_sources(cfg.num_layers, method="identity", num_layers=num_layers, positions=positions)
                  if deepen else [(i, False) for i in range(cfg.num_layers)])
    except GrowthError as e:
        raise _renamed(e, "grow_depth" if "grow_depth" in str(e) else "grow_width") from None
    hd = cfg.dim_per_head
    new_cfg = dataclasses.replace(cfg, **{**plan.changes, "rms_norm_eps": cfg.rms_norm_eps},
                                  num_layers=len(layers))

    # Width: the exact plan's layout, with fresh values at every entry of new structure; old gains unscaled.
    src_params = flat_params(model)
    wide = widen_params(src_params, cfg, plan)
    target_path = {i: j for j, (i, _) in enumerate(layers) if i is not None}  # source layer -> its new index

    def renumber(path: str) -> str:
        if path.startswith("layers."):
            _, i, rest = path.split(".", 2)
            return f"layers.{target_path[int(i)]}.{rest}"
        return path

    values: dict = {}
    template: dict[str, np.ndarray] = {}  # layer 0's grown params, relative paths: shapes of a new layer
    for path, x in wide.items():
        final = renumber(path)
        if path.endswith("norm.weight"):  # masked statistics renormalise: old gains as they were, new ones 1
            x = np.where(plan.residual.new, np.ones((), x.dtype), np.take(np.asarray(src_params[path]),
                                                                        plan.residual.src))
        new = new_entries(path, x.shape, plan, hd)
        if new.any():
            x = np.where(new, fresh(final, x.shape, x.dtype, path_key(key, final, "masked")), x)
        values[final] = jnp.asarray(x)
        if path.startswith("layers.0."):
            template[path.split(".", 2)[2]] = x

    # Depth: fresh layers of the target width.
    for j, (i, _) in enumerate(layers):
        if i is None:
            for rel, x in template.items():
                final = f"layers.{j}.{rel}"
                values[final] = jnp.asarray(fresh(final, x.shape, x.dtype, path_key(key, final, "masked")))

    # The masks.
    specs = []

    def mask(path: str, kind: str, **options):
        specs.append({"path": path, "kind": kind, "options": options})
        values[f"{path}.ramp"] = jnp.asarray(r0, jnp.float32)

    heads_new = [list(s) for s in ranges_of(plan.heads.new)]
    ffn_new = [list(s) for s in ranges_of(plan.ffn.new)]
    stream_new = [list(s) for s in ranges_of(plan.residual.new)]
    h2, f2 = new_cfg.num_heads, new_cfg.intermediate_size
    for j, (i, _) in enumerate(layers):
        p = f"layers.{j}"
        if i is None or heads_new:
            mask(f"{p}.self_attn.o_proj", "masked_linear", new=[[0, h2]] if i is None else heads_new, unit_size=hd)
        if i is None or ffn_new:
            mask(f"{p}.mlp.down_proj", "masked_linear", new=[[0, f2]] if i is None else ffn_new, unit_size=1)
        if stream_new:
            mask(f"{p}.input_layernorm", "masked_rms_norm", new=stream_new)
            mask(f"{p}.post_attention_layernorm", "masked_rms_norm", new=stream_new)
    if stream_new:
        mask("norm", "masked_rms_norm", new=stream_new)
    if new_cfg == cfg:
        raise GrowthError(f"{OP}: the targets equal the model's sizes; nothing to grow")
    return fill(abstract_model(new_cfg, specs, **build_options(model)), values)


def _mask_specs(model) -> list[dict]:
    return [s for s in extension_specs(model) if s["kind"] in MASK_KINDS]


def mask_ramps(model) -> dict[str, float]:
    """{path of a mask's GrowthRamp: its value} of every growth mask in `model` (models/masked.py)."""
    variables = variables_of(model)
    return {f"{s['path']}.ramp": float(np.asarray(variables[f"{s['path']}.ramp"].get_value()))
            for s in _mask_specs(model)}


def with_ramp(model, value: float):
    """A copy of `model` with every GrowthRamp variable set to `value` (in [0, 1]); the input is untouched."""
    r = float(value)
    if not 0.0 <= r <= 1.0:
        raise GrowthError(f"with_ramp: value={value!r} must lie in [0, 1]")
    copy = nnx.clone(model)  # new Variables (nnx.merge of a split would share them with `model`)
    for var in variables_of(copy).values():
        if isinstance(var, GrowthRamp):
            var.set_value(jnp.full(var.get_value().shape, r, var.get_value().dtype))
    return copy


def unmask(model):
    """The plain model (the config's modules, no growth masks) with `model`'s variables, less the ramps: the same
    function, since every mask at r = 1 is the module it wraps (module docstring). Other extension modules are
    kept. GrowthError when the model has no growth masks, or naming every ramp that is not exactly 1."""
    specs = extension_specs(model)
    masks = [s for s in specs if s["kind"] in MASK_KINDS]
    if not masks:
        raise GrowthError("unmask: the model has no growth masks (extension kinds "
                          f"{list(MASK_KINDS)}); nothing to fold")
    ramps = mask_ramps(model)
    off = [f"{p}={v:g}" for p, v in ramps.items() if v != 1.0]
    if off:
        shown = ", ".join(off[:8]) + (f" (+{len(off) - 8} more)" if len(off) > 8 else "")
        raise GrowthError(f"unmask: {len(off)} of {len(ramps)} growth ramp(s) are not 1, so the new structure is "
                          f"not fully faded in and folding the masks would change the function: {shown}; train "
                          "until the ramp reaches 1 (train.ramp.MaskRampTask), or set it with with_ramp(model, 1.0) "
                          "to accept the change")
    keep = [s for s in specs if s["kind"] not in MASK_KINDS]
    values = {p: v.get_value() for p, v in variables_of(model).items() if p not in ramps}
    return fill(abstract_model(model.cfg, keep, **build_options(model)), values)
