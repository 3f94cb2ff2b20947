"""How long ops.route.unroute takes (the plain base of a weighted_mix, what FoldedModels takes once), and where:
10 random rank-8 LoRA adapters on every projection of a random model of SHAPE (bench_adapters' shapes), float32,
the median of 3 calls, then a cProfile of one call (its top entries by cumulative time).
    .venv/bin/python benchmarks/unroute_time_2026-12-07/unroute_time.py [SHAPE]      (default 135m)
2-core CPU, 2026-12-07 07:45, quiet, alternating a worktree of 9bad4f3~1 with this tree, twice: 1.15 / 1.23 s
before linear_holding cloned a cached abstract Linear (an `nnx.eval_shape` of a new one per module, 210 of them),
0.30 / 0.31 s after (beside a test run earlier: 0.76 -> 0.33 s)."""
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
import bench_adapters as B  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "135m"
if len(sys.argv) > 2 or shape not in B.SHAPES:
    sys.exit(f"usage: unroute_time.py [SHAPE], SHAPE one of {sorted(B.SHAPES)}; got {sys.argv[1:]}")
import jax.numpy as jnp  # noqa: E402

from configurable_fm.bricks import adapters  # noqa: E402
from configurable_fm.models.factory import build_model  # noqa: E402
from configurable_fm.ops import route  # noqa: E402

base = build_model(B.model_spec(shape, 64), seed=0, param_dtype=jnp.float32, dtype=jnp.float32)
library = [adapters.attach(base, "lora", B.TARGETS.split(","), rank=8, alpha=16, init="random", seed=i)
           for i in range(10)]
model = route.weighted_mix(base, library)
times = []
for _ in range(3):
    start = time.perf_counter()
    route.unroute(model)
    times.append(time.perf_counter() - start)
print(f"{shape}: unroute {statistics.median(times):.3f} s (median of 3: {', '.join(f'{t:.3f}' for t in times)})")
profile = cProfile.Profile()
profile.runcall(route.unroute, model)
out = io.StringIO()
pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(8)
print(out.getvalue())
