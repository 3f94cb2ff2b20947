"""Arrow routing (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"):
per-token, per-module mixtures of a library of LoRA adapters, routed by each adapter's prototype; with the
optional GenKnowSub refinement (Belofsky et al., ACL 2025).

    m = arrow(base, [lora_1, lora_2, lora_3], top_k=2, temperature=1.0)       # ArrowLinear at adapted modules
    m = arrow(base, tasks, top_k=2, general=[general_1, general_2])            # with GenKnowSub
    logits = m(ids_BxT)
    _, w = analysis.capture(m, "layers.*.self_attn.q_proj.routing", ids_BxT)  # per-token weights (B, T, N)
    p_NxI = lora_prototypes(a_NxIxR, b_NxRxO)                                   # the prototypes alone
    base_again = unroute(m)

Notation per adapted module (our kernels are (in, out), y = x W): adapter i = 1..N has A_i (in, r), B_i (r, out),
scale s_i, update ΔW_i = s_i A_i B_i (in, out) (PEFT's torch weight is ΔW_iᵀ).

Prototype: p_i = the top left singular vector of ΔW_i (in,): ΔW_i = Σ_j σ_j u_j v_jᵀ, p_i = u_1, the input
direction the update amplifies most (PEFT's "top right singular vector of ΔW = B A" in torch's (out, in)
orientation). The scale does not change it. Computed exactly and without forming ΔW_i: A_i = Q R (thin QR,
Q (in, r)), R B_i = U Σ Vᵀ (an r × out SVD), p_i = Q U[:, 0]; O(in·r² + r²·out) per adapter. A singular vector is
defined up to sign: ours has its largest-magnitude entry positive (routing uses |·|, so the sign is irrelevant);
p_i = 0 when ΔW_i = 0 (as PEFT's power iteration returns), so such an adapter scores 0. When σ_1 = σ_2 the vector
is not unique (any unit vector of the top singular subspace is as good; ours is LAPACK's).

Routing, per token x (in,) at each module separately (the module's own input):
    c_i  = |<x, p_i>|                                 (N,)   not divided by ||x|| (PEFT and the paper)
    K    = the top_k largest c_i                      (jax.lax.top_k; equal scores: the lower index first)
    w_i  = exp(c_i / T) / Σ_{j ∈ K} exp(c_j / T)      for i ∈ K, 0 otherwise (T = temperature)
    y    = x W + b + Σ_i w_i s_i (x A_i) B_i          (mixture.lora_mixture: one rank-N·r matmul pair)
The weights are the module's tap point `routing` (..., N): analysis.capture reads them, an intervention replaces
them (e.g. to force one adapter).

GenKnowSub (`general` adapters G): per module, Ā = mean_{g ∈ G} A_g, B̄ = mean_{g ∈ G} B_g, and every task adapter
becomes A_i − Ā, B_i − B̄ (its scale s_i kept) before the prototypes are computed; the general adapters are not
routed. This is factor by factor, as PEFT 0.21.2 does (the update becomes s_i (A_i − Ā)(B_i − B̄), not ΔW_i − ΔW̄,
which would not be rank r); the general adapters' scales are ignored in the averages, as in PEFT. It needs equal
ranks (PEFT: equal ranks for all adapters).

Deviations from PEFT 0.21.2 (`peft.tuners.lora.arrow`), on purpose:
* Prototypes by QR + SVD (exact) instead of 15 steps of power iteration from a random start: the two agree to
  float rounding when σ_2/σ_1 is small (the power iteration's error shrinks like (σ_2/σ_1)^30) and PEFT's is not
  converged otherwise (measured on random rank-4 LoRAs of a tiny Llama: 1 − |cos| between PEFT's prototype and
  the exact one up to 0.25, and logits that differ by up to 1.3); ours do not depend on an RNG seed.
* Task adapters may have different ranks (zero-padded: exact) and alphas; PEFT requires one rank. Without
  GenKnowSub only the target modules must agree (as PEFT requires).
* top_k > N is a RouteError (torch.topk raises too); ties in the scores keep the lower index (torch.topk's order
  among equal values is unspecified).
Tested against PEFT's create_arrow_model on a tiny random Llama (tests/ops/route/test_arrow.py).

The model keeps the base kernels at their paths; each adapted Linear becomes an `ArrowLinear` (extension kind
'arrow': lora_a (N, in, r), lora_b (N, r, out), lora_scale (N,), arrow_prototypes (N, in) (`Prototypes`, a
constant, not a parameter), top_k and temperature), so it passes models.check_consistent, generates with
models.generation.generate (routing per generated token) and round-trips through orbax checkpoints.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.adapters import mix, mixed_modules
from configurable_fm.bricks.adapters.modules import checked_options, make_variable, sharding_axes
from configurable_fm.checks import is_finite_real, is_int
from configurable_fm.interop.peft import attach_built
from configurable_fm.models.layers import Linear
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tap, tapped
from configurable_fm.ops.route.common import RouteError, adapted_models, lora_modules
from configurable_fm.ops.route.mixture import StackedLoRALinear, softmax_top_k

ARROW_KIND = "arrow"  # the models.structure extension kind of ArrowLinear
DEFAULT_TOP_K = 3  # PEFT's ArrowConfig default
DEFAULT_TEMPERATURE = 1.0  # PEFT's ArrowConfig default


class Prototypes(nnx.Variable):
    """Arrow's prototype of each stacked adapter, (N, in): a constant derived from the factors, not trained."""


