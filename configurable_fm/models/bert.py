"""The BERT encoder family (transformers' BertModel; sentence-transformers models such as all-MiniLM-L6-v2).

x = LN(word[ids] + position[0..T) + token_type[tt]); per layer (post-LayerNorm):
    x = LN(x + dense(attn(x)))          attn: bidirectional multi-head, softmax(q k^T / sqrt(H) + mask) v
    x = LN(x + dense_out(act(dense_in(x))))   act = exact (erf) GELU by default
Optional pooler: tanh(dense(x[:, 0])) on the first ([CLS]) token.

Virtual tokens (prompt / prefix tuning, as PEFT runs them on transformers' BertModel; the wrapper that holds them
as parameters is models.virtual_tokens.BertVirtualTokens):
    prompt (P, D):        x = LN([prompt; word[ids]] + position[0..P+T) + token_type[[0]*P; tt]); the P vectors
                          are tokens of the sequence, which is P + T long, and never padding
    prefix (P, L, 2, N, H): in layer l, k = [prefix[:, l, 0]; k], v = [prefix[:, l, 1]; v] (N heads of H), keys
                          that every token sees; the tokens take positions P..P+T-1 (transformers' cache_length)

Parameter paths mirror transformers' BertModel, e.g. `embeddings.word_embeddings.embedding` (vocab, embed),
`encoder.layer.3.attention.self.query.kernel` (embed, heads), `encoder.layer.3.attention.output.dense.kernel`
(heads, embed), `encoder.layer.3.intermediate.dense.kernel` (embed, mlp), `encoder.layer.3.output.dense.kernel`
(mlp, embed), `encoder.layer.3.output.LayerNorm.weight`, `pooler.dense.kernel` (embed, None).

Tap points (configurable_fm.analysis): every module's `<path>.input` / `<path>.output` (`encoder.layer.3.output`
is the hidden state after layer 3), plus `encoder.layer.3.intermediate.hidden` (act(dense(x)), (B, T, F)) and
`encoder.layer.3.attention.self.heads` (per-head attention outputs before the output dense, (B, T, N, H)).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.models import attention as attn
from configurable_fm.models.layers import ACTIVATIONS, Embed, LayerNorm, Linear, activation
from configurable_fm.models.taps import tap, tapped


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True  # transformers' BertModel(add_pooling_layer=...)

    def __post_init__(self):
        if not self.num_heads >= 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act={self.hidden_act!r} is not implemented; "
                                      f"supported: {sorted(ACTIVATIONS)}")

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads


class BertEmbeddings(nnx.Module):
    """LN(word_embeddings[ids] + position_embeddings[0..T) + token_type_embeddings[token_type_ids])."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embeddings = Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), **kw)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, cfg.hidden_size, axes=(None, "embed"), **kw)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    @tapped
    def __call__(self, ids_BxT, token_type_ids_BxS, *, prompt_PxD=None, position_offset: int = 0):
        """(B, S, D) with S = T, or S = P + T with `prompt_PxD` placed before the token embeddings (its token
        types are the first P of `token_type_ids_BxS`). Positions start at `position_offset`."""
        x = self.word_embeddings(ids_BxT)
        if prompt_PxD is not None:
            prompt_BxPxD = jnp.broadcast_to(prompt_PxD.astype(x.dtype), (x.shape[0], *prompt_PxD.shape))
            x = jnp.concatenate([prompt_BxPxD, x], axis=1)
        positions = position_offset + jnp.arange(x.shape[1])
        x = x + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids_BxS)
        return self.LayerNorm(x)


