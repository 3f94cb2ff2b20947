"""models.scoring: `logits` (float32 numpy from one compiled program per model structure) and `next_token_nll`'s
custom gradient."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import logits, next_token_nll
from tests.helpers import compiles, random_llama

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


def plain_nll(logits, targets):
    """next_token_nll's formula, differentiated by jax itself (the reference for its custom VJP)."""
    f = logits.astype(jnp.float32)
    return jax.nn.logsumexp(f, -1) - jnp.take_along_axis(f, targets[..., None], -1)[..., 0]


LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 11)) * 3, jnp.float32)
TARGETS = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 5)), jnp.int32)
WEIGHTS = jnp.asarray(np.random.default_rng(2).random((2, 5)), jnp.float32)


def test_next_token_nll_values_and_gradients_are_the_formulas():
    """The custom VJP (softmax - onehot, one elementwise pass) gives autodiff's gradient of the same formula: float32
    to 2 ulps, bf16 logits -> a bf16 gradient; per-example (vmap) and second-order gradients too; the values are
    the formula's bit for bit."""
    for dtype, tol in ((jnp.float32, 3e-7), (jnp.bfloat16, 0.0)):
        x = LOGITS.astype(dtype)
        np.testing.assert_array_equal(np.asarray(next_token_nll(x, TARGETS)), np.asarray(plain_nll(x, TARGETS)))
        ours, theirs = (jax.grad(lambda x, f=f: (f(x, TARGETS) * WEIGHTS).sum())(x)
                        for f in (next_token_nll, plain_nll))
        assert ours.dtype == dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tol, rtol=0)
    per_example = [jax.vmap(jax.grad(lambda x, t, f=f: f(x[None], t[None]).sum()))(LOGITS, TARGETS)
                   for f in (next_token_nll, plain_nll)]
    np.testing.assert_allclose(*per_example, atol=3e-7, rtol=0)
    second = [jax.grad(lambda x, f=f: (jax.grad(lambda y: (f(y, TARGETS) * WEIGHTS).sum())(x) ** 2).sum())(LOGITS)
              for f in (next_token_nll, plain_nll)]
    np.testing.assert_allclose(*second, atol=1e-6, rtol=0)


def test_next_token_nll_gradient_is_one_pass_without_a_scatter():
    """Autodiff of the formula scatters -g into a float32 (..., V) buffer before casting it to the logits' dtype;
    the custom VJP's compiled gradient has no scatter (and autodiff's has one: the check can fail)."""
    x = LOGITS.astype(jnp.bfloat16)
    hlo = {f: jax.jit(jax.grad(lambda x, f=f: f(x, TARGETS).sum())).lower(x).compile().as_text()
           for f in (next_token_nll, plain_nll)}
    scatters = {f: len(re.findall(r"= \S+ scatter\(", text)) for f, text in hlo.items()}  # instructions only
    assert scatters[next_token_nll] == 0 and scatters[plain_nll] > 0
