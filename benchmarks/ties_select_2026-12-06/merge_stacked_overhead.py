"""Host cost of one execute.merge_stacked call (22 stacked 8 x 8 tensors, the base and three fine-tunes; the
device work is negligible): python benchmarks/ties_select_2026-12-06/merge_stacked_overhead.py (2-core CPU,
2026-12-06 16:10: task_arithmetic 0.844 -> 0.399 ms per call with the _freeze fast path and one freeze of the
shared parameters; ties 42.7 / 45.6 ms, its CPU radix histograms, then 0.567 ms with the sorted selection of
small tensors; 0.451 ms at 19:59. Default XLA flags: with the test suite's -O0 flags the ties call takes ~4.2 ms)."""
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

L = 22
names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(L)]
tensors = {mm: jnp.stack([bm.random_tensor(n, (8, 8), k) for n in names]) for k, mm in enumerate(bm.MODELS)}
for method in ("task_arithmetic", "ties"):
    m = get_method(method)
    per_model = [{"weight": w, **({"density": 0.5} if method == "ties" else {})} for w in bm.WEIGHTS]
    kws = [P.resolve_for_tensor(m, n, parameters={"normalize": True} if method == "ties" else {},
                                model_parameters=per_model, model_names=list(bm.MODELS[1:]), num_layers=L)
           for n in names]
    cache = KernelCache()
    run = lambda: merge_stacked(m, tensors["base"], [tensors[x] for x in bm.MODELS[1:]], kws,  # noqa: E731
                                out_dtype=jnp.bfloat16, load_dtype=np.float32, names=names, cache=cache)
    jax.block_until_ready(run())
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(100):
            y = run()
        jax.block_until_ready(y)
        best.append((time.perf_counter() - t0) / 100 * 1e3)
    print(method, "ms per call (8x8 tensors, L=22), best of 5 x 100:", round(min(best), 3))
