"""What a test pays to compile on the CPU (the suite's time, 2026-12-06): 390 distinct eager ops (78 shapes x 5 ops),
a tiny llama's forward run op by op, and the same forward as one jitted program. From the repository root, with the
suite's flags and one XLA flag more at a time:
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 \\
      --xla_force_host_platform_device_count=8 [FLAG]" \\
      .venv/bin/python benchmarks/suite_time_2026-12-06/compile_probe.py
2-core machine, 2026-12-06 04:40, one process per flag set: eager ops 13.2-14.2 s, eager model 2.4-2.9 s, jitted
model 0.36-0.44 s with the suite's flags; with --xla_cpu_use_fusion_emitters=false 8.4 / 1.8 / 0.26 s; with
--xla_cpu_emitter_verification_level=0, --xla_cpu_use_xnnpack=false, --xla_cpu_parallel_codegen_split_count=1,
--xla_cpu_copy_insertion_use_region_analysis=false or --xla_cpu_use_thunk_runtime=false within that spread."""
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configurable_fm.models.llama import LlamaConfig  # noqa: E402
from tests.helpers import random_llama  # noqa: E402

t = time.time()
for n in range(2, 80):  # a new shape each time: every op compiles again
    (jnp.tanh(jnp.ones((n, 3))) * 2 + 1).sum(0).block_until_ready()
eager_ops = time.time() - t

cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=12, max_position_embeddings=64)
ids = jnp.zeros((2, 7), jnp.int32)
t = time.time()
model = random_llama(cfg, 0)
model(ids).block_until_ready()
eager_model = time.time() - t

graphdef, state = nnx.split(model)
t = time.time()
jax.jit(lambda s: nnx.merge(graphdef, s)(ids).sum())(state).block_until_ready()
jit_model = time.time() - t
print(f"eager ops {eager_ops:.2f}s  eager model {eager_model:.2f}s  jit model {jit_model:.2f}s")
