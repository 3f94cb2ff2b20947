"""Does XLA:CPU round a fused kernel like the op-by-op computation? Counts the float32 entries (of 100,000) where a
jitted `a * b + c` and `c + 0.3 (a - c) + 0.7 (b - c)` differ from the same expressions run op by op. Run it under
the flags to compare, from the repository root:
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0" \\
        .venv/bin/python benchmarks/suite_time_2026-12-06/classic_emitters_contraction.py
and the same with --xla_cpu_use_fusion_emitters=false added (jaxlib 0.10.2, 2026-12-06: 0 and 0 with the suite's
flags; 0 and 14,302 with the classic emitters added; 23,448 and 46,124 with the classic emitters alone, no -O0)."""
import jax
import jax.numpy as jnp
import numpy as np

rng = np.random.default_rng(0)
a, b, c = (jnp.asarray(rng.standard_normal(100_000).astype(np.float32)) for _ in range(3))
fma = jax.jit(lambda a, b, c: a * b + c)
ta = jax.jit(lambda a, b, c: c + 0.3 * (a - c) + 0.7 * (b - c))
eager_fma = a * b + c
eager_ta = c + jnp.float32(0.3) * (a - c) + jnp.float32(0.7) * (b - c)
print("a * b + c, fused != op by op:", int(np.sum(np.asarray(fma(a, b, c)) != np.asarray(eager_fma))))
print("c + 0.3 (a - c) + 0.7 (b - c), fused != op by op:", int(np.sum(np.asarray(ta(a, b, c)) != np.asarray(eager_ta))))
