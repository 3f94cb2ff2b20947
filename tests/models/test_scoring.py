"""models.scoring: `logits` (float32 numpy from one compiled program per model structure) and `next_token_nll`'s
gradient (autodiff on the CPU, a one-pass custom VJP on accelerators: the same values)."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models import scoring
from configurable_fm.models.scoring import logits, next_token_nll
from tests.helpers import compiles, cuda_lowering, random_llama

CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=32)


def test_logits_equal_the_eager_forward_and_compile_once_per_structure():
    a, b = random_llama(CFG, 0), random_llama(CFG, 1)
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 7)).astype(np.int32)
    with compiles("_logits") as c:
        la, lb = logits(a, ids), logits(b, ids.tolist())  # any integer array-like
    assert c.count == 1  # b has a's structure: the same program
    assert la.dtype == np.float32 and la.shape == (2, 7, CFG.vocab_size)
    np.testing.assert_allclose(la, np.asarray(a(jnp.asarray(ids))), atol=1e-5, rtol=0)
    np.testing.assert_allclose(lb, np.asarray(b(jnp.asarray(ids))), atol=1e-5, rtol=0)
    assert np.abs(la - lb).max() > 1e-2


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 11)) * 3, jnp.float32)
TARGETS = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 5)), jnp.int32)
WEIGHTS = jnp.asarray(np.random.default_rng(2).random((2, 5)), jnp.float32)


def weighted_grad(f, x):
    return jax.grad(lambda x: (f(x, TARGETS) * WEIGHTS).sum())(x)


def test_the_one_pass_vjp_gives_autodiffs_values_and_gradients():
    """The accelerators' custom VJP (softmax - onehot, one elementwise pass, in the logits' dtype) against autodiff
    of the same formula: values bit for bit, gradients to 2 float32 ulps and equal in bf16; per-example (vmap) and
    second-order gradients too. On the CPU next_token_nll is autodiff's, bit for bit."""
    one_pass, autodiff = scoring._nll_one_pass_grad, scoring._nll_autodiff
    for dtype, tol in ((jnp.float32, 3e-7), (jnp.bfloat16, 0.0)):
        x = LOGITS.astype(dtype)
        np.testing.assert_array_equal(np.asarray(one_pass(x, TARGETS)), np.asarray(autodiff(x, TARGETS)))
        ours, theirs = weighted_grad(one_pass, x), weighted_grad(autodiff, x)
        assert ours.dtype == dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tol, rtol=0)
        np.testing.assert_array_equal(np.asarray(weighted_grad(next_token_nll, x)), np.asarray(theirs))
        np.testing.assert_array_equal(np.asarray(next_token_nll(x, TARGETS)), np.asarray(autodiff(x, TARGETS)))
    per_example = [jax.vmap(jax.grad(lambda x, t, f=f: f(x[None], t[None]).sum()))(LOGITS, TARGETS)
                   for f in (one_pass, autodiff)]
    np.testing.assert_allclose(*per_example, atol=3e-7, rtol=0)
    second = [jax.grad(lambda x, f=f: (weighted_grad(f, x) ** 2).sum())(LOGITS) for f in (one_pass, autodiff)]
    np.testing.assert_allclose(*second, atol=1e-6, rtol=0)


def test_the_gradient_lowered_for_cuda_has_no_scatter_and_for_the_cpu_autodiffs():
    """Lowered for CUDA, next_token_nll's gradient is the one-pass VJP (no scatter: autodiff scatters -g into a
    float32 (..., V) buffer at the targets); lowered for the CPU it is autodiff's (a scatter)."""
    grad = jax.jit(jax.grad(lambda x: next_token_nll(x, TARGETS).sum()))
    x = LOGITS.astype(jnp.bfloat16)
    scatters = lambda text: len(re.findall(r"stablehlo\.scatter", text))
    assert scatters(cuda_lowering(grad, x)) == 0
    assert scatters(grad.lower(x).as_text()) > 0


def test_token_nll_of_a_left_padded_row_is_the_unpadded_rows():
    """A left-padded row scores the tokens the unpadded row scores: the last pad's 'prediction' of the first real
    token (made from no real token) is NaN like the pads' own, so the perplexity is the unpadded one."""
    model = random_llama(CFG, 0)
    ids = np.random.RandomState(1).randint(1, CFG.vocab_size, (1, 6)).astype(np.int32)
    pad = 3
    padded = np.concatenate([np.zeros((1, pad), np.int32), ids], 1)
    mask = np.concatenate([np.zeros((1, pad), np.int32), np.ones_like(ids)], 1)
    want = scoring.token_nll(model, ids)
    got = scoring.token_nll(model, padded, mask)
    assert np.isnan(got[0, :pad]).all()
    np.testing.assert_allclose(got[0, pad:], want[0], rtol=1e-5)
    assert abs(scoring.perplexity(model, padded, mask) / scoring.perplexity(model, ids) - 1) < 1e-5
