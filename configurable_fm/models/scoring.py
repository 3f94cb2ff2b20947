"""Language-model evaluation: compiled logits, per-token negative log-likelihood and perplexity.

nll[b, t] = -log softmax(logits[b, t])[ids[b, t + 1]]  (float32), for t < T - 1.
perplexity = exp(mean of nll over the scored tokens).
kl[b, t] = KL(softmax(reference[b, t]) || softmax(logits[b, t]))  (float32): how far a model's next-token
distributions are from a reference's (distillation, the cost of a perturbation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _nll_and_lse(logits_BxTxV, targets_BxT) -> tuple[jax.Array, jax.Array]:
    logits = logits_BxTxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0], lse


def _nll_autodiff(logits_BxTxV, targets_BxT) -> jax.Array:
    return _nll_and_lse(logits_BxTxV, targets_BxT)[0]


_nll_one_pass_grad = jax.custom_vjp(_nll_autodiff)  # the same function, its gradient by _one_pass_bwd


def _one_pass_fwd(logits_BxTxV, targets_BxT):
    nll, lse = _nll_and_lse(logits_BxTxV, targets_BxT)
    return nll, (logits_BxTxV, lse, targets_BxT)


def _one_pass_bwd(residuals, g_BxT):
    logits, lse, targets = residuals
    softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    return ((softmax - onehot) * g_BxT[..., None]).astype(logits.dtype), None


_nll_one_pass_grad.defvjp(_one_pass_fwd, _one_pass_bwd)


def next_token_nll(logits_BxTxV, targets_BxT) -> jax.Array:
    """-log softmax(logits)[target] per position, in float32: logsumexp(logits) - logits[target].

    The gradient is d logits = g (softmax(logits) - onehot(target)) on every platform; how it is computed is chosen
    where the program is lowered (`jax.lax.platform_dependent`). On accelerators, a custom VJP forms it in one
    elementwise pass from the saved float32 logsumexp, in the logits' dtype; plain autodiff would write a float32
    (..., V) gradient, scatter -g at the targets and then cast it (the 1B step at 8 x 2048 on an H100: 219.6-220.3 ->
    218.8-218.9 ms, benchmarks/ce_vjp_2026-12-06). On the CPU, where that pass's second exp over (..., V) costs more
    than the memory it saves (a tiny model's step with a 49152 vocabulary: +29%), autodiff's gradient is kept."""
    return jax.lax.platform_dependent(logits_BxTxV, targets_BxT, cpu=_nll_autodiff, default=_nll_one_pass_grad)


def next_token_kl(logits_BxTxV, reference_BxTxV) -> jax.Array:
    """KL(softmax(r) || softmax(z)) = sum_v softmax(r)_v (log softmax(r)_v - log softmax(z)_v) per position (B, T),
    float32, for logits z and reference logits r of the same shape."""
    log_p = jax.nn.log_softmax(reference_BxTxV.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


@nnx.jit
def _logits(model, ids_BxT):
    return model(ids_BxT)


def logits(model, ids_BxT) -> np.ndarray:
    """(B, T, V) float32 logits of `model(ids)` as one compiled program per model structure (an eager forward
    compiles each of its operations on first use: seconds for a tiny model on the CPU)."""
    return np.asarray(_logits(model, jnp.asarray(ids_BxT, jnp.int32)), np.float32)


@nnx.jit
def _nll(model, ids_BxT, mask_BxT):
    return next_token_nll(model(ids_BxT, attention_mask=mask_BxT)[:, :-1], ids_BxT[:, 1:])


def token_nll(model, ids_BxT, attention_mask_BxT=None) -> np.ndarray:
    """(B, T-1) negative log-likelihood of each next token; NaN where the target or the token predicting it is
    padding (a left-padded row's last pad would otherwise 'predict' its first real token from nothing)."""
    ids = jnp.asarray(ids_BxT, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask_BxT is None else jnp.asarray(attention_mask_BxT, jnp.int32)
    nll = np.asarray(_nll(model, ids, mask))
    real = np.asarray(mask).astype(bool)
    return np.where(real[:, :-1] & real[:, 1:], nll, np.nan)


def perplexity(model, ids_BxT, attention_mask_BxT=None) -> float:
    return float(np.exp(np.nanmean(token_nll(model, ids_BxT, attention_mask_BxT))))
