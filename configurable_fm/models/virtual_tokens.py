"""Virtual tokens before every input: prompt tuning and prefix tuning around a causal LM or a BERT encoder.

    m = with_virtual_tokens(base, "prompt", prompt_PxD)           # prompt tuning (Lester et al., 2021)
    m = with_virtual_tokens(base, "prefix", prefix_PxLx2xKxH)     # prefix tuning (Li & Liang, 2021)
    logits_BxTxV = m(ids_BxT)              # a decoder (CausalVirtualTokens): logits of the real tokens only
    generate(m, ids_BxT, max_new_tokens=16)                        # works as for the base
    h_BxTxD = m(ids_BxT, attention_mask=mask)                      # a Bert (BertVirtualTokens): the real tokens

`VirtualTokens` is the common part (the base under `base`, the kind, the one leaf `prompt` or `prefix`, a
VirtualTokenParam); `with_virtual_tokens` builds the subclass for the base's family. Values, as PEFT stores them:
- prompt: P learned input vectors (P, D).
- prefix: P learned keys and values per layer, (P, L, 2, K, H) (index 0 keys, 1 values; K key-value heads, H the
  head dim; a Bert has K = N, its attention heads).

Decoders (CausalVirtualTokens): a KV cache prefilled with P virtual tokens, which the real tokens then read.
- prompt: the vectors run through the base model (positions 0..P-1); their keys and values fill slots 0..P-1 of
  every layer's cache. Because attention is causal, this equals prepending the vectors to the input embeddings, as
  PEFT's prompt tuning does (the real tokens at positions P..P+T-1).
- prefix: written into slots 0..P-1 as they are (they are not rotated: they play the part of rotated keys, as
  PEFT's past_key_values do in transformers).
In both, the real tokens take positions P, P+1, ... (positions given by the caller are shifted by P; left
padding keeps the `cumsum(mask) - 1` rule, as in transformers with PEFT), and the virtual slots are valid for
every row. `model(ids)` without a cache builds a prefilled cache of P + T slots and runs the base's cached
forward; `init_cache(batch, max_len)` gives a prefilled cache of P + max_len slots, so `generate` works
unchanged. Gradients reach the virtual tokens through the cache.

Bert (BertVirtualTokens; the math is in models.bert, as PEFT's PeftModelForFeatureExtraction runs BertModel):
- prompt: the sequence is [prompt; tokens], P + T long: the vectors get position embeddings 0..P-1, token type 0
  and the embedding LayerNorm, every position attends to them and they attend to every token (the P mask ones).
- prefix: in every layer the P keys / values come before the tokens' own; every token attends to them; the
  tokens take positions P..P+T-1 (transformers' BertModel starts positions at the cache length).
`m(ids)` returns the real tokens (B, T, D), aligned with `ids` and the mask. `m.token_states(ids, ...)` returns
every position PEFT returns with its mask: (B, P + T, D) for a prompt (its last_hidden_state: virtual positions
first), (B, T, D) for a prefix. `m.pooled` is the pooler on position 0 of that sequence: the first virtual token
for a prompt (PEFT's pooler_output, which BertForSequenceClassification classifies), [CLS] for a prefix; and
models.bert.sentence_embedding(m, ...) mean-pools token_states: the P virtual positions count for a prompt, as
sentence-transformers pools a PEFT prompt (it prepends P ones to the mask).

Exporters need the plain base: `bricks.adapters.detach(m)`.
Supported bases: decoders with `hidden_states(..., cache=, inputs_embeds=)` and `init_cache` (llama family, gpt2),
and models.bert.Bert.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.models import attention as attn
from configurable_fm.models.bert import Bert
from configurable_fm.models.layers import CausalLM
from configurable_fm.models.taps import tapped

KINDS = ("prompt", "prefix")


class VirtualTokenParam(nnx.Param):
    """The trainable virtual tokens of prompt or prefix tuning (train these alone to tune the prompt)."""


def is_decoder(model) -> bool:
    """True for a model with the cached-decoder interface virtual tokens need (`init_cache`, `hidden_states`)."""
    return callable(getattr(model, "init_cache", None)) and callable(getattr(model, "hidden_states", None))


def supports(model) -> bool:
    """True for a base that virtual tokens can precede: a Bert or a causal decoder (is_decoder)."""
    return isinstance(model, Bert) or is_decoder(model)


def geometry(model) -> dict[str, int]:
    """{'hidden': D, 'layers': L, 'kv_heads': K, 'head_dim': H}: what a prompt (P, D) and a prefix (P, L, 2, K, H)
    must fit. A Bert's from its config (K = its heads); a causal decoder's (is_decoder) from the abstract shapes of
    its cache and hidden states."""
    if isinstance(model, Bert):
        c = model.cfg
        return {"hidden": c.hidden_size, "layers": c.num_layers, "kv_heads": c.num_heads, "head_dim": c.dim_per_head}
    probe = jax.eval_shape(lambda: model.init_cache(1, 1))
    hidden = jax.eval_shape(lambda: model.hidden_states(jnp.zeros((1, 1), jnp.int32)))[0].shape[-1]
    return {"hidden": int(hidden), "layers": len(probe.k), "kv_heads": int(probe.k[0].shape[2]),
            "head_dim": int(probe.k[0].shape[3])}


def value_shape(model, kind: str, p) -> tuple:
    """The shape of `kind`'s values for `model` with `p` virtual tokens: (p, D) or (p, L, 2, K, H)."""
    g = geometry(model)
    return (p, g["hidden"]) if kind == "prompt" else (p, g["layers"], 2, g["kv_heads"], g["head_dim"])


