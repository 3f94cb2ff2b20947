"""Mixtral-style sparse mixture-of-experts FFN.

router logits r = x @ router (B,T,E). Two routing rules:
  topk_softmax:  (v, i) = top_k(r, k); w = softmax(v)          (Mixtral; equals softmax-then-top-k renormalised)
  softmax_topk:  (w, i) = top_k(softmax(r), k)                  (no renormalisation; Qwen-MoE norm_topk_prob=False)
y = sum_j w_j * down_e(act(gate_e(x)) * up_e(x)) over the chosen experts e = i_j.

Experts are stacked along a leading `experts` axis: gate_proj/up_proj (E, D, F), down_proj (E, F, D).
The combine is computed densely over all experts with zero weight for the unchosen ones: exact, simple,
and E/k times the FLOPs of a dispatching implementation.

Tap points (configurable_fm.analysis): `<moe path>.router_logits` r (B, T, E) (an intervention changes the
routing), `<moe path>.hidden` act(gate_e(x)) * up_e(x) of every expert (B, T, E, F) (the unchosen experts' too,
which get weight 0), and the module's `input` / `output`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.models.layers import Linear, activation, normal, param
from configurable_fm.models.taps import tap, tapped


def route(router_logits_BxTxE: jax.Array, k: int, rule: str) -> tuple[jax.Array, jax.Array]:
    """Returns (weights, expert indices), both (B, T, k)."""
    logits = router_logits_BxTxE.astype(jnp.float32)
    if rule == "topk_softmax":
        values, idx = jax.lax.top_k(logits, k)
        return jax.nn.softmax(values, axis=-1), idx
    if rule == "softmax_topk":
        return jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    raise ValueError(f"unknown routing rule {rule!r}")


class Experts(nnx.Module):
    def __init__(self, num_experts: int, d: int, f: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.gate_proj = param(normal(rngs, (num_experts, d, f), param_dtype), ("experts", "embed", "mlp"))
        self.up_proj = param(normal(rngs, (num_experts, d, f), param_dtype), ("experts", "embed", "mlp"))
        self.down_proj = param(normal(rngs, (num_experts, f, d), param_dtype), ("experts", "mlp", "embed"))


class SparseMoE(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.router = Linear(cfg.hidden_size, cfg.num_experts, axes=("embed", "experts"), rngs=rngs,
                             param_dtype=param_dtype, dtype=dtype)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, rngs=rngs,
                               param_dtype=param_dtype)
        self.k, self.rule, self.act, self.dtype = cfg.num_experts_per_tok, cfg.router, cfg.hidden_act, dtype

    @tapped
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        router_logits_BxTxE = tap(self, "router_logits", self.router(x_BxTxD))
        weights_BxTxK, idx_BxTxK = route(router_logits_BxTxE, self.k, self.rule)
        num_experts = self.experts.gate_proj.shape[0]
        combine_BxTxE = jnp.sum(jax.nn.one_hot(idx_BxTxK, num_experts) * weights_BxTxK[..., None], axis=-2)
        dtype = self.dtype or x_BxTxD.dtype
        x = x_BxTxD.astype(dtype)
        gate = jnp.einsum("btd,edf->btef", x, self.experts.gate_proj[...].astype(dtype))
        up = jnp.einsum("btd,edf->btef", x, self.experts.up_proj[...].astype(dtype))
        hidden_BxTxExF = tap(self, "hidden", activation(self.act)(gate) * up)
        out_BxTxExD = jnp.einsum("btef,efd->bted", hidden_BxTxExF, self.experts.down_proj[...].astype(dtype))
        return jnp.einsum("bted,bte->btd", out_BxTxExD, combine_BxTxE.astype(dtype))
