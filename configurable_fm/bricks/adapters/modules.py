"""The adapted Linear modules: LoRA (+ rsLoRA), DoRA and (IA)³, as PEFT computes them.

Each replaces a `models.layers.Linear` at the same path and keeps its `kernel` (in, out) and `bias` there, adding its
own parameters as leaves of the same module (x: (..., in); W = kernel; b = bias or 0):

    LoRALinear  (kind 'lora'):  y = x W + b + s · (x A) B            lora_a A (in, r), lora_b B (r, out)
                                s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)
    DoRALinear  (kind 'dora'):  y = f ⊙ (x W + s · (x A) B) + b       + lora_magnitude m (out,)
                                f = m / ||W + s A B||, the norm per output feature (over the input axis) of the
                                unmerged weight, a constant for gradients (stop_gradient)
    IA3Linear   (kind 'ia3'):   y = (x W + b) ⊙ l                     ia3_scale l (out,): output side (k, v, ...)
                                y = (x ⊙ l) W + b                     ia3_scale l (in,):  feedforward (down proj.)

PEFT's tensors are torch-oriented: lora_A.weight = Aᵀ (r, in), lora_B.weight = Bᵀ (out, r), lora_magnitude_vector
= m, ia3_l = l as (out, 1) or (1, in) (interop/peft.py converts). Note the output-side IA3 scales the bias too (PEFT
scales the base layer's output, and merges l into the bias); the DoRA bias is not scaled.

Merged (`merged=True`, what `adapters.merge(model, keep=True)` makes): the kernel (and IA3's bias) hold the merged
weights and the module computes the plain Linear; the adapter stays, so `adapters.unmerge` can undo it as PEFT does:
    LoRA  W' = W + ΔW,            ΔW = s A B                    unmerge: W = W' − ΔW
    DoRA  W' = (m / n) ⊙ (W + ΔW), n = ||W + ΔW|| per output    unmerge: W = W' ⊙ n / m − ΔW (n kept in
          `lora_weight_norm`, a DoRANorm variable, as PEFT caches it: it cannot be recovered from W')
    IA3   W' = W ⊙ l (per output; b' = b ⊙ l) or l ⊙ W (per input)   unmerge: divide by l (l = 0 cannot be undone)
Unmerging is exact up to float rounding (one rounding each way), as in PEFT.

LoRA dropout (PEFT's lora_dropout) is a training setting, not part of the adapter: inside `with lora_dropout(key,
p):` every unmerged LoRA module computes y = x W + b + s · (dropout_p(x) A) B, dropout_p(x) = x ⊙ k / (1 − p) with
k ~ Bernoulli(1 − p) elementwise (inverted dropout, torch's nn.Dropout), the call i of the trace drawing from
fold_in(key, i). Outside the context (evaluation, inference, merging) there is no dropout. The trainer enters it
for every training step when config.adapter.lora.dropout > 0 (train/adapters.py). DoRA refuses it (PEFT then
recomputes the base output on the dropped input: not implemented here); IA3 has no dropout in PEFT.

The LoRA term has two evaluations with the same value (`LoRALinear.matmul`, set by `with_lora_matmul`):
    'separate' (default)  y = x W + b + s · (x A) B: two more products and a sum over the (..., out) outputs
    'joint'               y = [x | s · x A | 0] @ [W ; B ; 0] + b: the adapter inside the base product's
                          contraction (K = in + r, zero-padded to a multiple of JOINT_PAD = 64 for whole GEMM
                          tiles), so the (..., out) outputs are written once; costs a copy of x and of W (the
                          concatenations) per call, and B in the compute dtype
    'auto'                'joint' where out >= in (q/o and gate/up of a llama), 'separate' elsewhere (k/v, down)
Unmerged LoRA only (DoRA, (IA)³ and dropout keep 'separate'). Measured on one H200 (BENCHMARKS.md, "Routing cost"):
at 1B x 64 x 512 tokens 'joint' on every projection (then unpadded) made the one-adapter forward slower (1.171x
the base against 1.123x); one projection alone, rank padded to 64, was faster for 2048 -> 8192 (1.83 against
2.18 ms, the base 1.71) and 2048 -> 2048 (0.72 / 0.78 / 0.55) and slower for 8192 -> 2048 and 2048 -> 512: hence
'auto', not measured in the whole model yet.

Adapter parameters are `LoRAParam` / `IA3Param` (both `AdapterParam`, an nnx.Param), so the trainer selects them by
type ('LoRAParam:**', 'AdapterParam:**') and `bricks.flat_params` sees them by path (`...q_proj.lora_a`). They are
float32 over a lower-precision base (PEFT's autocast_adapter_dtype), the base kernel's dtype otherwise. The adapter
path computes in the Linear's compute dtype when one is set, else in the promotion of the base's and the factors'
dtypes (`adapter_compute_dtype`: PEFT with and without torch.autocast). Each module describes itself for
models.structure (`structure_spec`: kinds 'lora', 'dora', 'ia3', registered when this module is imported), so models
with adapters pass `check_consistent` and round-trip through orbax checkpoints, while `to_hf` refuses them by name
(merge or detach first).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.deltas import LowRank, shifted
from configurable_fm.errors import UserError
from configurable_fm.models.layers import Linear
from configurable_fm.models.llama import loop_layers
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tapped


class AdapterError(UserError, ValueError):
    """An adapter that cannot be attached, merged, saved or loaded as asked; the message names the paths."""


_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("lora_dropout", default=None)


@contextlib.contextmanager
def lora_dropout(key: jax.Array, rate: float):
    """Training-time LoRA dropout inside the block (module docstring): `key` a PRNG key (traced is fine), `rate`
    the drop probability p in [0, 1); p = 0 is no dropout. With p > 0 a llama with scan_layers runs its layer loop
    (models.llama.loop_layers): a scanned body would draw the same masks for every layer."""
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise AdapterError(f"lora_dropout: the rate must lie in [0, 1), got {rate}")
    token = _DROPOUT.set({"key": key, "rate": rate, "calls": 0} if rate > 0 else None)
    try:  # the layer loop, not a scan (scan_layers): the calls are counted while tracing, once per scan body
        with loop_layers() if rate > 0 else contextlib.nullcontext():
            yield
    finally:
        _DROPOUT.reset(token)


LORA_MATMULS = ("separate", "joint", "auto")
JOINT_PAD = 64  # 'joint' pads the contraction's LoRA block to a multiple of this (whole GEMM tiles on a GPU)


def dropout_active() -> bool:
    """Whether a `lora_dropout` block with a positive rate is active."""
    return _DROPOUT.get() is not None


def _dropped(x: jax.Array) -> jax.Array:
    """x with inverted dropout when a `lora_dropout` block is active (each call its own key), else x itself."""
    state = _DROPOUT.get()
    if state is None:
        return x
    key = jax.random.fold_in(state["key"], state["calls"])
    state["calls"] += 1
    keep = jax.random.bernoulli(key, 1.0 - state["rate"], x.shape)
    return jnp.where(keep, x / (1.0 - state["rate"]), jnp.zeros((), x.dtype)).astype(x.dtype)


class AdapterParam(nnx.Param):
    """A parameter that an adapter adds to a module (select them all with 'AdapterParam:**')."""


class LoRAParam(AdapterParam):
    """A LoRA factor (lora_a, lora_b) or DoRA's magnitude (lora_magnitude)."""