class BertSelfAttention(nnx.Module):
    """Bidirectional multi-head attention: q, k, v projections (D -> D, with bias), heads of H = D / N."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        self.query = Linear(d, d, axes=("embed", "heads"), **kw)
        self.key = Linear(d, d, axes=("embed", "heads"), **kw)
        self.value = Linear(d, d, axes=("embed", "heads"), **kw)
        self.cfg = cfg

    @tapped
    def __call__(self, x_BxTxD, mask=None, prefix_Px2xNxH=None):
        """With `prefix_Px2xNxH`, its keys ([:, 0]) and values ([:, 1]) come before the tokens' own (S = P + T
        keys; `mask` (B, 1, T, S) or None)."""
        b, t, d = x_BxTxD.shape
        n, h = self.cfg.num_heads, self.cfg.dim_per_head
        q = self.query(x_BxTxD).reshape(b, t, n, h)
        k = self.key(x_BxTxD).reshape(b, t, n, h)
        v = self.value(x_BxTxD).reshape(b, t, n, h)
        if prefix_Px2xNxH is not None:
            shape_BxPxNxH = (b, prefix_Px2xNxH.shape[0], n, h)
            k = jnp.concatenate([jnp.broadcast_to(prefix_Px2xNxH[:, 0].astype(k.dtype), shape_BxPxNxH), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(prefix_Px2xNxH[:, 1].astype(v.dtype), shape_BxPxNxH), v], axis=1)
        return tap(self, "heads", attn.dot_product_attention(q, k, v, mask=mask)).reshape(b, t, d)


class BertResidualOutput(nnx.Module):
    """LN(residual + dense(x)): transformers' BertSelfOutput (attention.output) and BertOutput (output)."""

    def __init__(self, in_features: int, cfg: BertConfig, *, axes, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=None):
        self.dense = Linear(in_features, cfg.hidden_size, axes=axes, use_bias=True, rngs=rngs,
                            param_dtype=param_dtype, dtype=dtype)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype)

    @tapped
    def __call__(self, x, residual_BxTxD):
        return self.LayerNorm(residual_BxTxD + self.dense(x))


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.self = BertSelfAttention(cfg, **kw)
        self.output = BertResidualOutput(cfg.hidden_size, cfg, axes=("heads", "embed"), **kw)

    @tapped
    def __call__(self, x_BxTxD, mask=None, prefix_Px2xNxH=None):
        return self.output(self.self(x_BxTxD, mask, prefix_Px2xNxH), x_BxTxD)


class BertIntermediate(nnx.Module):
    """act(dense(x)): D -> intermediate_size (the MLP hidden activation, also the tap point `hidden`)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), use_bias=True,
                            rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.act = cfg.hidden_act

    @tapped
    def __call__(self, x_BxTxD):
        return tap(self, "hidden", activation(self.act)(self.dense(x_BxTxD)))


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.attention = BertAttention(cfg, **kw)
        self.intermediate = BertIntermediate(cfg, **kw)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg, axes=("mlp", "embed"), **kw)

    @tapped
    def __call__(self, x_BxTxD, mask=None, prefix_Px2xNxH=None):
        x_BxTxD = self.attention(x_BxTxD, mask, prefix_Px2xNxH)
        return self.output(self.intermediate(x_BxTxD), x_BxTxD)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                               for _ in range(cfg.num_layers)])

    @tapped
    def __call__(self, x_BxTxD, mask=None, prefix_PxLx2xNxH=None):
        for i, layer in enumerate(self.layer):
            x_BxTxD = layer(x_BxTxD, mask, None if prefix_PxLx2xNxH is None else prefix_PxLx2xNxH[:, i])
        return x_BxTxD


class BertPooler(nnx.Module):
    """tanh(dense(x[:, 0])): (B, T, D) -> (B, D)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), use_bias=True, rngs=rngs,
                            param_dtype=param_dtype, dtype=dtype)

    @tapped
    def __call__(self, x_BxTxD):
        return jnp.tanh(self.dense(x_BxTxD[:, 0]))


