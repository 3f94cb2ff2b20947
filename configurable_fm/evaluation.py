"""Language-model evaluation: per-token negative log-likelihood and perplexity.

nll[b, t] = -log softmax(logits[b, t])[ids[b, t + 1]]  (float32), for t < T - 1.
perplexity = exp(mean of nll over the scored tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def _nll(model, ids_BxT, mask_BxT):
    logits = model(ids_BxT, attention_mask=mask_BxT).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, ids_BxT[:, 1:, None], axis=-1)[..., 0]


def token_nll(model, ids_BxT, attention_mask_BxT=None) -> np.ndarray:
    """(B, T-1) negative log-likelihood of each next token; positions whose target is padding are NaN."""
    ids = jnp.asarray(ids_BxT, jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask_BxT is None else jnp.asarray(attention_mask_BxT, jnp.int32)
    nll = np.asarray(_nll(model, ids, mask))
    return np.where(np.asarray(mask[:, 1:]).astype(bool), nll, np.nan)


def perplexity(model, ids_BxT, attention_mask_BxT=None) -> float:
    return float(np.exp(np.nanmean(token_nll(model, ids_BxT, attention_mask_BxT))))