@jax.jit
def lora_prototypes(a_NxIxR: jax.Array, b_NxRxO: jax.Array) -> jax.Array:
    """The top left singular vector of each A_n B_n (in, out), (N, in) float32 (module docstring: exact, by
    QR of A_n and SVD of R B_n; sign: largest-|·| entry positive; 0 for a zero product)."""
    a = a_NxIxR.astype(jnp.float32)
    b = b_NxRxO.astype(jnp.float32)
    q, r = jnp.linalg.qr(a)  # (N, in, r), (N, r, r)
    u, s, _ = jnp.linalg.svd(jnp.matmul(r, b, precision=jax.lax.Precision.HIGHEST), full_matrices=False)
    p = jnp.einsum("nir,nr->ni", q, u[:, :, 0], precision=jax.lax.Precision.HIGHEST)
    pivot = jnp.take_along_axis(p, jnp.argmax(jnp.abs(p), axis=1)[:, None], axis=1)
    p = p * jnp.where(pivot < 0, -1.0, 1.0)
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=1, keepdims=True), 1e-30)  # Q U[:, 0] is unit up to rounding
    return jnp.where((s[:, :1] > 0) & jnp.isfinite(s[:, :1]), p, 0.0)


def arrow_weights(x: jax.Array, prototypes_NxI: jax.Array, top_k: int, temperature: float) -> jax.Array:
    """Arrow's routing weights (..., N) of tokens x (..., in): softmax over the top_k of |<x, p_i>| / T, 0 for
    the others (module docstring)."""
    return softmax_top_k(jnp.abs(jnp.einsum("...i,ni->...n", x, prototypes_NxI)), top_k, temperature)[0]


