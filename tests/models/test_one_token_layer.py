"""models/one_token_layer.py: a llama decoder layer of a batch-1 decode step as one-token kernels (interpreted here)
gives the module's logits and cache (float32 to 1e-5: GQA, q/k/v/o/MLP biases, a padded prompt, a sliding window,
cache blocks that do not divide the cache; bfloat16 to its rounding), the same greedy tokens through a Generator
with cache windows, is not taken where the module computes something else (an adapter, a tap context, two rows),
and lowers to five Triton kernels per layer for CUDA; the residual is added atomically by default (both paths
checked), by XLA sums with residual_atomic=False or when XLA_FLAGS asks for deterministic ops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import adapters
from configurable_fm.models import one_token_layer
from configurable_fm.models.generation import Generator, _generate
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.one_token import OneTokenMatmuls, one_token_matmuls
from tests.helpers import cuda_lowering, random_llama

# 3 splits of D = 48 (the partial sums' and the norm's second, overlapping block), 6 of F, cache blocks of 4 slots
LAYERS = OneTokenMatmuls(layers=True, interpret=True, out=16, width=16, keys=4)
LOOP = LAYERS._replace(split_cache=False)  # one attention program per head, looping over the cache blocks
SUMS = LAYERS._replace(residual_atomic=False)  # the residual sums in XLA (the default adds o and down atomically)
BASE = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, max_position_embeddings=64)


def step(model, mask_BxT, options=None):
    """Logits and cache of one decode step after a prefill of a 5-slot prompt (mask: its padding) into 7 slots (the
    second block of 4 cache slots read as slots 3-6), one jitted program (eager ops cost 3x the time here)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        ids = jnp.asarray(np.random.RandomState(1).randint(0, 64, (1, 5)), jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
        logits, cache = model(ids, attention_mask=mask_BxT, positions=positions, cache=model.init_cache(1, 7))
        tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        pos = positions[:, -1:] + 1
        if options is None:
            return model(tok, positions=pos, cache=cache)
        with one_token_matmuls(options=options):
            return model(tok, positions=pos, cache=cache)
    return run(state)


# one layer: what the second adds (the float32 residual stream passed on) is checked by the plain case and the Generator
BIASED = dict(attention_bias=True, o_proj_bias=True, mlp_bias=True, sliding_window=3, num_kv_heads=1, num_layers=1)


@functools.cache
def case(biased: bool):
    """(model, mask, the module's step): the plain model with an unpadded prompt, or the biased one with 2 padding
    slots; the module's step is computed once for the options compared with it."""
    extra, padding = (BIASED, 2) if biased else ({}, 0)
    model = random_llama(LlamaConfig(**{**BASE, **extra}), 0)
    mask = jnp.asarray([[0] * padding + [1] * (5 - padding)], jnp.int32)
    return model, mask, step(model, mask)


@pytest.mark.parametrize("biased,options", [(False, LAYERS), (True, LAYERS), (True, LOOP), (True, SUMS)])
def test_the_layer_kernels_give_the_modules_step(biased, options):
    model, mask, (want_logits, want_cache) = case(biased)
    logits, cache = step(model, mask, options)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=1e-5)
    for got, want in zip(cache.k + cache.v, want_cache.k + want_cache.v):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)
    assert int(cache.index) == int(want_cache.index) == 6


# SUMS slow: CI time (~6 s); covered by LAYERS here and its float32 step (test_the_layer_kernels_give_the_modules_step)
@pytest.mark.parametrize("options", [LAYERS, pytest.param(SUMS, marks=pytest.mark.slow)])
def test_bfloat16_step_within_its_rounding(options):
    model = random_llama(LlamaConfig(**BASE), 0)
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
    mask = jnp.ones((1, 5), jnp.int32)
    want, _ = step(model, mask)
    got, _ = step(model, mask, options)
    assert got.dtype == jnp.bfloat16
    want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


@pytest.fixture(scope="module")
def model():
    return random_llama(LlamaConfig(**BASE), 0)


