"""models.scoring.logits: the model's logits as float32 numpy from one compiled program per model structure."""
import jax.numpy as jnp
import numpy as np

from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import logits
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