class ArrowLinear(StackedLoRALinear):
    """y = x W + b + Σ_i w_i(x) s_i (x A_i) B_i with Arrow's per-token weights w(x) (module docstring)."""

    OPTIONS = {"adapters": (int, None), "rank": (int, None), "top_k": (int, DEFAULT_TOP_K),
               "temperature": (float, DEFAULT_TEMPERATURE)}

    def __init__(self, base: Linear, *, adapters: int, rank: int, top_k: int = DEFAULT_TOP_K,
                 temperature: float = DEFAULT_TEMPERATURE):
        self._init_stack(base, adapters, rank)
        check_arrow_options(top_k, temperature, adapters, "ArrowLinear")
        self.top_k, self.temperature = int(top_k), float(temperature)
        axes = sharding_axes(self.kernel)
        self.arrow_prototypes = make_variable(Prototypes, jnp.zeros((adapters, int(self.kernel.shape[0])),
                                                                    self.lora_a.get_value().dtype),
                                              None if axes is None else (None, axes[0]))

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "ArrowLinear":
        options = dict(options)
        if is_int(options.get("temperature")):
            options["temperature"] = float(options["temperature"])
        return cls(base, **checked_options(ARROW_KIND, options, cls.OPTIONS))

    def options(self) -> dict:
        return {"adapters": self.num_adapters, "rank": self.rank, "top_k": self.top_k,
                "temperature": self.temperature}

    def structure_spec(self):
        return {"kind": ARROW_KIND, "options": self.options()}

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        y, x_l, dtype = self.base_and_input(x)
        w = arrow_weights(x_l, self.arrow_prototypes[...].astype(x_l.dtype), self.top_k, self.temperature)
        w = tap(self, "routing", w)
        return (y.astype(x_l.dtype) + self.delta(x_l, w)).astype(dtype)


register_extension(ARROW_KIND, lambda base, options, *, rngs: ArrowLinear.from_options(base, options))


def check_arrow_options(top_k, temperature, n: int, what: str) -> None:
    """RouteError unless 1 <= top_k <= n (an int) and temperature is a finite number > 0."""
    if not is_int(top_k) or not 1 <= top_k <= n:
        raise RouteError(f"{what}: top_k must be an int in 1..{n} (the number of task adapters), got {top_k!r}")
    if not is_finite_real(temperature) or temperature <= 0:
        raise RouteError(f"{what}: temperature must be a finite number > 0, got {temperature!r}")


def arrow(base: nnx.Module, adapters: Sequence, *, top_k: int = DEFAULT_TOP_K,
          temperature: float = DEFAULT_TEMPERATURE, general: Sequence | None = None) -> nnx.Module:
    """A new model routing every token through a top_k mixture of the N task `adapters` at every module they adapt
    (module docstring: prototypes, weights, GenKnowSub, deviations from PEFT).

    base: the plain model. adapters: N >= 1 LoRA adapters of `base` (adapted models or brick sets; the same
    target modules; ranks and alphas may differ unless `general` is given). top_k in 1..N; temperature > 0.
    general: general-knowledge LoRA adapters for GenKnowSub (the same modules and ranks as the task adapters).
    `base` and the adapters are untouched; the base arrays are shared.
    RouteError naming the adapters / modules: non-LoRA or merged adapters, different target modules, unequal
    ranks with `general`, a bad top_k or temperature; AdapterError (from bricks.adapters.mix) for adapters of
    another base.
    """
    what = "arrow"
    tasks = adapted_models(base, adapters, what)
    gks = [] if general is None else adapted_models(base, general, f"{what}(general=...)")
    check_arrow_options(top_k, temperature, len(tasks), what)
    lora_modules(tasks + gks, what, same_rank=bool(gks))
    n = len(tasks)
    specs = []
    for path, m in mixed_modules(mix(base, tasks + gks)).items():
        a, b, s = m.lora_a[...], m.lora_b[...], m.lora_scale[...]
        if gks:
            a = a[:n] - jnp.mean(a[n:], axis=0)
            b = b[:n] - jnp.mean(b[n:], axis=0)
            s = s[:n]
        specs.append({"path": path, "kind": ARROW_KIND,
                      "options": {"adapters": n, "rank": int(a.shape[2]), "top_k": int(top_k),
                                  "temperature": float(temperature)},
                      "values": {"lora_a": a, "lora_b": b, "lora_scale": s,
                                 "arrow_prototypes": lora_prototypes(a, b)}})
    return attach_built(base, specs)


def arrow_modules(model) -> dict[str, ArrowLinear]:
    """{module path: ArrowLinear} of `model`, in model order."""
    return {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, ArrowLinear)}
