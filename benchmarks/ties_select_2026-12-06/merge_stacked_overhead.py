"""Host cost of one execute.merge_stacked call (22 stacked 8 x 8 tensors, the base and three fine-tunes; the
device work is negligible): python benchmarks/ties_select_2026-12-06/merge_stacked_overhead.py (2-core CPU,
2026-12-06 16:10: task_arithmetic 0.844 -> 0.399 ms per call with the _freeze fast path and one freeze of the
shared parameters; ties 42.7 / 45.6 ms, its CPU radix histograms, then 0.567 ms with the sorted selection of
small tensors)."""
import sys, time, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
import bench_merge as bm
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.execute import KernelCache, merge_stacked
from configurable_fm.ops.merge.registry import get_method
L=22; names=[f"model.layers.{i}.mlp.up_proj.weight" for i in range(L)]
t = {mm: jnp.stack([bm.random_tensor(n, (8, 8), k) for n in names]) for k, mm in enumerate(bm.MODELS)}
for meth in ("task_arithmetic", "ties"):
    m = get_method(meth)
    per = [{"weight": w, **({"density": 0.5} if meth == "ties" else {})} for w in bm.WEIGHTS]
    kws = [P.resolve_for_tensor(m, n, parameters={"normalize": True} if meth == "ties" else {}, model_parameters=per, model_names=list(bm.MODELS[1:]), num_layers=L) for n in names]
    cache = KernelCache()
    run = lambda: merge_stacked(m, t["base"], [t[x] for x in bm.MODELS[1:]], kws, out_dtype=jnp.bfloat16, load_dtype=np.float32, names=names, cache=cache)
    jax.block_until_ready(run())
    best = []
    for r in range(5):
        t0 = time.perf_counter()
        for _ in range(100): y = run()
        jax.block_until_ready(y); best.append((time.perf_counter() - t0) / 100 * 1e3)
    print(meth, "ms per call (8x8 tensors, L=22), best of 5 x 100:", round(min(best), 3))
