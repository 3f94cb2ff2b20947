"""Shared by the growth tests: random llama parameters at a realistic scale, a float64 numpy forward of the llama
family (to check the algebra of growth to 1e-10, independent of float32 rounding), and a jitted model forward.

The reference forward follows models/llama.py and models/moe.py (RMSNorm, HF rotate-half RoPE with the model's
own inverse frequencies, GQA with query head i on kv head i // (H/G), SwiGLU or top-k MoE, tied or untied head);
test_grow_width.py checks it against the model.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_params, flat_state, with_params
from configurable_fm.models.attention import rope_inverse_frequencies
from configurable_fm.models.llama import Llama


def random_params(cfg, seed, dtype=np.float64):
    """{path: array} for `cfg` with logits of order 1-10: kernels N(0, 1/fan_in), the head's and the embedding
    table's x3 (N(0, 9/D)), gains N(1, 0.2^2), biases N(0, 0.1^2)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    out = {}
    for k, v in flat_state(abstract).items():
        shape = tuple(v.shape)
        if "norm" in k:
            x = rs.normal(1.0, 0.2, shape)
        elif k.endswith(".bias"):
            x = rs.normal(0.0, 0.1, shape)
        elif k == "embed_tokens.embedding":  # tied logits h E^T ~ N(0, 9) too
            x = rs.normal(0.0, 3.0 / np.sqrt(shape[1]), shape)
        else:
            fan_in = shape[-2]
            x = rs.normal(0.0, 1.0 / np.sqrt(fan_in), shape) * (3.0 if k == "lm_head.kernel" else 1.0)
        out[k] = x.astype(dtype)
    return out


def random_model(cfg, seed):
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return with_params(abstract, {k: jnp.asarray(v, jnp.float32) for k, v in random_params(cfg, seed).items()})


# Tiny models: XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": "0", "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def logits(model, ids) -> np.ndarray:
    """The model's logits (jitted: one compilation per model structure)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids)))


def _nll(graphdef, state, ids):
    out = nnx.merge(graphdef, state)(ids[:, :-1])
    logp = jax.nn.log_softmax(out, -1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


_grad = jax.jit(jax.grad(_nll, argnums=1), static_argnums=0, compiler_options=FAST_COMPILE)


def grads(model, ids) -> dict:
    """{path: gradient} of the next-token NLL of `ids` (B, T) w.r.t. every parameter."""
    graphdef, state = nnx.split(model)
    return {k: np.asarray(v) for k, v in flat_params(_grad(graphdef, state, jnp.asarray(ids))).items()}


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def snapshot(model) -> dict:
    """Host copies of every parameter (to check that an operator left its input alone)."""
    return {k: np.array(v) for k, v in flat_params(model).items()}


def assert_unchanged(model, before: dict):
    after = flat_params(model)
    assert list(after) == list(before)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), v, err_msg=k)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def reference_logits(params, cfg, ids) -> np.ndarray:
    """Logits (B, T, V) of a llama-family model given as {path: array}, in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    ids = np.asarray(ids)
    b, t = ids.shape
    h, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    inv = np.asarray(rope_inverse_frequencies(hd, cfg.rope_theta, cfg.rope_scaling), np.float64)
    angles = np.arange(t)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], -1)[None, :, None, :]  # 1, T, 1, hd
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(z):
        rotated = np.concatenate([-z[..., hd // 2:], z[..., :hd // 2]], -1)
        return z * cos + rotated * sin

    def rms(z, gain):
        return z / np.sqrt(np.mean(z * z, -1, keepdims=True) + cfg.rms_norm_eps) * gain

    def lin(z, name):
        y = z @ p[f"{name}.kernel"]
        return y + p[f"{name}.bias"] if f"{name}.bias" in p else y

    causal = np.tril(np.ones((t, t), bool))
    x = p["embed_tokens.embedding"][ids]
    for i in range(cfg.num_layers):
        pre = f"layers.{i}"
        a = rms(x, p[f"{pre}.input_layernorm.weight"])
        q = rope(lin(a, f"{pre}.self_attn.q_proj").reshape(b, t, h, hd))
        k = np.repeat(rope(lin(a, f"{pre}.self_attn.k_proj").reshape(b, t, g, hd)), h // g, axis=2)
        v = np.repeat(lin(a, f"{pre}.self_attn.v_proj").reshape(b, t, g, hd), h // g, axis=2)
        scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(hd)
        weights = _softmax(np.where(causal, scores, -np.inf))
        out = np.einsum("bnqk,bknh->bqnh", weights, v).reshape(b, t, h * hd)
        x = x + lin(out, f"{pre}.self_attn.o_proj")
        m = rms(x, p[f"{pre}.post_attention_layernorm.weight"])
        if cfg.num_experts:
            r = m @ p[f"{pre}.mlp.router.kernel"]  # B, T, E
            idx = np.argsort(-r, axis=-1, kind="stable")[..., :cfg.num_experts_per_tok]
            if cfg.router == "topk_softmax":
                w = _softmax(np.take_along_axis(r, idx, -1))
            else:
                w = np.take_along_axis(_softmax(r), idx, -1)
            combine = np.zeros_like(r)
            np.put_along_axis(combine, idx, w, -1)
            e = f"{pre}.mlp.experts"
            hidden = _silu(np.einsum("btd,edf->btef", m, p[f"{e}.gate_proj"])) * np.einsum(
                "btd,edf->btef", m, p[f"{e}.up_proj"])
            y = np.einsum("btef,efd,bte->btd", hidden, p[f"{e}.down_proj"], combine)
        else:
            y = lin(_silu(lin(m, f"{pre}.mlp.gate_proj")) * lin(m, f"{pre}.mlp.up_proj"), f"{pre}.mlp.down_proj")
        x = x + y
    final = rms(x, p["norm.weight"])
    return final @ (p["lm_head.kernel"] if "lm_head.kernel" in p else p["embed_tokens.embedding"].T)
