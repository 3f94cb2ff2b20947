"""Rotary embeddings, attention masks, the KV cache, and the attention kernel shared by all families.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0), H head dim.
Attention itself is `jax.nn.dot_product_attention` (cuDNN where the shapes and dtypes allow, XLA otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from configurable_fm.checks import is_finite_real


# --------------------------------------------------------------------------------------------- rope
@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in transformers' `rope_scaling` ("linear" or "llama3")."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED = ("default", "linear", "llama3")

    def __post_init__(self):
        # Another rope_type (yarn, dynamic, longrope, ...) would silently get llama3's frequencies.
        if self.rope_type not in self.SUPPORTED:
            raise NotImplementedError(f"rope_scaling type {self.rope_type!r} is not implemented; "
                                      f"supported: {list(self.SUPPORTED)}")
        f = self.factor
        if not is_finite_real(f) or not f > 0:
            raise ValueError(f"rope_scaling factor must be a finite number > 0, got {f!r}")

    @classmethod
    def from_dict(cls, d) -> "RopeScaling":
        """The inverse of dataclasses.asdict (config files); transformers' older key "type" is read as rope_type.
        A missing rope_type or an unknown key is a ValueError naming it."""
        d = dict(d)
        if "type" in d and "rope_type" not in d:
            d["rope_type"] = d.pop("type")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown rope_scaling key(s) {unknown}; valid keys: {sorted(valid)}")
        if "rope_type" not in d:
            raise ValueError(f"rope_scaling {d} has no rope_type; supported: {list(cls.SUPPORTED)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, d: dict | None) -> "RopeScaling | None":
        if not d:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind not in cls.SUPPORTED:
            raise NotImplementedError(
                f"rope_scaling type {kind!r} is not implemented; supported: {list(cls.SUPPORTED)}")
        if kind == "default":
            return None
        known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings", "rope_theta"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NotImplementedError(f"rope_scaling keys {unknown} are not implemented (type {kind!r})")
        fields = {k: d[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                    "original_max_position_embeddings") if k in d}
        return cls(rope_type=kind, **fields)

    def to_hf(self) -> dict:
        d = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                     original_max_position_embeddings=self.original_max_position_embeddings)
        return d


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """inv_freq[i] = theta^(-2i/H), i < H/2, then scaled (linear: / factor; llama3: by wavelength band)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in transformers' rotate-half layout: x*cos + rotate_half(x)*sin, in float32."""
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # B,T,H/2
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # B,T,1,H
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BxTxNxH.dtype)


