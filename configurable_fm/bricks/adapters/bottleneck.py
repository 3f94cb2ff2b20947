"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) as bricks: a small residual MLP after a
sublayer's output, for the llama, gpt2 and bert families.

    m = attach_bottleneck(base, "houlsby")                      # after attention and after the FFN of every layer
    m = attach_bottleneck(base, "pfeiffer", reduction_factor=8)  # after the FFN only
    m = attach_bottleneck(base, ["layers.*.mlp", "layers.0.self_attn"], size=16, non_linearity="gelu")
    adapters.adapters(m)        # {'layers.0.mlp.down_proj': {'kind': 'bottleneck', 'size': 16, ...}, ...}
    adapters.detach(m)          # the base back (the same arrays); adapters.merge(m) / as_delta(m): AdapterError
    adapters.save_adapter(m, "out/bn"); adapters.load_adapter(base, "out/bn")     # a brick set like any adapter

The math. A sublayer (attention, FFN) ends in an output projection, a Linear with kernel W (in, d) and bias b; the
residual stream adds its output y = x W + b (x: (..., in), y: (..., d)). The adapter replaces y by

    y' = y + s · (act(y D + c) U + e)          D = adapter_down (d, r)   c = adapter_down_bias (r,)
                                               U = adapter_up   (r, d)   e = adapter_up_bias   (d,)

with r = `size` (default d // reduction_factor, AdapterHub's `reduction_factor`, default 16), act =
`non_linearity` ('relu', 'swish' = 'silu', 'gelu', 'gelu_new', 'tanh'), s = `scaling` (default 1.0). So the
adapter sits after the sublayer's output and before the residual add: the decoder layers compute
x + y' (llama, gpt2: pre-LayerNorm) and bert LN(x + y') (post-LayerNorm: AdapterHub's `original_ln_after=True`,
`original_ln_before=False`, `residual_before_ln=True`; the adapter has no LayerNorm of its own). The models have
no dropout, so "after the output projection" is exactly "after the sublayer output".

