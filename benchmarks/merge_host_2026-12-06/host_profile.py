"""The host's share of the kernel-only batched merge, on any machine: the 1.1B benchmark's grouping (bench_merge's
llama specs, 6 same-shape groups) at SIZE's shapes (default tiny: the host work does not depend on the tensors'
size), task_arithmetic with the bench's weights; the time for the six merge_stacked calls to return (dispatch,
mean of 50 runs, before blocking), then a cProfile of 100 runs (top 18 by own time).
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

sys.path.insert(0, "scripts")
import bench_merge as bm  # noqa: E402
from configurable_fm.ops.merge import params as P  # noqa: E402
from configurable_fm.ops.merge.execute import KernelCache, merge_stacked  # noqa: E402
from configurable_fm.ops.merge.registry import get_method  # noqa: E402

specs = bm.llama_specs(bm.SIZES[os.environ.get("SIZE", "tiny")])
names = [n for n, _ in specs]
depth = P.num_layers_of(names)
by_shape: dict = {}
for j, (n, s) in enumerate(specs):
    by_shape.setdefault(s, []).append(j)
stacks = {m: [jnp.stack([bm.random_tensor(names[j], specs[j][1], i) for j in idx]) for idx in by_shape.values()]
          for i, m in enumerate(bm.MODELS)}
method = get_method("task_arithmetic")
per_model = [{"weight": w} for w in bm.WEIGHTS]
groups = []
for g, idx in enumerate(by_shape.values()):
    kws = [P.resolve_for_tensor(method, names[j], parameters={}, model_parameters=per_model,
                                model_names=list(bm.MODELS[1:]), num_layers=depth) for j in idx]
    groups.append(([names[j] for j in idx], kws, stacks["base"][g], [stacks[x][g] for x in bm.MODELS[1:]]))
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
