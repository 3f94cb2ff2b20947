"""Where 390 distinct eager ops spend their time (the "c" session's reading of the per-op compile cost): the
stages jax reports through its monitoring events (tracing, lowering to MLIR, XLA backend compilation), summed.
From the repository root, with the suite's flags (`perf record -g` around the same command gave the native split):
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0" \\
      .venv/bin/python benchmarks/suite_time_2026-12-06/eager_ops_compile.py
2-core machine, 2026-12-06 08:55: 11.3-11.8 s in all, 8.7-9.0 s of it backend compilation, 1.9 s lowering, with
jax 0.10.2; the pyenv Python 3.12 venv (jax 0.12.1): 8.6 s, 7.3 s and 0.5 s."""
import time

import jax.numpy as jnp
from jax._src import monitoring

totals: dict[str, float] = {}
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: totals.__setitem__(event, totals.get(event, 0.0) + duration))
jnp.ones(1).block_until_ready()
totals.clear()
start = time.time()
for n in range(2, 80):  # a new shape each time: each of the 5 ops compiles again
    (jnp.tanh(jnp.ones((n, 3))) * 2 + 1).sum(0).block_until_ready()
print(f"390 eager ops: {time.time() - start:.2f} s")
for event, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"  {seconds:7.3f} s  {event}")