class IA3Param(AdapterParam):
    """An (IA)³ scaling vector (ia3_scale)."""


class DoRANorm(nnx.Variable):
    """||W + ΔW|| per output feature, kept by a merged DoRA module so that it can be unmerged (not a parameter)."""


def adapter_dtype(kernel_dtype):
    """float32 for a lower-precision kernel (as PEFT keeps adapters), else the kernel's dtype."""
    return jnp.promote_types(kernel_dtype, jnp.float32)


def adapter_compute_dtype(module_dtype, dtype, factor_dtype):
    """The dtype of the adapter path s · (x A) B (and DoRA's combination): the Linear's explicit compute dtype
    `module_dtype` when it has one (flax's `dtype`, the computation dtype; PEFT under torch.autocast likewise runs
    the adapter's matmuls in the autocast dtype), else the promotion of the base's dtype and the factors' (PEFT
    without autocast: x cast to lora_A's dtype, so float32 factors compute in float32)."""
    return jnp.dtype(module_dtype) if module_dtype is not None else jnp.result_type(dtype, factor_dtype)


def dora_output(y, xw, bias, f_lora, f, ld):
    """DoRA's y + ((f - 1) · base + f ⊙ lora) in `ld` (PEFT's order of operations: result + ((f - 1) · base_result
    + f · lora_result · s)), base = x W = y - b; f = m / ||W + sAB|| (..., out) in float32 until f - 1 is formed,
    so f - 1 keeps its digits in any ld. y, xw: the Linear's output with and without its bias (None: no bias);
    f_lora: f ⊙ s (x A) B, the adapter's term already scaled by f (DoRALinear folds f into B's columns)."""
    base = y.astype(ld) - bias.astype(ld) if bias is not None else xw.astype(ld)
    return y.astype(ld) + ((f - 1).astype(ld) * base + f_lora)


