"""The host's share of the kernel-only batched merge, on any machine: the 1.1B benchmark's grouping (bench_merge's
llama specs, 6 same-shape groups, batched_host.bench_groups) at SIZE's shapes (default tiny: the host work does not
depend on the tensors' size), task_arithmetic with the bench's weights; the time for the six merge_stacked calls
to return (dispatch, mean of 50 runs, before blocking), then a cProfile of 100 runs (top 18 by own time).
    SIZE=tiny python benchmarks/merge_host_2026-12-06/host_profile.py
"""
import cProfile
import os
import pstats
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batched_host import bench_groups  # noqa: E402
from configurable_fm.ops.merge.execute import KernelCache, merge_stacked  # noqa: E402
from configurable_fm.ops.merge.registry import get_method  # noqa: E402

groups = bench_groups(os.environ.get("SIZE", "tiny"), ["task_arithmetic"])[0]["task_arithmetic"]
method = get_method("task_arithmetic")
cache = KernelCache()


def run():
    return [merge_stacked(method, b, xs, kws, out_dtype=jnp.bfloat16, load_dtype=np.float32, names=ns, cache=cache)
            for ns, kws, b, xs in groups]


jax.block_until_ready(run())
t = time.perf_counter()
for _ in range(50):
    r = run()
print(f"dispatch per run: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms for {len(groups)} merge_stacked calls "
      f"({[len(g[0]) for g in groups]} tensors)")
jax.block_until_ready(r)
profile = cProfile.Profile()
profile.runcall(lambda: [run() for _ in range(100)])
pstats.Stats(profile).sort_stats("tottime").print_stats(18)
