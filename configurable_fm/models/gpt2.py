"""The GPT-2 decoder family (OpenAI GPT-2 and its HF re-trainings such as distilgpt2).

x = wte(ids) + wpe(positions); per block: x += attn(LN_1(x)); x += mlp(LN_2(x)) (pre-LayerNorm);
final LN_f; logits = x @ wte^T (tied, through `wte.attend`) or an untied `lm_head`.
Attention is multi-head (no grouping), causal, softmax(q k^T * s) v with s = 1/sqrt(H) (scale_attn_weights)
further divided by (layer + 1) when scale_attn_by_inverse_layer_idx; q, k, v come from one fused projection
c_attn: (D, 3D) whose output columns are [q | k | v], each split into N heads of H = D / N.
MLP: c_proj(act(c_fc(x))) with act = gelu_new (tanh GELU) by default and inner width n_inner or 4D.

Parameter paths mirror transformers' GPT2Model without the `transformer.` prefix, e.g. `wte.embedding`
(vocab, embed), `wpe.embedding` (None, embed), `h.3.attn.c_attn.kernel` (embed, heads),
`h.3.mlp.c_fc.kernel` (embed, mlp), `h.3.mlp.c_proj.kernel` (mlp, embed), `ln_f.weight`. HF's Conv1D weight
is already (in, out), so kernels equal the HF tensors without a transpose.

Tap points (configurable_fm.analysis): every module's `<path>.input` / `<path>.output` (`h.3.output` is the
residual stream after block 3), plus `h.3.mlp.hidden` (act(c_fc(x)), (B, T, F)) and `h.3.attn.heads` (per-head
attention outputs before c_proj, (B, T, N, H)).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from configurable_fm.models import attention as attn
from configurable_fm.models.layers import ACTIVATIONS, CausalLM, Embed, LayerNorm, Linear, activation
from configurable_fm.models.taps import tap, tapped


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True  # scores * 1/sqrt(head_dim); False leaves them unscaled
    scale_attn_by_inverse_layer_idx: bool = False  # scores additionally / (layer index + 1)
    reorder_and_upcast_attn: bool = False  # attention scores and softmax computed in float32
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if not self.n_head >= 1:
            raise ValueError(f"n_head must be >= 1, got {self.n_head!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise NotImplementedError(f"activation_function={self.activation_function!r} is not implemented; "
                                      f"supported: {sorted(ACTIVATIONS)}")

    # Names shared with the other families, so generic code (generation, sharding, analysis) can read them.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def num_kv_heads(self) -> int:
        return self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    def attention_scale(self, layer: int) -> float:
        scale = self.dim_per_head ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


class GPT2Attention(nnx.Module):
    """Causal multi-head self-attention with a fused qkv projection c_attn (D, 3D) and output c_proj (D, D)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        d = cfg.n_embd
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        self.c_attn = Linear(d, 3 * d, axes=("embed", "heads"), **kw)
        self.c_proj = Linear(d, d, axes=("heads", "embed"), **kw)
        self.cfg = cfg

    @tapped
    def __call__(self, x_BxTxD, *, mask=None, is_causal=False, cache=None, layer=0):
        cfg = self.cfg
        b, t, d = x_BxTxD.shape
        qkv = self.c_attn(x_BxTxD).reshape(b, t, 3, cfg.n_head, cfg.dim_per_head)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            cache, k, v = attn.write_cache(cache, layer, k, v)
        dtype = q.dtype
        if cfg.reorder_and_upcast_attn:
            q = q.astype(jnp.float32)
        out_BxTxNxH = tap(self, "heads", attn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                                                     scale=cfg.attention_scale(layer)).astype(dtype))
        return self.c_proj(out_BxTxNxH.reshape(b, t, d)), cache


class GPT2MLP(nnx.Module):
    """c_proj(h), h = act(c_fc(x)) (B, T, F) the tap point `hidden`: (D -> F -> D), both with bias."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        self.c_fc = Linear(cfg.n_embd, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.c_proj = Linear(cfg.intermediate_size, cfg.n_embd, axes=("mlp", "embed"), **kw)
        self.act = cfg.activation_function

    @tapped
    def __call__(self, x_BxTxD):
        return self.c_proj(tap(self, "hidden", activation(self.act)(self.c_fc(x_BxTxD))))


class GPT2Block(nnx.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.ln_1 = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.attn = GPT2Attention(cfg, **kw)
        self.ln_2 = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.mlp = GPT2MLP(cfg, **kw)

    @tapped
    def __call__(self, x_BxTxD, *, mask=None, is_causal=False, cache=None, layer=0):
        h, cache = self.attn(self.ln_1(x_BxTxD), mask=mask, is_causal=is_causal, cache=cache, layer=layer)
        x_BxTxD = x_BxTxD + h
        return x_BxTxD + self.mlp(self.ln_2(x_BxTxD)), cache


class GPT2(CausalLM):
    """Causal LM. `model(ids_BxT)` -> logits (B, T, V); with `cache=` -> (logits, new cache).

    `attention_mask` (B, T): 1 for real tokens, 0 for padding (keys at 0 are never attended to).
    `positions` (B, T): indices into wpe; default `cache.index + arange(T)` (0.. without a cache), as
    transformers does. Positions must stay below n_positions (an index past the table reads NaN rows).
    """

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, **kw)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, axes=(None, "embed"), std=0.01, **kw)
        self.h = nnx.List([GPT2Block(cfg, **kw) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.n_embd, cfg.vocab_size, axes=("embed", "vocab"), **kw)

    def hidden_states(self, ids_BxT, *, attention_mask=None, positions=None, cache=None, inputs_embeds=None):
        """Final-LayerNorm hidden states (B, T, D), and the updated cache (None without one).

        inputs_embeds (B, T, D): the token vectors in place of `wte(ids_BxT)` (ids_BxT is then ignored and may be
        None); the position embeddings are added to them as to token embeddings."""
        cfg = self.cfg
        given = ids_BxT if inputs_embeds is None else inputs_embeds
        if jnp.ndim(given) != (2 if inputs_embeds is None else 3):
            raise ValueError(f"ids must have shape (batch, length) (inputs_embeds (batch, length, hidden)), got "
                             f"{tuple(jnp.shape(given))}")
        b, t = given.shape[:2]
        if t > cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={cfg.n_positions}")
        tokens = self.wte(ids_BxT) if inputs_embeds is None else inputs_embeds
        offset = cache.index if cache is not None else 0
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t), (b, t))
        x = tokens + self.wpe(positions)
        mask, is_causal = attn.decoder_mask(t, attention_mask_BxT=attention_mask, cache=cache)
        for i, block in enumerate(self.h):
            x, cache = block(x, mask=mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache = attn.advance_cache(cache, attention_mask, t)
        return self.ln_f(x), cache

    def logits(self, h_BxTxD):
        return self.wte.attend(h_BxTxD) if self.lm_head is None else self.lm_head(h_BxTxD)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> attn.KVCache:
        """An empty KV cache for `max_len` tokens (at most n_positions: wpe has no rows beyond)."""
        cfg = self.cfg
        if max_len > cfg.n_positions:
            raise ValueError(f"cache length {max_len} exceeds n_positions={cfg.n_positions}")
        return attn.KVCache.empty(cfg.n_layer, batch, max_len, cfg.n_head, cfg.dim_per_head,
                                  dtype or self.wte.embedding.dtype)

