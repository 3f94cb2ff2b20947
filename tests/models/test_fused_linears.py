"""fused_linears: several Linears of one input as one matmul (the decode path's q/k/v and gate/up), equal to the
calls one by one; adapters, mixed dtypes and tap contexts take the one-by-one path; `project` fuses only inside
fuse_projections(), which generation enters for models on one device.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import adapters
from configurable_fm.models.attention import KVCache
from configurable_fm.models.generation import on_one_device
from configurable_fm.models.layers import Linear, fuse_projections, fused_linears, project
from configurable_fm.models.llama import LlamaConfig
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  attention_bias=True, max_position_embeddings=64)


def _linears(use_bias, dtypes=(None, None, None)):
    rngs = nnx.Rngs(0)
    out = []
    for width, dtype in zip((24, 8, 8), dtypes):
        lin = Linear(16, width, axes=("embed", "heads"), use_bias=use_bias, rngs=rngs, dtype=dtype)
        if use_bias:
            lin.bias[...] = jax.random.normal(rngs.params(), (width,))
        out.append(lin)
    return out


@pytest.mark.parametrize("use_bias", [False, True])
def test_one_matmul_equals_the_calls_one_by_one(use_bias):
    linears = _linears(use_bias)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    fused = fused_linears(linears, x)
    assert [y.shape for y in fused] == [(2, 3, 24), (2, 3, 8), (2, 3, 8)]
    for y, lin in zip(fused, linears):
        np.testing.assert_allclose(np.asarray(y), np.asarray(lin(x)), rtol=1e-6, atol=1e-6)
    # One dot in the traced program, against three one by one.
    assert str(jax.make_jaxpr(lambda x: fused_linears(linears, x))(x)).count("dot_general") == 1


def test_project_fuses_only_inside_fuse_projections():
    linears = _linears(False)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    count = lambda: str(jax.make_jaxpr(lambda x: project(linears, x))(x)).count("dot_general")
    assert count() == 3
    with fuse_projections():
        assert count() == 1
        with fuse_projections(False):
            assert count() == 3
    assert count() == 3


def test_on_one_device():
    x = jnp.ones(3)
    assert on_one_device({"a": x, "b": np.ones(2), "c": 1.0})
    assert not on_one_device({"a": x, "b": jax.device_put(x, jax.devices()[-1])}) or len(jax.devices()) == 1
    assert not jax.jit(lambda x: jnp.asarray(on_one_device({"a": x})))(x)


def test_mixed_dtypes_fall_back_to_one_call_each():
    linears = _linears(False, dtypes=(None, jnp.bfloat16, None))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    fused = fused_linears(linears, x)
    assert [y.dtype for y in fused] == [jnp.float32, jnp.bfloat16, jnp.float32]
    assert str(jax.make_jaxpr(lambda x: fused_linears(linears, x))(x)).count("dot_general") == 3


@functools.partial(jax.jit, static_argnums=0)
def _decode_and_full(graphdef, state, ids_BxT):
    """(logits of one cached step on the last token after prefilling ids[:, :-1], the cache-free forward's last
    logits): both (B, V)."""
    model = nnx.merge(graphdef, state)
    b, t = ids_BxT.shape
    cache = model.init_cache(b, 16)
    with fuse_projections():
        _, cache = model(ids_BxT[:, :-1], cache=cache)
        logits, _ = model(ids_BxT[:, -1:], cache=cache)
    return logits[:, -1], model(ids_BxT)[:, -1]


def test_fused_cached_decoding_equals_the_cache_free_forward_with_biases_and_adapters():
    model = random_llama(CFG, 0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 6)))
    step, plain = _decode_and_full(*nnx.split(model), ids)
    np.testing.assert_allclose(np.asarray(step), np.asarray(plain), rtol=1e-5, atol=1e-5)
    # A LoRA on q_proj and up_proj (nonzero B): those projections are not plain Linears, so each layer runs its
    # projections one by one, and the adapter's contribution is kept.
    lora = adapters.attach(model, "lora", ["layers.*.self_attn.q_proj", "layers.*.mlp.up_proj"], rank=4, seed=0)
    for i, (_, module) in enumerate(nnx.iter_modules(lora)):
        if isinstance(module, adapters.LoRALinear):
            module.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), module.lora_b.shape)
    step, full = _decode_and_full(*nnx.split(lora), ids)
    assert not np.allclose(np.asarray(full), np.asarray(plain), atol=1e-3)
    np.testing.assert_allclose(np.asarray(step), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_tap_points_of_each_projection_are_still_seen_while_decoding():
    model = random_llama(CFG, 0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (1, 4)))
    cache = KVCache.empty(CFG.num_layers, 1, 8, CFG.num_kv_heads, CFG.dim_per_head)
    with fuse_projections():
        _, seen = capture(model, ["layers.*.self_attn.k_proj.output", "layers.*.mlp.gate_proj.output"],
                          lambda m: m(ids, cache=cache)[0])
    assert sorted(seen) == ["layers.0.mlp.gate_proj.output", "layers.0.self_attn.k_proj.output",
                            "layers.1.mlp.gate_proj.output", "layers.1.self_attn.k_proj.output"]
    assert seen["layers.0.self_attn.k_proj.output"].shape == (1, 4, CFG.num_kv_heads * CFG.dim_per_head)
