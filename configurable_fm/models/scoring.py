"""Language-model evaluation: compiled logits, per-token negative log-likelihood and perplexity.

nll[b, t] = -log softmax(logits[b, t])[ids[b, t + 1]]  (float32), for t < T - 1.
perplexity = exp(mean of nll over the scored tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def next_token_nll(logits_BxTxV, targets_BxT) -> jax.Array:
    """-log softmax(logits)[target] per position, in float32: logsumexp(logits) - logits[target]."""
    logits = logits_BxTxV.astype(jnp.float32)
    target = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


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
    """(B, T-1) negative log-likelihood of each next token; positions whose target is padding are NaN."""
    ids = jnp.asarray(ids_BxT, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask_BxT is None else jnp.asarray(attention_mask_BxT, jnp.int32)
    nll = np.asarray(_nll(model, ids, mask))
    return np.where(np.asarray(mask[:, 1:]).astype(bool), nll, np.nan)


def perplexity(model, ids_BxT, attention_mask_BxT=None) -> float:
    return float(np.exp(np.nanmean(token_nll(model, ids_BxT, attention_mask_BxT))))