# --------------------------------------------------------------------------------------------- cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for decoding. k, v: per layer (B, S_max, K, H).

    `valid_BxS` marks filled, non-padding key slots; `index` is the next slot to write.
    """

    k: list
    v: list
    valid_BxS: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        zeros = lambda: jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
        return cls(k=[zeros() for _ in range(num_layers)], v=[zeros() for _ in range(num_layers)],
                   valid_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid_BxS.shape[1]


def cache_prefix(cache: KVCache, length: int) -> KVCache:
    """The cache's first `length` slots (static) as a cache of its own: attention over it equals attention over the
    whole cache while every filled slot lies below `length` (the rest are invalid, masked out)."""
    return dataclasses.replace(cache, k=[k[:, :length] for k in cache.k], v=[v[:, :length] for v in cache.v],
                               valid_BxS=cache.valid_BxS[:, :length])


def put_prefix(cache: KVCache, prefix: KVCache) -> KVCache:
    """`cache` with its first slots replaced by `prefix` (a `cache_prefix` of it, written since) and its index."""
    put = lambda whole, part: jax.lax.dynamic_update_slice(whole, part, (0,) * whole.ndim)
    return dataclasses.replace(cache, k=[put(w, p) for w, p in zip(cache.k, prefix.k)],
                               v=[put(w, p) for w, p in zip(cache.v, prefix.v)],
                               valid_BxS=put(cache.valid_BxS, prefix.valid_BxS), index=prefix.index)


def write_cache(cache: KVCache, layer: int, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array):
    """Returns (cache with layer's new keys/values at cache.index, all keys, all values)."""
    start = (0, cache.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k[layer], k_BxTxKxH.astype(cache.k[layer].dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache.v[layer], v_BxTxKxH.astype(cache.v[layer].dtype), start)
    k, v = list(cache.k), list(cache.v)
    k[layer], v[layer] = k_all, v_all
    return dataclasses.replace(cache, k=k, v=v), k_all, v_all


def advance_cache(cache: KVCache, attention_mask_BxT: jax.Array | None, length: int) -> KVCache:
    """Marks `length` new key slots valid (or as `attention_mask` says) and moves the write index.

    Call it after every layer has called `write_cache` (which writes at the current `cache.index`); build the
    attention mask for the new tokens from `advance_cache(cache, ...).valid_BxS` before that.
    """
    batch = cache.valid_BxS.shape[0]
    new = jnp.ones((batch, length), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
    valid = jax.lax.dynamic_update_slice(cache.valid_BxS, new, (0, cache.index))
    return dataclasses.replace(cache, valid_BxS=valid, index=cache.index + length)


# --------------------------------------------------------------------------------------------- masks
def attention_mask(query_pos_T: jax.Array, key_pos_S: jax.Array, *, causal: bool,
                   key_valid_BxS: jax.Array | None = None, sliding_window: int | None = None) -> jax.Array:
    """Boolean mask (B or 1, 1, T, S): True where query t may attend to key s."""
    allowed = jnp.ones((query_pos_T.shape[0], key_pos_S.shape[0]), bool)
    if causal:
        allowed &= key_pos_S[None, :] <= query_pos_T[:, None]
    if sliding_window is not None:
        allowed &= query_pos_T[:, None] - key_pos_S[None, :] < sliding_window
    mask = allowed[None, None]
    if key_valid_BxS is not None:
        mask = mask & key_valid_BxS[:, None, None, :].astype(bool)
    return mask


def decoder_mask(t: int, *, attention_mask_BxT=None, cache: KVCache | None = None,
                 sliding_window: int | None = None) -> tuple[jax.Array | None, bool]:
    """(mask, is_causal) for `t` new tokens of a causal decoder.

    With a cache the new tokens sit at slots index..index+t-1 (the layers write there; call
    `advance_cache` after all of them) and may see every earlier valid slot. Without a cache and without
    padding or an active sliding window, no mask is built and `is_causal` lets the kernel use its fast path.
    """
    if attention_mask_BxT is not None and (jnp.ndim(attention_mask_BxT) != 2 or attention_mask_BxT.shape[1] != t):
        raise ValueError(f"attention_mask must have shape (batch, {t}), one entry per input token, got "
                         f"{tuple(jnp.shape(attention_mask_BxT))}")
    if cache is not None:
        # dynamic_update_slice clamps a write past the end onto the last slots (wrong logits, no error): refused
        # where the index is known (an eager forward; under jit it is traced and the caller sizes the cache).
        try:
            index = int(cache.index)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            index = 0
        if index + t > cache.max_len:
            raise ValueError(f"the KV cache has {cache.max_len} slots; {index} are written and {t} new tokens do "
                             "not fit (make it larger: init_cache(batch, max_len))")
        valid_BxS = advance_cache(cache, attention_mask_BxT, t).valid_BxS
        return attention_mask(cache.index + jnp.arange(t), jnp.arange(cache.max_len), causal=True,
                              key_valid_BxS=valid_BxS, sliding_window=sliding_window), False
    if attention_mask_BxT is not None or (sliding_window is not None and t > sliding_window):
        pos = jnp.arange(t)
        return attention_mask(pos, pos, causal=True, key_valid_BxS=attention_mask_BxT,
                              sliding_window=sliding_window), False
    return None, True


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, mask=None, is_causal: bool = False,
                          scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """softmax(q k^T * scale + mask) v with grouped key/value heads. Returns (B, T, N, H).

    implementation=None picks cuDNN's fused attention on GPU for half-precision inputs whose head dim it
    supports (a multiple of 8, at most 128), and XLA otherwise or when cuDNN refuses the shapes/mask.
    """
    dtype = q_BxTxNxH.dtype
    k_BxSxKxH, v_BxSxKxH = k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype)
    call = functools.partial(jax.nn.dot_product_attention, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask,
                             is_causal=is_causal, scale=scale)
    if implementation is not None:
        return call(implementation=implementation)
    head_dim = q_BxTxNxH.shape[-1]
    if (jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        try:
            return call(implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError, TypeError):
            pass  # shapes, mask or cuDNN version not supported: fall back to XLA
    return call(implementation="xla")