class Bert(nnx.Module):
    """Encoder. `model(ids_BxT, attention_mask=, token_type_ids=)` -> last hidden states (B, T, D).

    `attention_mask` (B, T): 1 for real tokens, 0 for padding (no query attends to a padding key; the
    outputs at padding positions are meaningless). `token_type_ids` (B, T) default to 0.
    `prompt` (P, D) / `prefix` (P, L, 2, N, H): virtual tokens (module docstring); with a prompt the result is
    (B, P + T, D), the P virtual positions first (what PEFT's BertModel returns).
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, **kw)
        self.encoder = BertEncoder(cfg, **kw)
        self.pooler = BertPooler(cfg, **kw) if cfg.add_pooling_layer else None

    @tapped
    def __call__(self, ids_BxT, *, attention_mask=None, token_type_ids=None, prompt=None, prefix=None):
        if jnp.ndim(ids_BxT) != 2:
            raise ValueError(f"ids must have shape (batch, length), got {tuple(jnp.shape(ids_BxT))}")
        b, t = ids_BxT.shape
        for name, x in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if x is not None and tuple(jnp.shape(x)) != (b, t):
                raise ValueError(f"{name} must have the shape of the ids {(b, t)}, got {tuple(jnp.shape(x))}")
        p = self._virtual_count(prompt, prefix)
        if t + p > self.cfg.max_position_embeddings:
            what = f"sequence length {t}" + (f" + {p} virtual tokens" if p else "")
            raise ValueError(f"{what} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if attention_mask is not None and p:  # the virtual tokens are never padding
            attention_mask = jnp.concatenate([jnp.ones((b, p), attention_mask.dtype), attention_mask], axis=1)
        if prompt is not None:
            token_type_ids = jnp.concatenate([jnp.zeros((b, p), token_type_ids.dtype), token_type_ids], axis=1)
        offset = p if prefix is not None else 0  # transformers: positions after the cached prefix
        x = self.embeddings(ids_BxT, token_type_ids, prompt_PxD=prompt, position_offset=offset)
        mask = None
        if attention_mask is not None:
            mask = attn.attention_mask(jnp.arange(x.shape[1]), jnp.arange(attention_mask.shape[1]), causal=False,
                                       key_valid_BxS=attention_mask)
        return self.encoder(x, mask, prefix)

    def _virtual_count(self, prompt=None, prefix=None) -> int:
        """P, the number of virtual tokens of `prompt` (P, D) or `prefix` (P, L, 2, N, H), 0 for neither;
        ValueError for both, or a shape that does not fit this model."""
        if prompt is not None and prefix is not None:
            raise ValueError("give a prompt or a prefix, not both")
        c = self.cfg
        for name, x, want in (("prompt", prompt, (c.hidden_size,)),
                              ("prefix", prefix, (c.num_layers, 2, c.num_heads, c.dim_per_head))):
            if x is not None:
                if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want or x.shape[0] < 1:
                    raise ValueError(f"{name} must have shape {('P', *want)} for this model, got {tuple(x.shape)}")
                return int(x.shape[0])
        return 0

    def token_states(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        """(hidden states (B, T, D), which of them are tokens (B, T): `attention_mask`, or ones): the positions a
        sentence embedding pools over (models.virtual_tokens.BertVirtualTokens adds its virtual positions)."""
        h = self(ids_BxT, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return h, jnp.ones(ids_BxT.shape, jnp.int32) if attention_mask is None else attention_mask

    def pooled(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        """The pooler output tanh(W h_[CLS] + b): (B, D). Raises if the model has no pooler."""
        if self.pooler is None:
            raise ValueError("this Bert has no pooler (add_pooling_layer=False)")
        return self.pooler(self(ids_BxT, attention_mask=attention_mask, token_type_ids=token_type_ids))


def mean_pool(hidden_BxTxD: jax.Array, attention_mask_BxT: jax.Array) -> jax.Array:
    """sentence-transformers' mean pooling: sum_t m_t h_t / max(sum_t m_t, 1e-9). Returns (B, D)."""
    m = attention_mask_BxT.astype(hidden_BxTxD.dtype)[..., None]
    return jnp.sum(hidden_BxTxD * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(model: Bert, ids_BxT: jax.Array, attention_mask_BxT: jax.Array,
                       normalize: bool = False) -> jax.Array:
    """Mean-pooled last hidden states (B, D) over `model.token_states` (the tokens; with prompt tuning also the P
    virtual positions, as sentence-transformers pools a PEFT prompt-tuned model); with `normalize`, divided by
    max(||e||_2, 1e-12) (unit length)."""
    e = mean_pool(*model.token_states(ids_BxT, attention_mask=attention_mask_BxT))
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e
