"""models/one_token.py: the split-K one-token product equals x @ W (float32, interpreted, tiles that do not divide
evenly into powers of two included); `matmul` takes it only inside one_token_matmuls(), for one row and an in-range
kernel; a Generator with it gives the same greedy tokens and its decode step lowers to Triton for CUDA; `accumulate`
adds v W + b into its float32 output in place."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.models.generation import Generator, _generate
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.one_token import (OneTokenMatmuls, accumulate, matmul, one_token_matmul,
                                              one_token_matmuls)
from tests.helpers import cuda_lowering, random_llama

ANY = OneTokenMatmuls(min_elements=0, interpret=True, layers=False)  # every one-row product, interpreted


@pytest.mark.parametrize("d,n,options", [(64, 96, ANY), (48, 40, ANY), (64, 96, ANY._replace(out=8, width=4))])
def test_one_token_matmul_equals_the_product(d, n, options):
    rs = np.random.RandomState(d + n)
    x = jnp.asarray(rs.normal(size=(1, d)), jnp.float32)
    w = jnp.asarray(rs.normal(size=(d, n)), jnp.float32)
    got = one_token_matmul(x, w, options=options, interpret=True)
    assert got.shape == (1, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(x) @ np.asarray(w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("biased", [False, True])
def test_accumulate_adds_the_product_into_its_input(biased):
    """into + x W (+ b), the bias added once over 4 x 3 programs (tiles 16 x 8), float32, as one jitted program
    (the input buffer is donated to the output inside it)."""
    rs = np.random.RandomState(3)
    x, into = (jnp.asarray(rs.normal(size=(1, n)), jnp.float32) for n in (32, 48))
    w = jnp.asarray(rs.normal(size=(32, 48)), jnp.float32)
    b = jnp.asarray(rs.normal(size=(48,)), jnp.float32) if biased else None
    got = jax.jit(lambda x, w, into, b: accumulate([x], w, into, b, options=ANY._replace(out=16, width=8),
                                                   interpret=True))(x, w, into, b)
    want = np.asarray(into) + np.asarray(x) @ np.asarray(w) + (0 if b is None else np.asarray(b))
    assert got.shape == (1, 48) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def uses_kernel(x, w, **context) -> bool:
    def f(x, w):
        with one_token_matmuls(**context):
            return matmul(x, w)
    return "pallas_call" in str(jax.make_jaxpr(f)(x, w))


def test_matmul_takes_the_kernel_only_in_context_for_one_row_in_range():
    w = jnp.zeros((32, 16))
    one, two = jnp.zeros((1, 1, 32)), jnp.zeros((2, 1, 32))
    assert uses_kernel(one, w, options=ANY)
    assert not uses_kernel(one, w, enabled=False, options=ANY)
    assert not uses_kernel(two, w, options=ANY)  # two rows: jnp.dot
    assert not uses_kernel(one, w, options=ANY._replace(min_elements=32 * 16 + 1))  # below the range
    assert not uses_kernel(one, w, options=ANY._replace(max_elements=32 * 16))  # XLA makes it a GEMM: above
    assert not uses_kernel(one, w)  # defaults: compiled on a GPU only (here the CPU)
    assert not uses_kernel(jnp.zeros((1, 40)), jnp.zeros((40, 16)), options=ANY)  # 40 rows: chunks of 8 < MIN_TILE
    assert not uses_kernel(one, [jnp.zeros((32, 24)), jnp.zeros((32, 8))], options=ANY)  # columns: tiles of 8
    with one_token_matmuls(options=ANY):
        y = matmul(jnp.ones((1, 1, 32)), jnp.ones((32, 16)))
    assert y.shape == (1, 1, 16) and float(y[0, 0, 0]) == 32.0


def test_generator_with_one_token_kernels_gives_the_same_tokens():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=64)
    model = random_llama(cfg, 0)
    ids = np.random.RandomState(1).randint(0, 64, (1, 5)).astype(np.int32)
    want = np.asarray(Generator(model)(ids, max_new_tokens=6))
    np.testing.assert_array_equal(np.asarray(Generator(model, one_token=ANY)(ids, max_new_tokens=6)), want)

    gen = Generator(model, one_token=ANY._replace(interpret=False))  # Triton, lowered for CUDA on this host
    args = (gen.state, jnp.asarray(ids), jnp.ones((1, 5), jnp.int32), jax.random.key(0), jnp.float32(1),
            jnp.int32(1), jnp.float32(1), jnp.full((8,), -1, jnp.int32), jnp.int32(0))
    text = cuda_lowering(_generate, *args, graphdef=gen.graphdef, max_new_tokens=3, greedy=True, candidates=0,
                         fuse=gen.fuse, one_token=gen.one_token)
    # in the decode loop: q/k/v (fused), o, gate/up (fused) and down of each layer, and the LM head (64 x 32, in
    # range here); the prefill has 5 rows (jnp.dot)
    assert text.count("__gpu$xla.gpu.triton") == 4 * cfg.num_layers + 1


def test_one_token_matmul_of_several_kernels_equals_the_product_of_their_concatenation():
    rs = np.random.RandomState(7)
    x = jnp.asarray(rs.normal(size=(1, 64)), jnp.float32)
    ws = [jnp.asarray(rs.normal(size=(64, n)), jnp.float32) for n in (96, 32, 32)]  # q/k/v-like: GQA widths
    want = np.asarray(x) @ np.concatenate([np.asarray(w) for w in ws], axis=1)
    for options in (ANY, ANY._replace(out=8, width=16)):
        got = one_token_matmul(x, ws, options=options, interpret=True)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    with one_token_matmuls(options=ANY):
        jaxpr = str(jax.make_jaxpr(matmul)(x, ws))
    assert "pallas_call" in jaxpr and "concatenate" not in jaxpr  # the kernels read in place, never copied
    np.testing.assert_allclose(np.asarray(matmul(x, ws)), want, atol=1e-4, rtol=1e-5)  # outside: jnp.dot
