"""Mixtral-style sparse mixture-of-experts FFN, with token-choice and expert-choice routing.

router logits r = x @ router (B, T, E). Routing rules (LlamaConfig.router):
  topk_softmax:  (v, i) = top_k(r, k); w = softmax(v)          (Mixtral; equals softmax-then-top-k renormalised)
  softmax_topk:  (w, i) = top_k(softmax(r), k)                  (no renormalisation; Qwen-MoE norm_topk_prob=False)
  noisy_topk:    topk_softmax on h = r + eps * softplus(x @ noise), eps ~ N(0, 1) (B, T, E), drawn only inside a
                 `routing_noise(key)` context (training); elsewhere h = r, so evaluation and generation are
                 deterministic and equal topk_softmax with the same router (Shazeer et al. 2017, noisy top-k gating;
                 the noise weights `noise.kernel` (D, E) are a parameter of the layer).
  expert_choice: s = softmax(r) (B, T, E); each expert e takes the C tokens of a row with the largest s[:, e] and
                 gives token t the weight s[t, e]; a token may be taken by several experts or by none (Zhou et al.
                 2022). C = ceil(cf * T * k / E) (cf = router_capacity_factor, 1.0 when None; capped at T), so the
                 experts process k tokens per token on average when cf = 1.
y = sum_e combine[t, e] * down_e(act(gate_e(x)) * up_e(x)), combine[t, e] = the weight of expert e for token t
(0 for the experts that do not process it).

Token-choice capacity (router_capacity_factor = cf for the three token-choice rules; None, the default, means no
capacity: exactly the rules above). Each row (sequence) of T tokens is one group; every expert processes at most
C = ceil(cf * T * k / E) of the row's T * k assignments (token t's j-th choice, j = 0..k-1). Assignments are
served in the order (position t, then choice rank j): assignment (t, j) to expert e is kept iff fewer than C
earlier assignments of the row (earlier positions, or the same token's better-ranked choices) went to e. A dropped
assignment gets weight 0 and the other weights are not renormalised (Switch / GShard: the token's dropped share
goes through the residual connection only). The order makes a token's routing depend only on itself and the
tokens before it in its row (causal for a fixed C), but C depends on the row length T: a cached decode (T = 1 per
step, C >= 1, nothing dropped) routes differently from a full forward, and padded positions take up capacity.
Capacity is a training-time device.

Expert choice is for encoders and other non-causal use: whether a token is taken depends on the scores of every
token of its row, later ones included, so in a causal LM it leaks future tokens into the present (training looks
better than generation can be), and a cached decode (T = 1) gives every expert the token.

Ties: jax.lax.top_k keeps the lower index first: token-choice ties go to the lower expert index, expert-choice ties
to the earlier position.

Experts are stacked along a leading `experts` axis: gate_proj/up_proj (E, D, F), down_proj (E, F, D). The forward
reads them through `expert_weight`, which adds the change of a LoRA attached to a stacked weight
(bricks.adapters.experts: the child `experts.<name>_lora`).
The combine is computed densely over all experts with zero weight for the unchosen ones: exact, simple,
and E/k times the FLOPs of a dispatching implementation.

Randomness of noisy_topk. The forward stays a pure function of (parameters, inputs): the noise is drawn only when a
key is given, by entering `routing_noise(key)` around the forward (inside the jitted function: a jitted function
traced outside the context keeps no noise). The i-th noisy MoE call of the forward (i = 0, 1, ... in call order, i.e.
layer order) draws eps from fold_in(key, i); remat recomputes the same eps (the key is traced once per layer). The
trainer's MoE task (train/moe.py MoETask) enters it with fold_in(rng, ...) of the step's rng; any other task trains
a noisy_topk model without noise (plain top-k; the noise weights then get no gradient).

Tap points (configurable_fm.analysis): `<moe path>.router_logits` (B, T, E): the logits the rule acts on (r, or h
while noise is drawn; an intervention changes the routing), `<moe path>.hidden` act(gate_e(x)) * up_e(x) of every
expert (B, T, E, F) (the unchosen experts' too, which get weight 0), and the module's `input` / `output`.
`routing(router_logits, k, rule, capacity_factor)` recomputes a layer's routing (combine weights, which tokens each
expert processes, the token-choice assignments before capacity) from the captured logits (train/moe.py does).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.models.layers import Linear, activation, normal, param
from configurable_fm.models.taps import tap, tapped

ROUTERS = ("topk_softmax", "softmax_topk", "noisy_topk", "expert_choice")
TOKEN_CHOICE = ("topk_softmax", "softmax_topk", "noisy_topk")


class Routing(NamedTuple):
    """One layer's routing. combine (B, T, E) float32: the weight of expert e in token t's output (0 where e does not
    process t); dispatch (B, T, E) bool: e processes t; chosen (B, T, E) bool: t's token-choice assignments before
    capacity (= dispatch without a capacity, and for expert choice)."""

    combine_BxTxE: jax.Array
    dispatch_BxTxE: jax.Array
    chosen_BxTxE: jax.Array


def route(router_logits_BxTxE: jax.Array, k: int, rule: str) -> tuple[jax.Array, jax.Array]:
    """Token-choice rules: (weights, expert indices), both (B, T, k), before any capacity. noisy_topk is
    topk_softmax of the logits given (which hold the noise when it is drawn)."""
    logits = router_logits_BxTxE.astype(jnp.float32)
    if rule in ("topk_softmax", "noisy_topk"):
        values, idx = jax.lax.top_k(logits, k)
        return jax.nn.softmax(values, axis=-1), idx
    if rule == "softmax_topk":
        return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    if rule == "expert_choice":
        raise ValueError("route: expert_choice is not a token-choice rule; use routing(...)")
    raise ValueError(f"unknown routing rule {rule!r}; known: {list(ROUTERS)}")


def expert_capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """C = ceil(factor * tokens * k / num_experts), at least 1 (a relative 1e-9 is forgiven before rounding up, so
    that 0.3 * 10 / 3 gives 1, not 2)."""
    if not factor > 0:
        raise ValueError(f"capacity factor must be > 0, got {factor!r}")
    x = factor * tokens * k / num_experts
    return max(1, math.ceil(x - 1e-9 * max(1.0, x)))


def within_capacity(idx_BxTxK: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """keep (B, T, k) bool: assignment (t, j) of each row is kept iff fewer than `capacity` assignments before it in
    the order (position, choice rank) go to the same expert (module docstring)."""
    b, t, k = idx_BxTxK.shape
    onehot_BxNxE = jax.nn.one_hot(idx_BxTxK.reshape(b, t * k), num_experts, dtype=jnp.int32)
    before_BxNxE = jnp.cumsum(onehot_BxNxE, axis=1) - onehot_BxNxE  # earlier assignments to each expert
    return (jnp.sum(before_BxNxE * onehot_BxNxE, axis=-1) < capacity).reshape(b, t, k)


def expert_choice(router_logits_BxTxE: jax.Array, capacity: int) -> Routing:
    """Expert-choice routing (module docstring) with C = `capacity` tokens per expert and row (capped at T)."""
    b, t, e = router_logits_BxTxE.shape
    scores_BxExT = jnp.swapaxes(jax.nn.softmax(router_logits_BxTxE.astype(jnp.float32), axis=-1), 1, 2)
    weights_BxExC, idx_BxExC = jax.lax.top_k(scores_BxExT, min(capacity, t))
    scatter = jax.vmap(jax.vmap(lambda i, w: jnp.zeros((t,), w.dtype).at[i].set(w)))
    combine_BxExT = scatter(idx_BxExC, weights_BxExC)
    taken_BxExT = scatter(idx_BxExC, jnp.ones_like(weights_BxExC)) > 0
    taken_BxTxE = jnp.swapaxes(taken_BxExT, 1, 2)
    return Routing(jnp.swapaxes(combine_BxExT, 1, 2), taken_BxTxE, taken_BxTxE)


def routing(router_logits_BxTxE: jax.Array, k: int, rule: str, capacity_factor: float | None = None) -> Routing:
    """The routing of one layer from its router logits (B, T, E) (module docstring): the rule's weights, the
    capacity C = ceil(cf * T * k / E) per row when `capacity_factor` is set (expert choice: cf = 1 when None)."""
    b, t, num_experts = router_logits_BxTxE.shape
    if rule == "expert_choice":
        return expert_choice(router_logits_BxTxE,
                             expert_capacity(t, k, num_experts, 1.0 if capacity_factor is None else capacity_factor))
    weights_BxTxK, idx_BxTxK = route(router_logits_BxTxE, k, rule)
    onehot_BxTxKxE = jax.nn.one_hot(idx_BxTxK, num_experts)
    chosen_BxTxE = jnp.sum(onehot_BxTxKxE, axis=-2) > 0
    dispatch_BxTxE = chosen_BxTxE
    if capacity_factor is not None:
        keep_BxTxK = within_capacity(idx_BxTxK, num_experts, expert_capacity(t, k, num_experts, capacity_factor))
        weights_BxTxK = jnp.where(keep_BxTxK, weights_BxTxK, 0.0)
        dispatch_BxTxE = jnp.sum(onehot_BxTxKxE * keep_BxTxK[..., None], axis=-2) > 0
    combine_BxTxE = jnp.sum(onehot_BxTxKxE * weights_BxTxK[..., None], axis=-2)
    return Routing(combine_BxTxE, dispatch_BxTxE, chosen_BxTxE)


# ------------------------------------------------------------------------------------------ routing noise
class _NoiseKeys:
    def __init__(self, key: jax.Array):
        self.key, self.calls = key, 0

    def next(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.calls)
        self.calls += 1
        return key


_NOISE: contextvars.ContextVar["_NoiseKeys | None"] = contextvars.ContextVar("configurable_fm_routing_noise",
                                                                              default=None)


@contextlib.contextmanager
def routing_noise(key: jax.Array) -> Iterator[None]:
    """Draws the noise of noisy_topk layers in the forwards run inside the block: the i-th noisy MoE call draws
    from fold_in(key, i) (module docstring). Enter it inside the jitted function; not re-entrant."""
    if _NOISE.get() is not None:
        raise RuntimeError("routing_noise: a routing_noise context is already active (they do not nest)")
    token = _NOISE.set(_NoiseKeys(key))
    try:
        yield
    finally:
        _NOISE.reset(token)


def noise_active() -> bool:
    """True inside a routing_noise context."""
    return _NOISE.get() is not None


# ------------------------------------------------------------------------------------------ modules
# A LoRA on a stacked expert weight `<name>` is the owner's child `<name>_lora`, an extension module of this kind
# (bricks.adapters.experts).
EXPERT_LORA_SUFFIX, EXPERT_LORA_KIND = "_lora", "expert_lora"


def expert_weight(owner: nnx.Module, name: str) -> jax.Array | None:
    """The stacked expert weight `name` of `owner` as its forward uses it: the parameter's value, plus the change of
    an unmerged LoRA attached to it (`owner.<name>_lora.weight_delta()`, W + s·A B in float32); None when the owner
    has no such weight (a MoEfied GPT-2 FFN's gate)."""
    var = getattr(owner, name)
    if var is None:
        return None
    w = var[...]
    adapter = getattr(owner, name + EXPERT_LORA_SUFFIX, None)
    change = None if adapter is None else adapter.weight_delta()
    return w if change is None else w.astype(jnp.promote_types(w.dtype, change.dtype)) + change


class Experts(nnx.Module):
    """E experts' stacked SwiGLU weights; a LoRA can adapt each (bricks.adapters.experts, `expert_weight`)."""

    EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_experts: int, d: int, f: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.gate_proj = param(normal(rngs, (num_experts, d, f), param_dtype), ("experts", "embed", "mlp"))
        self.up_proj = param(normal(rngs, (num_experts, d, f), param_dtype), ("experts", "embed", "mlp"))
        self.down_proj = param(normal(rngs, (num_experts, f, d), param_dtype), ("experts", "mlp", "embed"))


class SparseMoE(nnx.Module):
    """rule = cfg.router, k = cfg.num_experts_per_tok, capacity_factor = cfg.router_capacity_factor (module
    docstring); `noise` (D -> E, no bias) exists only for rule noisy_topk."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.router = Linear(cfg.hidden_size, cfg.num_experts, axes=("embed", "experts"), rngs=rngs,
                             param_dtype=param_dtype, dtype=dtype)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, rngs=rngs,
                               param_dtype=param_dtype)
        self.k, self.rule, self.act, self.dtype = cfg.num_experts_per_tok, cfg.router, cfg.hidden_act, dtype
        self.capacity_factor = getattr(cfg, "router_capacity_factor", None)
        self.noise = Linear(cfg.hidden_size, cfg.num_experts, axes=("embed", "experts"), rngs=rngs,
                            param_dtype=param_dtype, dtype=dtype) if self.rule == "noisy_topk" else None

    def router_logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """r = x @ router, plus eps * softplus(x @ noise) for noisy_topk inside a routing_noise context."""
        logits_BxTxE = self.router(x_BxTxD)
        keys = _NOISE.get() if self.rule == "noisy_topk" else None
        if keys is None:
            return logits_BxTxE
        std_BxTxE = jax.nn.softplus(self.noise(x_BxTxD).astype(jnp.float32))
        eps_BxTxE = jax.random.normal(keys.next(), logits_BxTxE.shape, jnp.float32)
        return logits_BxTxE.astype(jnp.float32) + eps_BxTxE * std_BxTxE

    @tapped
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        router_logits_BxTxE = tap(self, "router_logits", self.router_logits(x_BxTxD))
        combine_BxTxE = routing(router_logits_BxTxE, self.k, self.rule, self.capacity_factor).combine_BxTxE
        dtype = self.dtype or x_BxTxD.dtype
        x = x_BxTxD.astype(dtype)
        weight = lambda name: expert_weight(self.experts, name).astype(dtype)  # noqa: E731
        gate = jnp.einsum("btd,edf->btef", x, weight("gate_proj"))
        up = jnp.einsum("btd,edf->btef", x, weight("up_proj"))
        hidden_BxTxExF = tap(self, "hidden", activation(self.act)(gate) * up)
        out_BxTxExD = jnp.einsum("btef,efd->bted", hidden_BxTxExF, weight("down_proj"))
        return jnp.einsum("bted,bte->btd", out_BxTxExD, combine_BxTxE.astype(dtype))
