"""The BERT encoder family (transformers' BertModel; sentence-transformers models such as all-MiniLM-L6-v2).

x = LN(word[ids] + position[0..T) + token_type[tt]); per layer (post-LayerNorm):
    x = LN(x + dense(attn(x)))          attn: bidirectional multi-head, softmax(q k^T / sqrt(H) + mask) v
    x = LN(x + dense_out(act(dense_in(x))))   act = exact (erf) GELU by default
Optional pooler: tanh(dense(x[:, 0])) on the first ([CLS]) token.

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
    def __call__(self, ids_BxT, token_type_ids_BxT):
        t = ids_BxT.shape[1]
        x = (self.word_embeddings(ids_BxT) + self.position_embeddings(jnp.arange(t))[None]
             + self.token_type_embeddings(token_type_ids_BxT))
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
    def __call__(self, x_BxTxD, mask=None):
        b, t, d = x_BxTxD.shape
        n, h = self.cfg.num_heads, self.cfg.dim_per_head
        q = self.query(x_BxTxD).reshape(b, t, n, h)
        k = self.key(x_BxTxD).reshape(b, t, n, h)
        v = self.value(x_BxTxD).reshape(b, t, n, h)
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
    def __call__(self, x_BxTxD, mask=None):
        return self.output(self.self(x_BxTxD, mask), x_BxTxD)


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
    def __call__(self, x_BxTxD, mask=None):
        x_BxTxD = self.attention(x_BxTxD, mask)
        return self.output(self.intermediate(x_BxTxD), x_BxTxD)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
                               for _ in range(cfg.num_layers)])

    @tapped
    def __call__(self, x_BxTxD, mask=None):
        for layer in self.layer:
            x_BxTxD = layer(x_BxTxD, mask)
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
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, **kw)
        self.encoder = BertEncoder(cfg, **kw)
        self.pooler = BertPooler(cfg, **kw) if cfg.add_pooling_layer else None

    @tapped
    def __call__(self, ids_BxT, *, attention_mask=None, token_type_ids=None):
        b, t = ids_BxT.shape
        if t > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        mask = None
        if attention_mask is not None:
            pos = jnp.arange(t)
            mask = attn.attention_mask(pos, pos, causal=False, key_valid_BxS=attention_mask)
        return self.encoder(self.embeddings(ids_BxT, token_type_ids), mask)

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
    """Mean-pooled last hidden states (B, D); with `normalize`, divided by max(||e||_2, 1e-12) (unit length)."""
    e = mean_pool(model(ids_BxT, attention_mask=attention_mask_BxT), attention_mask_BxT)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e