def with_virtual_tokens(base: nnx.Module, kind: str, values: jax.Array) -> "VirtualTokens":
    """`base` preceded by the virtual tokens `values` (module docstring): a BertVirtualTokens for a Bert, a
    CausalVirtualTokens for a causal decoder. ValueError / TypeError for a bad kind, shape or base."""
    return (BertVirtualTokens if isinstance(base, Bert) else CausalVirtualTokens)(base, kind, values)


class VirtualTokens(nnx.Module):
    """A base model preceded by P virtual tokens: the part common to every family (module docstring). Build one
    with `with_virtual_tokens`; the subclasses define the forward."""

    def __init__(self, base: nnx.Module, kind: str, values: jax.Array):
        if kind not in KINDS:
            raise ValueError(f"virtual tokens: kind must be one of {KINDS}, got {kind!r}")
        if isinstance(base, VirtualTokens):
            raise ValueError("the model has virtual tokens already: detach them first")
        self.check_base(base)
        want, shape = value_shape(base, kind, "P"), tuple(values.shape)
        if len(shape) != len(want) or shape[0] < 1 or shape[1:] != want[1:]:
            raise ValueError(f"virtual tokens ({kind}): values must have shape {want} for this model, got {shape}")
        self.base = base
        self.kind = kind
        self.num_virtual_tokens = int(shape[0])
        setattr(self, kind, VirtualTokenParam(jnp.asarray(values)))

    @property
    def values(self) -> jax.Array:
        """The virtual tokens: (P, D) for 'prompt', (P, L, 2, K, H) for 'prefix'."""
        return getattr(self, self.kind)[...]

    @staticmethod
    def check_base(base) -> None:
        """TypeError unless the subclass can run `base`."""
        raise TypeError("VirtualTokens is the common base class: build one with with_virtual_tokens(base, kind, "
                        "values)")