def sharding_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names a variable was created with (its `out_sharding` metadata), or None."""
    axes = var.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def make_variable(cls, value, axes) -> nnx.Variable:
    """A `cls` variable holding `value`, with logical axis names `axes` (None: unsharded)."""
    if axes is None:
        return cls(value)
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


@functools.cache
def _abstract_linear(use_bias: bool) -> Linear:
    """An abstract 1 x 1 Linear (shapes only), traced once per `use_bias`: linear_holding clones it."""
    return nnx.eval_shape(lambda: Linear(1, 1, axes=(None, None), use_bias=use_bias, rngs=nnx.Rngs(0)))


def linear_holding(kernel: nnx.Variable, bias: nnx.Variable | None, dtype) -> Linear:
    """A plain `models.layers.Linear` whose kernel and bias are these Variables (not copies) and whose compute dtype
    is `dtype`: the base module of an adapter-like wrapper, given back when the wrapper is removed. (A clone of a
    cached abstract Linear: tracing a new one per module made ops.route.unroute of SmolLM2-135M's 210 projections
    take 1.15-1.23 s, against 0.30 s now; benchmarks/unroute_time_2026-12-07/unroute_time.py.)"""
    lin = nnx.clone(_abstract_linear(bias is not None))
    lin.kernel, lin.dtype = kernel, dtype
    if bias is not None:
        lin.bias = bias
    return lin


def checked_options(kind: str, options: Mapping[str, Any], spec: Mapping[str, Any]) -> dict:
    """Options of `kind` checked against spec {name: (type(s), default)}; AdapterError naming the bad ones."""
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise AdapterError(f"{kind} adapter: unknown option(s) {unknown}; its options are {sorted(spec)}")
    out = {}
    for name, (types, default) in spec.items():
        value = options.get(name, default)
        if value is None:
            raise AdapterError(f"{kind} adapter: option {name!r} is required")
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            raise AdapterError(f"{kind} adapter: option {name}={value!r} must be a {getattr(types, '__name__', types)}")
        out[name] = value
    return out


class AdaptedLinear(Linear):
    """What the adapted Linear modules share: the base kernel/bias at the same paths, the `merged` flag, the plain
    Linear computation, and rebuilding (`_replaced`)."""

    kind: str = ""
    merged: bool = False

    def _init_base(self, base: Linear, merged: bool) -> None:
        if not isinstance(base, Linear):
            raise AdapterError(f"a {self.kind} adapter wraps a Linear module, got {type(base).__name__}")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.merged = bool(merged)

    @property
    def in_features(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.kernel.shape[1])

    def options(self) -> dict:
        raise NotImplementedError

    def structure_spec(self):
        return {"kind": self.kind, "options": self.options()}

    def _linear(self, x):
        """(x W + b, x W, x in the compute dtype, the compute dtype): the plain Linear's computation."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        xd = x.astype(dtype)
        xw = jnp.dot(xd, kernel.astype(dtype))
        y = xw + self.bias[...].astype(dtype) if self.bias is not None else xw
        return y, xw, xd, dtype

    def _replaced(self, values: Mapping[str, Any], **options) -> "AdaptedLinear":
        """A new module of this kind with `options` changed and the variables named in `values` ({leaf: array})
        replaced (same type and metadata); the other variables are this module's own (select clones them)."""
        new = type(self).from_options(self, {**self.options(), **options})
        for name, var in vars(new).items():
            if isinstance(var, nnx.Variable) and name not in values and isinstance(getattr(self, name, None),
                                                                                   nnx.Variable):
                setattr(new, name, getattr(self, name))
        for name, value in values.items():
            var = getattr(new, name)
            setattr(new, name, var.replace(jnp.asarray(value, var.get_value().dtype)))
        return new

    def plain(self, kernel=None, bias=None) -> Linear:
        """A plain Linear holding this module's kernel and bias Variables (or new values for them), same metadata."""
        k = self.kernel if kernel is None else self.kernel.replace(jnp.asarray(kernel, self.kernel.get_value().dtype))
        b = self.bias if bias is None or self.bias is None else self.bias.replace(
            jnp.asarray(bias, self.bias.get_value().dtype))
        return linear_holding(k, b, self.dtype)

    # Subclasses: merged_values() -> {leaf: array} of the merged module (from an unmerged one);
    # unmerged_values() -> {leaf: array} of the unmerged module (from a merged one); weight_change() -> {leaf: f32
    # change of kernel/bias} that merging makes (from an unmerged module).

    def merged_module(self) -> "AdaptedLinear":
        """This adapter with its change merged into kernel (and bias): computes the plain Linear, can be unmerged."""
        if self.merged:
            return self
        return self._replaced(self.merged_values(), merged=True)

    def unmerged_module(self) -> "AdaptedLinear":
        """This adapter with the base weights restored (PEFT's unmerge: exact up to rounding)."""
        if not self.merged:
            return self
        return self._replaced(self.unmerged_values(), merged=False)


