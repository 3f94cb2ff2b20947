"""Tiny random models for the analysis tests, built without per-shape XLA compilations: the structure from
`build_model` (under nnx.eval_shape), the parameters drawn with numpy (norm weights N(1, 0.1), the rest N(0, 0.1))."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.models.factory import build_model

LLAMA = dict(family="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
             num_kv_heads=1, max_position_embeddings=32)
GPT2 = dict(family="gpt2", vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
BERT = dict(family="bert", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24)


def random_model(spec, seed, **options):
    abstract = nnx.eval_shape(lambda: build_model(spec, seed=0, **options))
    rs = np.random.RandomState(seed)
    return with_params(abstract, {k: jnp.asarray(rs.normal(1.0, 0.1, v.shape) if k.endswith(".weight") else
                                                 rs.normal(0.0, 0.1, v.shape), jnp.float32)
                                  for k, v in flat_state(abstract).items()})