class BertVirtualTokens(VirtualTokens):
    """A Bert preceded by P virtual tokens (module docstring). `m(ids_BxT, attention_mask=, token_type_ids=)` ->
    the real tokens' last hidden states (B, T, D)."""

    @staticmethod
    def check_base(base) -> None:
        if not isinstance(base, Bert):
            raise TypeError(f"BertVirtualTokens needs a Bert base, got {type(base).__name__}")

    def token_states(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        """(hidden states (B, S, D), mask (B, S)) of every position PEFT's BertModel returns: S = P + T for a
        prompt (virtual positions first, mask ones there), S = T for a prefix."""
        b, t = ids_BxT.shape
        h = self.base(ids_BxT, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      **{self.kind: self.values})
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        if self.kind == "prompt":
            mask = jnp.concatenate([jnp.ones((b, self.num_virtual_tokens), mask.dtype), mask], axis=1)
        return h, mask

    @tapped
    def __call__(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        h, _ = self.token_states(ids_BxT, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return h[:, h.shape[1] - ids_BxT.shape[1]:]

    def pooled(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        """The base's pooler tanh(W h_0 + b) on position 0 of token_states: the first virtual token for a prompt,
        [CLS] for a prefix (as PEFT). (B, D); ValueError without a pooler."""
        if self.base.pooler is None:
            raise ValueError("this Bert has no pooler (add_pooling_layer=False)")
        h, _ = self.token_states(ids_BxT, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.base.pooler(h)


class CausalVirtualTokens(VirtualTokens, CausalLM):
    """A causal LM `base` preceded by P virtual tokens (module docstring): a KV cache prefilled with them."""

    @staticmethod
    def check_base(base) -> None:
        if not is_decoder(base):
            raise TypeError(f"virtual tokens need a causal decoder with init_cache and hidden_states, or a Bert; "
                            f"{type(base).__name__} is neither")

    def prefilled_cache(self, batch: int, max_len: int) -> attn.KVCache:
        """The base's cache for P + max_len slots with the virtual tokens in slots 0..P-1 (index P)."""
        p = self.num_virtual_tokens
        n_positions = getattr(self.base.cfg, "n_positions", None)  # learned position embeddings end there
        if n_positions is not None and p + max_len > n_positions:
            raise ValueError(f"{p} virtual tokens + {max_len} tokens exceed n_positions={n_positions}")
        cache = self.base.init_cache(batch, p + max_len)
        if self.kind == "prompt":
            prompt_BxPxD = jnp.broadcast_to(self.values[None], (batch, *self.values.shape))
            _, cache = self.base.hidden_states(None, inputs_embeds=prompt_BxPxD.astype(_dtype(self.base)),
                                               cache=cache)
            return cache
        prefix = self.values
        shape_BxPxKxH = (batch, p, *prefix.shape[-2:])
        k, v = list(cache.k), list(cache.v)
        for layer in range(len(k)):
            k[layer] = k[layer].at[:, :p].set(jnp.broadcast_to(prefix[:, layer, 0], shape_BxPxKxH).astype(k[layer].dtype))
            v[layer] = v[layer].at[:, :p].set(jnp.broadcast_to(prefix[:, layer, 1], shape_BxPxKxH).astype(v[layer].dtype))
        return dataclasses.replace(cache, k=k, v=v, valid_BxS=cache.valid_BxS.at[:, :p].set(True),
                                   index=jnp.asarray(p, jnp.int32))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> attn.KVCache:
        return self.prefilled_cache(batch, max_len)

    def hidden_states(self, ids_BxT, *, attention_mask=None, positions=None, cache=None):
        """The base's hidden states of the real tokens (B, T, D) after the virtual ones; the cache (None without
        one). `positions` count from the first real token; they are shifted by P here."""
        given = cache is not None
        if not given:
            cache = self.prefilled_cache(ids_BxT.shape[0], ids_BxT.shape[1])
        if positions is not None:
            positions = positions + self.num_virtual_tokens
        h, cache = self.base.hidden_states(ids_BxT, attention_mask=attention_mask, positions=positions, cache=cache)
        return h, (cache if given else None)

    def logits(self, h_BxTxD):
        return self.base.logits(h_BxTxD)


def _dtype(base):
    """The dtype of the base's token embeddings (the input vectors' dtype)."""
    for name in ("embed_tokens", "wte"):
        module = getattr(base, name, None)
        if module is not None:
            return module.embedding.dtype
    return jnp.float32
