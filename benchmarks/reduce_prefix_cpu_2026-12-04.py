"""The reduction step computes only the layers its taps need (BENCHMARKS, "Editing speed", notes).

    .venv/bin/python benchmarks/reduce_prefix_cpu_2026-12-04.py

Compiles analysis.reduce's step for a Gram matrix of `layers.N.mlp.down_proj.input` of a random 8 x 256 llama
(batch 8 x 256) with N = 0 and N = 7, counts the matmuls of the compiled program and times three calls. Output on
this project's 2-core CPU, 2026-12-04 (jax 0.10.2): `0 dots 9 time 0.0399` and `7 dots 72 time 0.2028`.
"""
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.analysis import reduce as R
from configurable_fm.models.factory import build_model

spec = dict(family="llama", vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4,
            num_kv_heads=2, max_position_embeddings=512)
g, s = nnx.split(build_model(spec, seed=0))
ids, mask = jnp.ones((8, 256), jnp.int32), jnp.ones((8, 256), jnp.float32)
for layer in (0, 7):
    point = f"layers.{layer}.mlp.down_proj.input"
    plan = R._Plan((point,), ((R._as_reduction("gram", point),),), R.model_inputs, jax.tree.structure([]), ())
    text = R._step.lower(g, plan, s, {"inputs": ids}, mask, [], None).compile().as_text()
    f = jax.jit(lambda s: R._reduce_step(g, plan, s, {"inputs": ids}, mask, [], None))
    jax.block_until_ready(f(s))
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(f(s))
    print(layer, "dots", text.count(" dot("), "time", round((time.perf_counter() - t) / 3, 4))
