"""Weighted mixtures of N stacked LoRA adapters: the kernel, and a Linear that applies it with one weight vector
per batch row.

    delta = lora_mixture(x_BxTxI, a_NxIxR, b_NxRxO, s_N, w_BxTxN)      # Σ_i w_i s_i (x A_i) B_i, per token
    m = weighted_mix(base, [lora_1, lora_2, lora_3])                  # stacked factors at every adapted module
    m = with_adapter_weights(m, w_BxN)                                # row b: Σ_i w[b, i] ΔW_i
    logits = m(ids_BxT)
    plain = unroute(m)                                                # the base back (plain Linears, same arrays)

The kernel. Adapter i has A_i (in, r), B_i (r, out) and scale s_i (ranks below r zero-padded: exact); for an
input x (..., in) and weights w (..., N) (one vector per token, or broadcast from one per row):

    z[..., i, :] = x A_i                          (..., N, r)     2·M·N·r·in FLOPs for M = prod(...) tokens
    z'           = z ⊙ (w ⊙ s)[..., :, None]
    delta        = Σ_i z'[..., i, :] B_i          (..., out)      one contraction over (i, r): 2·M·N·r·out FLOPs

so the cost is that of one LoRA of rank N·r over the batch (the concatenation [A_1 .. A_N], [B_1; ..; B_N] with a
per-token gate), whatever the weights; no factor is gathered or copied per row. Adapters with weight 0 still cost
their share (PEFT's Arrow does the same); a sparse top-k path that gathers the k chosen factors per token would
cost k/N of it but materialise (M, k, in, r) gathers, and is not implemented.

Per row, Σ_i w_i s_i (x A_i) B_i = x (Σ_i w_i ΔW_i): the output-space mixture of LoRA outputs is the linear
(task-arithmetic) merge of their updates, computed without forming any in × out matrix. With one-hot weights a
row gets exactly one adapter, as `bricks.adapters.with_adapter_ids` on a mixed model does (tests: equal to 1e-6).

`RowWeightedLinear` (extension kind 'weighted_adapters') replaces each adapted Linear: it keeps the base kernel W
(in, out) and bias b, and holds lora_a (N, in, r), lora_b (N, r, out) (LoRAParam), lora_scale (N,)
(bricks.adapters.AdapterScale) and adapter_weights (B, N) (`AdapterWeights`, set by `with_adapter_weights`, state
like the mixed model's ids: new weights of the same batch size reuse the compiled program). Its output is
y = x W + b + delta with w[b] broadcast over the row's tokens.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.adapters import AdapterScale, LoRAParam, mix, mixed_modules
from configurable_fm.bricks.adapters.modules import (adapter_dtype, checked_options, linear_holding, make_variable,
                                                     sharding_axes)
from configurable_fm.bricks.deltas import Delta, LowRank, apply
from configurable_fm.bricks.paths import with_params
from configurable_fm.bricks.select import select
from configurable_fm.checks import is_finite_real
from configurable_fm.interop.peft import attach_built
from configurable_fm.models.layers import Linear
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tap, tapped
from configurable_fm.ops.route.common import RouteError, adapted_models, lora_modules

WEIGHTED_KIND = "weighted_adapters"  # the models.structure extension kind of RowWeightedLinear


class AdapterWeights(nnx.Variable):
    """The mixture weights of each batch row over the N stacked adapters, (B, N) (set by with_adapter_weights)."""


def lora_mixture(x: jax.Array, a_NxIxR: jax.Array, b_NxRxO: jax.Array, s_N: jax.Array, w: jax.Array) -> jax.Array:
    """Σ_i w[..., i] · s_i · (x A_i) B_i (module docstring): x (..., in), w (..., N) (broadcastable against x's
    leading axes) -> (..., out), in the result dtype of x and the factors."""
    z = jnp.einsum("...i,nir->...nr", x, a_NxIxR)
    z = z * (w * s_N)[..., None].astype(z.dtype)
    return jnp.einsum("...nr,nro->...o", z, b_NxRxO)


def stacked_loras(base: nnx.Module, adapters: Sequence, what: str) -> dict[str, dict[str, jax.Array]]:
    """{module path: {'lora_a' (N, in, r), 'lora_b' (N, r, out), 'lora_scale' (N,)}} of N LoRA adapters of
    `base` (adapted models or brick sets; common.lora_modules checks them), stacked by bricks.adapters.mix (which
    also checks that each adapter's base weights are `base`'s) and zero-padded to the largest rank r."""
    models = adapted_models(base, adapters, what)
    lora_modules(models, what)
    return {p: {"lora_a": m.lora_a[...], "lora_b": m.lora_b[...], "lora_scale": m.lora_scale[...]}
            for p, m in mixed_modules(mix(base, models)).items()}


class StackedLoRALinear(Linear):
    """A Linear with N stacked LoRA adapters (lora_a (N, in, r), lora_b (N, r, out), lora_scale (N,)): the base
    kernel / bias at the same paths, and `delta(x, w)` = lora_mixture with the module's factors. Subclasses decide
    where the weights w come from."""

    def _init_stack(self, base: Linear, adapters: int, rank: int) -> None:
        if type(base) is not Linear:
            raise RouteError(f"a routed adapter module wraps a plain Linear module, got {type(base).__name__}")
        if adapters < 1 or rank < 1:
            raise RouteError(f"a routed adapter module needs adapters >= 1 and rank >= 1, got {adapters}, {rank}")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        d_in, d_out = int(self.kernel.shape[0]), int(self.kernel.shape[1])
        dtype = adapter_dtype(self.kernel.get_value().dtype)
        axes = sharding_axes(self.kernel)
        ax_in, ax_out = (None, None) if axes is None else axes
        shard = axes is not None
        self.lora_a = make_variable(LoRAParam, jnp.zeros((adapters, d_in, rank), dtype),
                                    (None, ax_in, None) if shard else None)
        self.lora_b = make_variable(LoRAParam, jnp.zeros((adapters, rank, d_out), dtype),
                                    (None, None, ax_out) if shard else None)
        self.lora_scale = AdapterScale(jnp.zeros((adapters,), jnp.float32))

    @property
    def num_adapters(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[2])

    def plain(self) -> Linear:
        """A plain Linear holding this module's kernel and bias Variables (the base module)."""
        return linear_holding(self.kernel, self.bias, self.dtype)

    def base_and_input(self, x: jax.Array):
        """(x W + b in the compute dtype, x in the adapters' dtype, the compute dtype): LoRALinear's dtypes
        (the adapter term in the promoted dtype of the compute dtype and the factors, as PEFT casts x to them)."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        xd = x.astype(dtype)
        y = jnp.dot(xd, kernel.astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        ld = jnp.result_type(dtype, self.lora_a.get_value().dtype)
        return y, xd.astype(ld), dtype

    def delta(self, x_l: jax.Array, w: jax.Array) -> jax.Array:
        """Σ_i w_i s_i (x A_i) B_i with this module's factors (x in the adapters' dtype)."""
        ld = x_l.dtype
        return lora_mixture(x_l, self.lora_a[...].astype(ld), self.lora_b[...].astype(ld),
                            self.lora_scale[...].astype(ld), w.astype(ld))


class RowWeightedLinear(StackedLoRALinear):
    """y = x W + b + Σ_i w[b, i] s_i (x A_i) B_i, one weight vector per batch row (module docstring); tap point
    `weights` (B, N) (what analysis.capture sees and an intervention may replace)."""

    OPTIONS = {"adapters": (int, None), "rank": (int, None), "batch": (int, 0)}

    def __init__(self, base: Linear, *, adapters: int, rank: int, batch: int = 0):
        self._init_stack(base, adapters, rank)
        if batch < 0:
            raise RouteError(f"a row-weighted adapter module needs batch >= 0, got {batch}")
        self.adapter_weights = AdapterWeights(jnp.zeros((batch, adapters), jnp.float32))

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "RowWeightedLinear":
        return cls(base, **checked_options(WEIGHTED_KIND, options, cls.OPTIONS))

    def options(self) -> dict:
        return {"adapters": self.num_adapters, "rank": self.rank, "batch": int(self.adapter_weights.shape[0])}

    def structure_spec(self):
        return {"kind": WEIGHTED_KIND, "options": self.options()}

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        w_BxN = self.adapter_weights[...]
        if w_BxN.shape[0] == 0:
            raise RouteError("a row-weighted adapter model needs one weight vector per batch row: "
                             "ops.route.with_adapter_weights(model, weights_BxN)")
        if x.ndim < 2 or x.shape[0] != w_BxN.shape[0]:
            raise RouteError(f"a row-weighted adapter module got an input of shape {tuple(x.shape)} but holds "
                             f"weights for {w_BxN.shape[0]} rows: set weights for this batch size with "
                             "ops.route.with_adapter_weights")
        y, x_l, dtype = self.base_and_input(x)
        w_BxN = tap(self, "weights", w_BxN)
        w = w_BxN.reshape(w_BxN.shape[:1] + (1,) * (x.ndim - 2) + w_BxN.shape[1:])
        return (y.astype(x_l.dtype) + self.delta(x_l, w)).astype(dtype)


register_extension(WEIGHTED_KIND, lambda base, options, *, rngs: RowWeightedLinear.from_options(base, options))


def routed_modules(model) -> dict[str, StackedLoRALinear]:
    """{module path: routed adapter module (RowWeightedLinear, ArrowLinear)} of `model`, in model order."""
    return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model)
            if isinstance(m, StackedLoRALinear) and path}


def row_weighted_modules(model) -> dict[str, RowWeightedLinear]:
    """{module path: RowWeightedLinear} of `model` (weighted_mix's modules), in model order."""
    return {p: m for p, m in routed_modules(model).items() if isinstance(m, RowWeightedLinear)}


def weighted_mix(base: nnx.Module, adapters: Sequence, *, weights=None) -> nnx.Module:
    """A new model with the N LoRA adapters stacked at every module they adapt (RowWeightedLinear; module
    docstring); `weights` (B, N): the rows' weights, as with_adapter_weights (None: set them later).
    adapters: models of `base` with LoRA adapters (same modules in all; ranks and alphas may differ) or their
    brick sets. `base` and the adapters are untouched; the base arrays are shared. RouteError / AdapterError
    naming the adapters and modules that do not fit."""
    stacks = stacked_loras(base, adapters, "weighted_mix")
    specs = [{"path": p, "kind": WEIGHTED_KIND,
              "options": {"adapters": int(v["lora_a"].shape[0]), "rank": int(v["lora_a"].shape[2]), "batch": 0},
              "values": v} for p, v in stacks.items()]
    model = attach_built(base, specs)
    return model if weights is None else with_adapter_weights(model, weights)


def with_adapter_weights(model: nnx.Module, weights) -> nnx.Module:
    """A new model whose row-weighted modules use weights[b] (N,) for batch row b (weights (B, N), any real
    numbers: a convex combination, one-hot rows, negative weights for subtraction). Concrete weights are checked
    (shape, finite: RouteError naming the rows); traced ones only for shape. The arrays are shared, not copied."""
    modules = row_weighted_modules(model)
    if not modules:
        raise RouteError("with_adapter_weights: the model has no row-weighted adapter modules (ops.route."
                         "weighted_mix)")
    n = {m.num_adapters for m in modules.values()}
    if len(n) != 1:
        raise RouteError(f"with_adapter_weights: the modules hold different numbers of adapters {sorted(n)}; build "
                         "the model with one weighted_mix call")
    n = n.pop()
    try:
        concrete = np.asarray(weights, np.float32)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    except (TypeError, ValueError):  # ragged rows, strings
        raise RouteError(f"with_adapter_weights: weights must be a (B, {n}) array of numbers, got "
                         f"{weights!r:.80}") from None
    arr = concrete if concrete is not None else weights
    shape = tuple(getattr(arr, "shape", ()))
    if len(shape) != 2 or shape[0] == 0 or shape[1] != n:
        raise RouteError(f"with_adapter_weights: weights must be (B, {n}) (one weight per adapter for each batch "
                         f"row), got shape {shape}")
    if concrete is not None:
        bad = np.flatnonzero(~np.isfinite(concrete).all(axis=1))
        if bad.size:
            raise RouteError(f"with_adapter_weights: rows {bad[:8].tolist()} have non-finite weights")
    w = jnp.asarray(arr, jnp.float32)
    new = nnx.clone(model)
    for _, m in nnx.iter_modules(new):
        if isinstance(m, RowWeightedLinear):
            m.adapter_weights = m.adapter_weights.replace(w)
    return new


def unroute(model: nnx.Module) -> nnx.Module:
    """The base model: every routed adapter module (RowWeightedLinear, ArrowLinear) replaced by a plain Linear
    holding its kernel and bias (the same arrays). RouteError when the model has none."""
    if not routed_modules(model):
        raise RouteError("unroute: the model has no routed adapter modules (ops.route.weighted_mix / arrow)")
    return select(model).at_instances_of(StackedLoRALinear).apply(lambda m: m.plain())


@jax.jit
def _folded_kernels(kernels: dict, factors: dict, w_N: jax.Array) -> dict:
    """{'<module>.kernel': W + Σ_i w_i s_i A_i B_i} for every module of `factors` ({path: (A (N, in, r), B (N, r,
    out), s (N,))}): one bricks.deltas.LowRank per module, a = [w_i s_i A_i]_i (in, N·r), b = [B_i]_i (N·r, out),
    applied by bricks.deltas.apply. One compiled program per model structure; the weights are traced, so a new
    routing reuses it (an adapter of weight 0 adds exact zeros)."""
    terms = {}
    for path, (a_NxIxR, b_NxRxO, s_N) in factors.items():
        a = a_NxIxR.astype(jnp.float32) * (w_N * s_N)[:, None, None]
        a_Ix_NR = jnp.transpose(a, (1, 0, 2)).reshape(a.shape[1], -1)  # adapter-major columns
        terms[path] = LowRank(a_Ix_NR, b_NxRxO.astype(jnp.float32).reshape(-1, b_NxRxO.shape[2]))
    return apply(kernels, Delta(terms, kind="routed_fold"))


class FoldedModels:
    """The folded models (`folded`) of one row-weighted model (weighted_mix), each routing folded once and kept:
    folds(w) returns the same model object for equal weights (compared as float32 bytes). The plain base
    (`unroute`: 0.3 s of Python at SmolLM2-135M's shape on the 2-core CPU, benchmarks/unroute_time_2026-12-07)
    and the stacked factors are taken once, here; a fold is then one compiled program (`_folded_kernels`) and a
    functional update of the kernels. Each fold holds its own copy of the adapted kernels for the object's
    lifetime (soft routings, whose weights rarely repeat, are better served unmerged: run_routed). RouteError for
    a model without row-weighted modules."""

    def __init__(self, model: nnx.Module):
        modules = row_weighted_modules(model)
        if not modules:
            raise RouteError("folded: the model has no row-weighted adapter modules (ops.route.weighted_mix)")
        self.model = model
        self.num_adapters = next(iter(modules.values())).num_adapters
        self._base = unroute(model)
        self._kernels = {f"{p}.kernel": m.kernel[...] for p, m in modules.items()}
        self._factors = {f"{p}.kernel": (m.lora_a[...], m.lora_b[...], m.lora_scale[...]) for p, m in modules.items()}
        self._models: dict[bytes, nnx.Module] = {}

    def __call__(self, weights_N) -> nnx.Module:
        """folded(self.model, weights_N), made on first use (RouteError: folded's)."""
        try:
            w = np.asarray(weights_N, np.float64)
        except (TypeError, ValueError):  # ragged, strings
            raise RouteError(f"folded: weights must be {self.num_adapters} finite numbers (one per adapter), got "
                             f"{weights_N!r:.80}") from None
        if w.shape != (self.num_adapters,) or not np.isfinite(w).all():
            raise RouteError(f"folded: weights must be {self.num_adapters} finite numbers (one per adapter), got "
                             f"{w.tolist() if w.size <= 16 else w.shape}")
        key = (w.astype(np.float32) + np.float32(0)).tobytes()  # + 0: -0.0 and 0.0 are one routing
        if key not in self._models:  # all-zero weights: the base itself
            self._models[key] = (with_params(self._base, _folded_kernels(self._kernels, self._factors,
                                                                         jnp.asarray(w, jnp.float32)))
                                 if w.any() else self._base)
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


def folded(model: nnx.Module, weights_N) -> nnx.Module:
    """The plain model that computes what a row routed to `weights_N` (N,) computes, folded into the weights: every
    row-weighted module (weighted_mix) becomes a Linear with kernel W' = W + Σ_i w_i s_i A_i B_i, so that
    x W' + b = x W + b + Σ_i w_i s_i (x A_i) B_i (the mixture's output, up to float32 rounding) at the base's
    structure and per-token cost: no adapter term is evaluated per token. The change is one bricks.deltas.LowRank
    per module (the N adapters' factors side by side, A_i scaled by w_i s_i) applied by bricks.deltas.apply (the
    product at float32 HIGHEST precision, added in float32, cast to the kernel's dtype), all modules in one
    compiled program. weights: finite reals (one-hot: that adapter merged, as bricks.adapters.merge; 1/N each: the
    uniform merge; all zero: the base, its own arrays). `model` is untouched. RouteError for a model without
    row-weighted modules, weights of another length or non-finite ones. Many routings of one model: FoldedModels."""
    return FoldedModels(model)(weights_N)


def softmax_top_k(scores: jax.Array, k: int, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(weights (..., N), indices (..., k)): w_i = exp(c_i / T) / Σ_{j ∈ K} exp(c_j / T) for the k largest scores
    K (jax.lax.top_k: among equal scores the lower index first), 0 elsewhere; T = `temperature` > 0."""
    n = scores.shape[-1]
    if not 1 <= k <= n or not (is_finite_real(temperature) and temperature > 0):  # numpy scalars too
        raise RouteError(f"softmax_top_k: need 1 <= k <= {n} and a finite temperature > 0, got k={k}, "
                         f"temperature={temperature!r}")
    top, idx = jax.lax.top_k(scores, k)
    p = jax.nn.softmax(top / jnp.asarray(temperature, top.dtype), axis=-1)
    w = jnp.einsum("...k,...kn->...n", p, jax.nn.one_hot(idx, n, dtype=p.dtype))
    return w, idx
