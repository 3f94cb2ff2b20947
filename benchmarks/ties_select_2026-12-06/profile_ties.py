"""Where the batched ties kernel's time goes: one group of the 1.1B benchmark (L stacked same-shape tensors, the
base and three fine-tunes in bf16, float32 arithmetic, bf16 out, density 0.5, normalize) merged by
execute.merge_stacked, timed, then traced (configurable_fm.profiling: the top device kernels). Also the same
group with task_arithmetic (no selection) for contrast, and the selection alone (sparsify.magnitude_mask
vmapped) with 1, 3 and 15 thresholds per pass (SPLITS, comma-separated; METHODS likewise, empty for none;
the package uses 7).
    python3 benchmarks/ties_select_2026-12-06/profile_ties.py OUTDIR [L ROWS COLS]
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "scripts")
import bench_merge as bm  # noqa: E402
from configurable_fm import profiling  # noqa: E402
from configurable_fm.ops.merge import params as P  # noqa: E402
from configurable_fm.ops.merge import sparsify as sp  # noqa: E402
from configurable_fm.ops.merge.execute import KernelCache, merge_stacked  # noqa: E402
from configurable_fm.ops.merge.registry import get_method  # noqa: E402

if len(sys.argv) not in (2, 5) or not all(a.isdigit() for a in sys.argv[2:]):
    sys.exit("usage: profile_ties.py OUTDIR [L ROWS COLS]  (L ROWS COLS: positive integers)")
out = sys.argv[1]
L, rows, cols = (int(a) for a in sys.argv[2:5]) if len(sys.argv) > 4 else (22, 5632, 2048)
names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(L)]
tensors = {mm: jnp.stack([bm.random_tensor(n, (rows, cols), k) for n in names]) for k, mm in enumerate(bm.MODELS)}
jax.block_until_ready(tensors)
moved = L * rows * cols * (4 * 2 + 2)


def timed(fn, iters=5):
    jax.block_until_ready(fn())
    best = 1e9
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


for method in os.environ.get("METHODS", "ties,task_arithmetic").split(","):
    if not method:
        continue
    m = get_method(method)
    per_model = [{"weight": w, **({"density": 0.5} if method == "ties" else {})} for w in bm.WEIGHTS]
    kws = [P.resolve_for_tensor(m, n, parameters={"normalize": True} if method == "ties" else {},
                                model_parameters=per_model, model_names=list(bm.MODELS[1:]), num_layers=L)
           for n in names]
    cache = KernelCache()
    run = lambda: merge_stacked(m, tensors["base"], [tensors[x] for x in bm.MODELS[1:]], kws,  # noqa: E731
                                out_dtype=jnp.bfloat16, load_dtype=np.float32, names=names, cache=cache)
    t = timed(run)
    row = {"method": method, "L": L, "shape": [rows, cols], "seconds": t, "tb_per_s": moved / t / 1e12}
    prof = profiling.trace_kernels(lambda: jax.block_until_ready(run()), f"{out}/trace_{method}", top=20)
    row["top"] = prof.get("top")
    row["categories"] = prof.get("categories")
    print(json.dumps(row), flush=True)

delta = (tensors["ft_a"].astype(jnp.float32) - tensors["base"].astype(jnp.float32))
for splits in map(int, filter(None, os.environ.get("SPLITS", "1,3,15").split(","))):  # thresholds per narrowing pass
    sp._SPLITS = splits
    jax.clear_caches()  # rank_window_mask's own jit cache would keep the first setting's program
    select = jax.jit(jax.vmap(lambda d: sp.magnitude_mask(d, np.float32(0.5))))
    t = timed(lambda: select(delta))
    prof = profiling.trace_kernels(lambda: jax.block_until_ready(select(delta)), f"{out}/trace_select{splits}", top=12)
    print(json.dumps({"what": "magnitude_mask alone, vmapped over L, one model", "splits": splits, "seconds": t,
                      "top": prof.get("top"), "categories": prof.get("categories")}), flush=True)