# ------------------------------------------------------------------------------------------ LoRA / DoRA
class LoRALinear(AdaptedLinear):
    """y = x W + b + s · (x A) B (module docstring); lora_a A (in, r), lora_b B (r, out), s = alpha / r
    (alpha / sqrt(r) with rslora)."""

    kind = "lora"
    OPTIONS = {"rank": (int, None), "alpha": ((int, float), None), "rslora": (bool, False), "merged": (bool, False)}
    matmul = "separate"  # how the unmerged term is evaluated (LORA_MATMULS; with_lora_matmul): the graph, not the state
    JOINT_CAPABLE = True  # with_lora_matmul sets `matmul` on modules that declare this (MixedLinear too; not DoRA)

    def __init__(self, base: Linear, *, rank: int, alpha: float, rslora: bool = False, merged: bool = False):
        self._init_base(base, merged)
        if rank < 1:
            raise AdapterError(f"{self.kind} adapter: rank must be >= 1, got {rank}")
        if not math.isfinite(float(alpha)):
            raise AdapterError(f"{self.kind} adapter: alpha must be a finite number, got {alpha!r}")
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        dtype = adapter_dtype(self.kernel.get_value().dtype)
        axes = sharding_axes(self.kernel)
        self.lora_a = make_variable(LoRAParam, jnp.zeros((self.in_features, self.rank), dtype),
                            None if axes is None else (axes[0], None))
        self.lora_b = make_variable(LoRAParam, jnp.zeros((self.rank, self.out_features), dtype),
                            None if axes is None else (None, axes[1]))

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "LoRALinear":
        return cls(base, **checked_options(cls.kind, options, cls.OPTIONS))

    def options(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "merged": self.merged}

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `scaling`)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def low_rank(self) -> LowRank:
        """ΔW = s A B as a bricks.deltas.LowRank term (kernel-shaped, (in, out))."""
        return LowRank(self.lora_a[...], self.lora_b[...], self.scale)

    def _lora(self, xd, dtype, out_scale=None):
        """s · (x A) B in the adapter's dtype (PEFT casts x to lora_A's dtype); x dropped out inside a
        `lora_dropout` block. With `out_scale` (out,) float32: (x A) (B ⊙ out_scale), the scale folded into B's
        columns (an (r, out) product instead of a pass over the (..., out) activations and their gradients)."""
        a, b = self.lora_a[...], self.lora_b[...]
        ld = adapter_compute_dtype(self.dtype, dtype, a.dtype)
        xa = jnp.dot(_dropped(xd.astype(ld)), a.astype(ld))
        if out_scale is None:
            return jnp.dot(xa, b.astype(ld)) * self.scale, ld
        return jnp.dot(xa, (b.astype(jnp.float32) * out_scale).astype(ld)), ld

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        if joint_matmul(self) and not self.merged and not dropout_active():
            return self._joint(x)
        y, _, xd, dtype = self._linear(x)
        if self.merged:
            return y
        lora, ld = self._lora(xd, dtype)
        return (y.astype(ld) + lora).astype(dtype)

    def _joint(self, x: jax.Array) -> jax.Array:
        """y = [x | s · x A | 0] @ [W ; B ; 0] + b, one product of contraction in + r padded to a multiple of
        JOINT_PAD (matmul 'joint'): x A in the adapter's compute dtype, then both blocks in the Linear's."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        xd = x.astype(dtype)
        a, b = self.lora_a[...], self.lora_b[...]
        pad = -self.rank % JOINT_PAD
        ld = adapter_compute_dtype(self.dtype, dtype, a.dtype)
        a = jnp.pad(a.astype(ld), ((0, 0), (0, pad)))
        xa = (jnp.dot(xd.astype(ld), a) * self.scale).astype(dtype)
        w = jnp.concatenate([kernel.astype(dtype), jnp.pad(b.astype(dtype), ((0, pad), (0, 0)))], axis=0)
        y = jnp.dot(jnp.concatenate([xd, xa], axis=-1), w)
        return y + self.bias[...].astype(dtype) if self.bias is not None else y

    def merged_values(self) -> dict:
        return {"kernel": shifted(self.kernel[...], self.low_rank())}

    def unmerged_values(self) -> dict:
        return {"kernel": shifted(self.kernel[...], self.low_rank(), -1.0)}

    def weight_change(self) -> dict:
        return {"kernel": self.low_rank()}


def joint_matmul(module) -> bool:
    """Whether a LoRA-carrying module (LoRALinear, MixedLinear) evaluates its term jointly with the base product:
    its `matmul` is 'joint', or 'auto' and its kernel (in, out) has out >= in."""
    in_features, out_features = module.kernel.shape
    return module.matmul == "joint" or (module.matmul == "auto" and out_features >= in_features)


def with_lora_matmul(model: nnx.Module, mode: str) -> nnx.Module:
    """A new model whose LoRALinear modules evaluate their unmerged term as `mode` (LORA_MATMULS, module docstring):
    'separate' x W + s (x A) B, 'joint' [x | s x A] @ [W ; B] or 'auto' (joint where out >= in); the same values to
    float rounding. A runtime setting: it changes the compiled program, not the state, the structure spec or
    checkpoints (merge, unmerge and the other operations that rebuild a module return it as 'separate'). The arrays
    are shared; `model` is untouched. Mixed-adapter modules (mixed.py) take the setting too (their 'joint' stacks
    every adapter's B under W). AdapterError for another mode or a model without LoRA modules (DoRA's are not
    affected)."""
    if mode not in LORA_MATMULS:
        raise AdapterError(f"with_lora_matmul: mode must be one of {LORA_MATMULS}, got {mode!r}")
    new = nnx.clone(model)
    loras = [m for _, m in nnx.iter_modules(new) if getattr(m, "JOINT_CAPABLE", False)]
    if not loras:
        raise AdapterError("with_lora_matmul: the model has no LoRA modules (bricks.adapters.attach or mix)")
    for m in loras:
        m.matmul = mode
    return new


class DoRALinear(LoRALinear):
    """y = f ⊙ (x W + s (x A) B) + b, f = m / ||W + s A B|| per output feature (module docstring);
    lora_magnitude m (out,); merged: + lora_weight_norm (out,). Computed as y + (f - 1) ⊙ x W + (x A)(B ⊙ f s):
    f folded into B's columns, so the (..., out) activations see one combination pass (PEFT: two products)."""

    kind = "dora"
    JOINT_CAPABLE = False

    def __init__(self, base: Linear, *, rank: int, alpha: float, rslora: bool = False, merged: bool = False):
        super().__init__(base, rank=rank, alpha=alpha, rslora=rslora, merged=merged)
        axes = sharding_axes(self.kernel)
        out_axes = None if axes is None else (axes[1],)
        dtype = adapter_dtype(self.kernel.get_value().dtype)
        self.lora_magnitude = make_variable(LoRAParam, jnp.ones((self.out_features,), dtype), out_axes)
        self.lora_weight_norm = make_variable(DoRANorm, jnp.ones((self.out_features,), dtype), out_axes) if merged else None

    def weight_norm(self) -> jax.Array:
        """n = ||W + s A B|| per output feature (over the input axis 0 of our (in, out) kernel; PEFT's dim 1 of the
        torch (out, in) weight), float32, from the unmerged kernel, without forming W + s A B
        (`LowRank.column_norms`: a pass over W instead of writing and reading an (in, out) float32 temporary)."""
        return self.low_rank().column_norms(self.kernel[...])

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        y, xw, xd, dtype = self._linear(x)
        if self.merged:
            return y
        if dropout_active():
            raise AdapterError("DoRA with LoRA dropout is not implemented (PEFT recomputes the base output on the "
                               "dropped input); train DoRA with dropout 0")
        n = jax.lax.stop_gradient(self.weight_norm())  # PEFT / DoRA §4.3: no gradient through the norm
        f = self.lora_magnitude[...].astype(jnp.float32) / n
        f_lora, ld = self._lora(xd, dtype, out_scale=f * self.scale)  # f ⊙ s (x A) B = (x A) (B ⊙ f s)
        return dora_output(y, xw, None if self.bias is None else self.bias[...], f_lora, f, ld).astype(dtype)

    def merged_values(self) -> dict:
        w = self.kernel[...]
        n = self.weight_norm()
        f = self.lora_magnitude[...].astype(jnp.float32) / n
        merged = f[None, :] * (w.astype(jnp.float32) + self.low_rank().materialize(jnp.float32))
        return {"kernel": merged.astype(w.dtype), "lora_weight_norm": n}

    def unmerged_values(self) -> dict:
        w = self.kernel[...]
        f = self.lora_magnitude[...].astype(jnp.float32) / self.lora_weight_norm[...].astype(jnp.float32)
        base = w.astype(jnp.float32) / f[None, :] - self.low_rank().materialize(jnp.float32)
        return {"kernel": base.astype(w.dtype)}

    def _replaced(self, values, **options):
        new = super()._replaced({k: v for k, v in values.items() if k != "lora_weight_norm"}, **options)
        if new.lora_weight_norm is not None and "lora_weight_norm" in values:
            norm = new.lora_weight_norm
            new.lora_weight_norm = norm.replace(jnp.asarray(values["lora_weight_norm"], norm.get_value().dtype))
        return new

    def weight_change(self) -> dict:
        w = self.kernel[...]
        return {"kernel": self.merged_values()["kernel"].astype(jnp.float32) - w.astype(jnp.float32)}