Placement. `targets` is a preset or module path globs (bricks.select globs). A glob may name
  - a sublayer, and the adapter goes after its output projection (the module that holds it is the adapted one):
        llama  LlamaAttention `layers.*.self_attn` -> `.o_proj`       LlamaMLP `layers.*.mlp` -> `.down_proj`
        gpt2   GPT2Attention  `h.*.attn` -> `.c_proj`                 GPT2MLP  `h.*.mlp`      -> `.c_proj`
        bert   BertAttention  `encoder.layer.*.attention` -> `.output.dense`
               BertResidualOutput `encoder.layer.*.output` (FFN) / `encoder.layer.*.attention.output` -> `.dense`
  - or a plain Linear itself (the adapter goes after that Linear's output).
Presets (AdapterHub's configs): 'houlsby' = attention and FFN sublayers of every layer, non_linearity 'swish';
'pfeiffer' = FFN sublayers only, non_linearity 'relu'; explicit globs default to 'relu'. MoE FFNs (SparseMoE) have
no single output Linear and are refused, as are globs that match nothing, other modules, or a Linear that has an
adapter already (a LoRA on `o_proj` and a bottleneck after the attention cannot share that module).

Initial values (keys from (seed, module path), never from call order): init 'kaiming' (AdapterHub's
init_weights='mam_adapter'): D ~ U(±1/sqrt(d)) (torch's kaiming_uniform with a=sqrt(5) on the (r, d) weight),
U = 0 and c = e = 0, so a fresh adapter is exactly the identity (y' = y + s · 0: bit for bit); init 'random': U ~
U(±1/sqrt(r)), c ~ U(±1/sqrt(d)), e ~ U(±1/sqrt(r)) as well (nn.Linear's default), for tests and examples.

The adapter's parameters are `BottleneckParam` (an `AdapterParam`), float32 over a lower-precision base kernel, so
the trainer trains them alone with `trainable=('BottleneckParam:**',)` (or 'AdapterParam:**' for every adapter).
The module (`BottleneckLinear`, kind 'bottleneck') is a `models.layers.Linear` that keeps kernel / bias at their
paths, describes itself to models.structure (registered here: `check_consistent` and orbax round trips accept it;
`to_hf` / `to_peft` refuse it by path), and is nonlinear: it cannot be merged into W, so `merge` and `as_delta`
raise AdapterError naming it (detach it, or keep it as a brick). PEFT has no bottleneck adapter: no PEFT interop.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.adapters.core import match_targets, path_key, target_globs
from configurable_fm.bricks.adapters.modules import (AdaptedLinear, AdapterError, AdapterParam, adapter_dtype,
                                                     checked_options, make_variable, sharding_axes)
from configurable_fm.bricks.select import module_index
from configurable_fm.checks import is_finite_real, is_int, is_real
from configurable_fm.interop.peft import attach_built
from configurable_fm.models.bert import BertAttention, BertResidualOutput
from configurable_fm.models.factory import family_name
from configurable_fm.models.gpt2 import GPT2MLP, GPT2Attention
from configurable_fm.models.layers import ACTIVATIONS, Linear
from configurable_fm.models.llama import LlamaAttention, LlamaMLP
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tapped

KIND = "bottleneck"
NON_LINEARITIES = {**{k: ACTIVATIONS[k] for k in ("relu", "swish", "silu", "gelu", "gelu_new")}, "tanh": jnp.tanh}
INITS = ("kaiming", "random")
DEFAULT_REDUCTION_FACTOR = 16
# The sublayer classes and the path (below them) of the Linear that computes their output.
SUBLAYER_OUTPUTS: dict[type, str] = {LlamaAttention: "o_proj", LlamaMLP: "down_proj", GPT2Attention: "c_proj",
                                     GPT2MLP: "c_proj", BertAttention: "output.dense", BertResidualOutput: "dense"}
# Presets per family: (attention sublayers, FFN sublayers) globs; 'houlsby' takes both, 'pfeiffer' the FFN ones.
SUBLAYERS = {"llama": ("layers.*.self_attn", "layers.*.mlp"), "gpt2": ("h.*.attn", "h.*.mlp"),
             "bert": ("encoder.layer.*.attention", "encoder.layer.*.output")}
PRESETS = {"houlsby": {"attention": True, "non_linearity": "swish"},
           "pfeiffer": {"attention": False, "non_linearity": "relu"}}
LEAVES = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")


class BottleneckParam(AdapterParam):
    """A bottleneck adapter's projection or bias (adapter_down, adapter_down_bias, adapter_up, adapter_up_bias)."""


class BottleneckLinear(AdaptedLinear):
    """y' = y + s · (act(y D + c) U + e), y = x W + b (module docstring); adapter_down D (out, r), adapter_down_bias
    c (r,), adapter_up U (r, out), adapter_up_bias e (out,). Never merged: nonlinear in y."""

    kind = KIND
    mergeable = False
    LEAVES = LEAVES
    OPTIONS = {"size": (int, None), "non_linearity": (str, "relu"), "scaling": ((int, float), 1.0),
               "merged": (bool, False)}

    def __init__(self, base: Linear, *, size: int, non_linearity: str = "relu", scaling: float = 1.0,
                 merged: bool = False):
        if merged:
            raise AdapterError("a bottleneck adapter is nonlinear and cannot be merged into the Linear's weights")
        self._init_base(base, False)
        if isinstance(size, bool) or size < 1:
            raise AdapterError(f"bottleneck adapter: size must be an int >= 1, got {size!r}")
        if non_linearity not in NON_LINEARITIES:
            raise AdapterError(f"bottleneck adapter: non_linearity={non_linearity!r} is not one of "
                               f"{sorted(NON_LINEARITIES)}")
        if not math.isfinite(float(scaling)):
            raise AdapterError(f"bottleneck adapter: scaling must be a finite number, got {scaling!r}")
        self.size, self.non_linearity, self.scaling = int(size), str(non_linearity), float(scaling)
        d, r = self.out_features, self.size
        dtype = adapter_dtype(self.kernel.get_value().dtype)
        axes = sharding_axes(self.kernel)
        out_axis = None if axes is None else axes[1]
        ax = lambda *names: None if axes is None else names
        self.adapter_down = make_variable(BottleneckParam, jnp.zeros((d, r), dtype), ax(out_axis, None))
        self.adapter_down_bias = make_variable(BottleneckParam, jnp.zeros((r,), dtype), ax(None))
        self.adapter_up = make_variable(BottleneckParam, jnp.zeros((r, d), dtype), ax(None, out_axis))
        self.adapter_up_bias = make_variable(BottleneckParam, jnp.zeros((d,), dtype), ax(out_axis))

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "BottleneckLinear":
        return cls(base, **checked_options(cls.kind, options, cls.OPTIONS))

    def options(self) -> dict:
        return {"size": self.size, "non_linearity": self.non_linearity, "scaling": self.scaling, "merged": False}

    def bottleneck(self, y: jax.Array) -> jax.Array:
        """s · (act(y D + c) U + e) for sublayer outputs y (..., out), in the adapter's dtype (float32 over bf16)."""
        ld = jnp.result_type(y.dtype, self.adapter_down.get_value().dtype)
        h = y.astype(ld)
        z = NON_LINEARITIES[self.non_linearity](jnp.dot(h, self.adapter_down[...].astype(ld))
                                                + self.adapter_down_bias[...].astype(ld))
        return (jnp.dot(z, self.adapter_up[...].astype(ld)) + self.adapter_up_bias[...].astype(ld)) * self.scaling

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        y, _, _, dtype = self._linear(x)
        delta = self.bottleneck(y)
        return (y.astype(delta.dtype) + delta).astype(dtype)

    def _nonlinear(self, what: str):
        raise AdapterError(f"{what}: a bottleneck adapter (act(y D + c) U) is nonlinear in the Linear's output and "
                           "has no weight change to merge; detach it or keep it as a brick")

    def merged_values(self) -> dict:
        self._nonlinear("merge")

    def unmerged_values(self) -> dict:
        self._nonlinear("unmerge")

    def weight_change(self) -> dict:
        self._nonlinear("weight_change")


register_extension(KIND, lambda base, options, *, rngs: BottleneckLinear.from_options(base, options))


# ------------------------------------------------------------------------------------------ attaching
def _family(model) -> str | None:
    try:
        return family_name(model.cfg)
    except (TypeError, AttributeError):
        return None


def _preset(model, name: str) -> tuple[list[str], str]:
    """(the sublayer globs, the default non-linearity) of preset `name` for `model`'s family."""
    family = _family(model)
    if family not in SUBLAYERS:
        raise AdapterError(f"attach_bottleneck: the preset {name!r} knows the llama, gpt2 and bert families, not "
                           f"{type(model).__name__}; give module path globs")
    attention, ffn = SUBLAYERS[family]
    preset = PRESETS[name]
    return ([attention, ffn] if preset["attention"] else [ffn]), preset["non_linearity"]


def _output_linear(index: dict, path: str) -> tuple[str | None, str | None]:
    """(the path of the Linear after whose output an adapter at `path` sits, None) or (None, why not)."""
    node = index[path][1]
    if isinstance(node, AdaptedLinear):
        return None, f"{path} already has a {node.kind} adapter (detach or merge it first)"
    if type(node) is Linear:
        return path, None
    rel = next((r for cls, r in SUBLAYER_OUTPUTS.items() if type(node) is cls), None)
    if rel is None:
        known = ", ".join(f"{c.__name__} (.{r})" for c, r in SUBLAYER_OUTPUTS.items())
        return None, (f"{path} is a {type(node).__name__}: neither a plain Linear nor a sublayer with a known "
                      f"output projection ({known})")
    out = f"{path}.{rel}"
    inner = index.get(out, (None, None))[1]
    if isinstance(inner, AdaptedLinear):
        return None, f"{path}'s output projection {out} already has a {inner.kind} adapter (detach or merge it first)"
    if type(inner) is not Linear:
        return None, f"{path}'s output projection {out} is a {type(inner).__name__}, not a plain Linear"
    return out, None


def bottleneck_targets(model, targets: str | Sequence[str] = "houlsby") -> list[str]:
    """The paths of the Linear modules that `attach_bottleneck(model, targets)` adapts, in model order (module
    docstring: presets, sublayers -> their output projections, plain Linears); AdapterError naming every glob that
    matches nothing and every matched module that cannot take a bottleneck adapter."""
    globs = _preset(model, targets)[0] if isinstance(targets, str) and targets in PRESETS else \
        target_globs(targets, "attach_bottleneck(targets=...)")
    index = module_index(model)
    paths = match_targets(index, globs, "attach_bottleneck")
    problems, chosen = [], set()
    for p in paths:
        out, why = _output_linear(index, p)
        if why:
            problems.append(why)
        else:
            chosen.add(out)
    if problems:
        raise AdapterError(f"attach_bottleneck: {len(problems)} target(s) cannot take a bottleneck adapter: "
                           + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
                           + " (target sublayers such as 'layers.*.mlp' / 'layers.*.self_attn', or Linear modules)")
    return [p for p in index if p in chosen]


def _values(lin: Linear, r: int, init: str, seed: int, path: str) -> dict:
    w = lin.kernel.get_value()
    d = int(w.shape[1])
    dtype = adapter_dtype(w.dtype)
    u = lambda purpose, shape, bound: jax.random.uniform(path_key(seed, path, purpose), shape, jnp.float32,
                                                         -bound, bound).astype(dtype)
    values = {"adapter_down": u("adapter_down", (d, r), 1.0 / math.sqrt(d)),
              "adapter_down_bias": jnp.zeros((r,), dtype), "adapter_up": jnp.zeros((r, d), dtype),
              "adapter_up_bias": jnp.zeros((d,), dtype)}
    if init == "random":
        values.update(adapter_down_bias=u("adapter_down_bias", (r,), 1.0 / math.sqrt(d)),
                      adapter_up=u("adapter_up", (r, d), 1.0 / math.sqrt(r)),
                      adapter_up_bias=u("adapter_up_bias", (d,), 1.0 / math.sqrt(r)))
    return values


def attach_bottleneck(model, targets: str | Sequence[str] = "houlsby", *, reduction_factor: float | None = None,
                      size: int | None = None, non_linearity: str | None = None, scaling: float = 1.0,
                      init: str = "kaiming", seed: int = 0) -> nnx.Module:
    """A new model with a bottleneck adapter after each targeted sublayer output (module docstring).

    targets: 'houlsby' | 'pfeiffer' (presets) or module path glob(s) of sublayers or Linear modules. The bottleneck
    width r is `size`, else max(1, d // reduction_factor) (default factor 16) for a module with d outputs; giving
    both is an error. non_linearity: default the preset's ('swish' / 'relu'), 'relu' for globs. scaling s (float),
    init 'kaiming' (U = 0: the identity) or 'random'. `model` is untouched; the base arrays are shared.
    """
    if size is not None and reduction_factor is not None:
        raise AdapterError("attach_bottleneck: give size (the bottleneck width r) or reduction_factor (r = d // "
                           "factor), not both")
    if size is not None and (not is_int(size) or size < 1):
        raise AdapterError(f"attach_bottleneck: size must be an int >= 1, got {size!r}")
    factor = DEFAULT_REDUCTION_FACTOR if reduction_factor is None else reduction_factor
    if not is_finite_real(factor) or factor < 1:
        raise AdapterError(f"attach_bottleneck: reduction_factor must be a number >= 1, got {reduction_factor!r}")
    if init not in INITS:
        raise AdapterError(f"attach_bottleneck: init={init!r} is not a bottleneck initialisation {list(INITS)}")
    if not is_real(scaling):
        raise AdapterError(f"attach_bottleneck: scaling must be a number, got {scaling!r}")
    default_act = _preset(model, targets)[1] if isinstance(targets, str) and targets in PRESETS else "relu"
    act = default_act if non_linearity is None else non_linearity
    if act not in NON_LINEARITIES:
        raise AdapterError(f"attach_bottleneck: non_linearity={act!r} is not one of {sorted(NON_LINEARITIES)}")
    index = module_index(model)
    specs = []
    for p in bottleneck_targets(model, targets):
        lin = index[p][1]
        d = int(lin.kernel.shape[1])
        r = int(size) if size is not None else max(1, int(d // factor))
        options = {"size": r, "non_linearity": act, "scaling": float(scaling), "merged": False}
        specs.append({"path": p, "kind": KIND, "options": options, "values": _values(lin, r, init, seed, p)})
    return attach_built(model, specs)