def test_generator_gives_the_same_tokens_and_the_kernels_lower_for_cuda(model):
    ids = np.random.RandomState(2).randint(0, 64, (1, 5)).astype(np.int32)
    want = np.asarray(Generator(model, one_token=False, cache_window=0)(ids, max_new_tokens=7))
    got = Generator(model, one_token=LAYERS, cache_window=4)(ids, max_new_tokens=7)  # windows of 9 and 12 slots
    np.testing.assert_array_equal(np.asarray(got), want)

    # Triton, lowered for CUDA on this host: norm + q/k/v, attention, o, norm + gate/up, SwiGLU + down per layer of
    # the decode loop (the 64 x 64 LM head is below min_elements; the prefill has 5 rows)
    for options in (LAYERS, LOOP):
        gen = Generator(model, one_token=options._replace(interpret=False))
        args = (gen.state, jnp.asarray(ids), jnp.ones((1, 5), jnp.int32), jax.random.key(0), jnp.float32(1),
                jnp.int32(1), jnp.float32(1), jnp.full((8,), -1, jnp.int32), jnp.int32(0))
        text = cuda_lowering(_generate, *args, graphdef=gen.graphdef, max_new_tokens=3, greedy=True, candidates=0,
                             fuse=gen.fuse, one_token=gen.one_token, window=0)
        assert text.count("__gpu$xla.gpu.triton") == 5 * BASE["num_layers"]


def layer_jaxpr(model, ids, **context) -> str:
    def f(state, ids):
        m = nnx.merge(graphdef, state)
        with one_token_matmuls(**context):
            return m(ids, cache=m.init_cache(ids.shape[0], 8))[0]
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(f)(state, ids))


def uses_layer_kernels(model, ids, **context):
    return "one_token_attention" in layer_jaxpr(model, ids, **context)


def test_the_residual_is_added_atomically_unless_xla_is_asked_for_determinism(model, monkeypatch):
    one = jnp.zeros((1, 1), jnp.int32)
    atomic = lambda options: "atomic_rmw" in layer_jaxpr(model, one, options=options)
    assert atomic(LAYERS) and not atomic(SUMS)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_gpu_deterministic_ops=true")
    assert not atomic(LAYERS)


def test_taken_only_where_the_module_is_plain(model):
    one, two = jnp.zeros((1, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32)
    assert uses_layer_kernels(model, one, options=LAYERS)
    assert not uses_layer_kernels(model, one, options=LAYERS._replace(layers=False))
    assert not uses_layer_kernels(model, one, options=LAYERS._replace(interpret=None))  # on a CPU: not compiled
    assert not uses_layer_kernels(model, two, options=LAYERS)  # two rows
    assert not uses_layer_kernels(model, jnp.zeros((1, 3), jnp.int32), options=LAYERS)  # a prefill of 3 tokens
    seen = []
    capture(model, "layers.0.output", lambda m: seen.append(uses_layer_kernels(m, one, options=LAYERS)) or m(one))
    assert seen == [False]  # in a tap context: taps read each module's input and output
    lora = adapters.attach(model, "lora", "layers.*.self_attn.q_proj", rank=2, seed=0)
    assert not uses_layer_kernels(lora, one, options=LAYERS)  # an adapter's Linear computes more than x W


def test_fits_names_the_shapes_the_kernels_take():
    assert one_token_layer.fits(576, 9, 3, 64, 1536, "silu", OneTokenMatmuls())  # SmolLM2-135M
    assert not one_token_layer.fits(2048, 32, 8, 64, 8192, "silu", OneTokenMatmuls())  # 1B: gate/up above 10M
    assert one_token_layer.fits(2048, 32, 8, 64, 8192, "silu", OneTokenMatmuls(max_elements=1 << 26))
    assert not one_token_layer.fits(576, 9, 3, 48, 1536, "silu", OneTokenMatmuls())  # half a head: 24
    assert not one_token_layer.fits(576, 9, 3, 64, 1536, "gelu", OneTokenMatmuls())  # erf: no Triton lowering here
    assert not one_token_layer.fits(72, 1, 1, 72, 96, "silu", OneTokenMatmuls())  # 72 rows: chunks of 8


def test_cache_blocks_of_the_split_attention_stay_few():
    assert one_token_layer.cache_blocks(320, 64, True) == (64, 5)  # 64 + 256 slots: the measured setting
    assert one_token_layer.cache_blocks(7, 4, True) == (4, 2)
    assert one_token_layer.cache_blocks(8192, 64, True) == (256, 32)  # at most MAX_BLOCKS
    assert one_token_layer.cache_blocks(8192, 64, False) == (64, 128)  # the looped kernel: any number
    assert one_token_layer.cache_blocks(3, 64, True) == (2, 2)