# ------------------------------------------------------------------------------------------ (IA)³
class IA3Linear(AdaptedLinear):
    """Output side: y = (x W + b) ⊙ l, l (out,); feedforward: y = (x ⊙ l) W + b, l (in,) (module docstring)."""

    kind = "ia3"
    OPTIONS = {"feedforward": (bool, False), "merged": (bool, False)}

    def __init__(self, base: Linear, *, feedforward: bool = False, merged: bool = False):
        self._init_base(base, merged)
        self.feedforward = bool(feedforward)
        axes = sharding_axes(self.kernel)
        n = self.in_features if self.feedforward else self.out_features
        axis = None if axes is None else ((axes[0],) if self.feedforward else (axes[1],))
        self.ia3_scale = make_variable(IA3Param, jnp.ones((n,), adapter_dtype(self.kernel.get_value().dtype)), axis)

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "IA3Linear":
        return cls(base, **checked_options(cls.kind, options, cls.OPTIONS))

    def options(self) -> dict:
        return {"feedforward": self.feedforward, "merged": self.merged}

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return self._linear(x)[0]
        l = self.ia3_scale[...]
        if self.feedforward:  # PEFT: base_layer((x * l).to(x.dtype))
            return self._linear((x.astype(l.dtype) * l).astype(x.dtype))[0]
        y, _, _, dtype = self._linear(x)  # PEFT: (base_layer(x) * l).to(result dtype)
        return (y.astype(jnp.result_type(dtype, l.dtype)) * l).astype(dtype)

    def _scaled(self, l):
        w = self.kernel[...].astype(jnp.float32)
        if self.feedforward:
            return l[:, None] * w, None
        b = None if self.bias is None else self.bias[...].astype(jnp.float32) * l
        return w * l[None, :], b

    def _values(self, kernel, bias) -> dict:
        out = {"kernel": kernel.astype(self.kernel.get_value().dtype)}
        if bias is not None:
            out["bias"] = bias.astype(self.bias.get_value().dtype)
        return out

    def merged_values(self) -> dict:
        return self._values(*self._scaled(self.ia3_scale[...].astype(jnp.float32)))

    def unmerged_values(self) -> dict:
        l = self.ia3_scale[...].astype(jnp.float32)
        return self._values(*self._scaled(1.0 / l))

    def weight_change(self) -> dict:
        kernel, bias = self._scaled(self.ia3_scale[...].astype(jnp.float32))
        out = {"kernel": kernel - self.kernel[...].astype(jnp.float32)}
        if bias is not None:
            out["bias"] = bias - self.bias[...].astype(jnp.float32)
        return out


# The kinds and their parameter leaves are interop.peft.ADAPTER_LEAVES (the format layer reads and writes them).
ADAPTER_TYPES: dict[str, type[AdaptedLinear]] = {"lora": LoRALinear, "dora": DoRALinear, "ia3": IA3Linear}

for _kind, _cls in ADAPTER_TYPES.items():
    register_extension(_kind, lambda base, options, *, rngs, _cls=_cls: _cls.from_options(base, options))
