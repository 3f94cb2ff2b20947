"""Is the kernel-only batched merge of bench_merge.py host-bound? The 1.1B benchmark's tensors (bf16, on the
device), grouped by shape as `bench_merge.py --kernels_only` groups them, merged by one execute.merge_stacked call
per group (6 groups), for each method in METHODS (default linear,task_arithmetic; per-model weights as the bench's,
no other parameters):
    block     min over ITERS of run() then block_until_ready (the bench's kernel_batched row)
    dispatch  the same runs' time for run() to return, before blocking (the host's share)
    busy      the device kernels' summed time in one traced run (configurable_fm.profiling)
    one_jit   the groups' cached batched kernels called inside one jax.jit (one dispatch for all 6 groups)
and the fraction of the HBM bound for each (bytes: inputs bf16 read once, bf16 written once).
    python3 benchmarks/merge_host_2026-12-06/batched_host.py OUTDIR      (SIZE=tiny for a CPU check)
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
from configurable_fm.ops.merge.execute import KernelCache, merge_stacked  # noqa: E402
from configurable_fm.ops.merge.registry import get_method  # noqa: E402


def bench_groups(size: str, methods, device=None):
    """{method: [(names, resolved parameters, base stack or None, [input stacks])]} for bench_merge's llama
    specs at `size`, grouped by shape (6 groups), random bf16 tensors (the bench's) stacked on `device`; the
    per-model weights are the bench's, no other parameters (linear without its base)."""
    specs = bm.llama_specs(bm.SIZES[size])
    names = [n for n, _ in specs]
    depth = P.num_layers_of(names)
    by_shape: dict = {}
    for j, (n, s) in enumerate(specs):
        by_shape.setdefault(s, []).append(j)
    stacks = {m: [jnp.stack([jax.device_put(bm.random_tensor(names[j], specs[j][1], i), device) for j in idx])
                  for idx in by_shape.values()] for i, m in enumerate(bm.MODELS)}
    out = {}
    for method in methods:
        m = get_method(method)
        per_model = [{"weight": w} for w in bm.WEIGHTS]
        out[method] = [([names[j] for j in idx],
                        [P.resolve_for_tensor(m, names[j], parameters={}, model_parameters=per_model,
                                              model_names=list(bm.MODELS[1:]), num_layers=depth) for j in idx],
                        stacks["base"][g] if method != "linear" else None, [stacks[x][g] for x in bm.MODELS[1:]])
                       for g, idx in enumerate(by_shape.values())]
    return out, specs


def main(out: str) -> None:
    iters = int(os.environ.get("ITERS", "10"))
    dev = jax.devices()[0]
    bound = bm.hbm_bound(dev.device_kind)
    methods = os.environ.get("METHODS", "linear,task_arithmetic").split(",")
    all_groups, specs = bench_groups(os.environ.get("SIZE", "1b"), methods, dev)
    jax.block_until_ready([g[2:] for gs in all_groups.values() for g in gs])
    for method in methods:
        m = get_method(method)
        groups = all_groups[method]
        base_used = method != "linear"
        n_in = len(bm.MODELS) - 1 + base_used
        moved = sum((n_in * 2 + 2) * int(np.prod(s)) for _, s in specs)
        cache = KernelCache()
        def run():
            return [merge_stacked(m, b, xs, kws, out_dtype=jnp.bfloat16, load_dtype=np.float32, names=ns,
                                  cache=cache) for ns, kws, b, xs in groups]

        jax.block_until_ready(run())
        block, dispatch = [], []
        for _ in range(iters):
            t0 = time.perf_counter()
            r = run()
            t1 = time.perf_counter()
            jax.block_until_ready(r)
            t2 = time.perf_counter()
            block.append(t2 - t0)
            dispatch.append(t1 - t0)
        prof = profiling.trace_kernels(lambda: jax.block_until_ready(run()), f"{out}/trace_{method}", top=8)
        # one program: the cached batched kernels of every group, called inside one jit
        fns = [cache.get_batched(m, kws[0], np.float32, np.dtype(jnp.bfloat16), None) for _, kws, _, _ in groups]
        arrays = [{k: jnp.asarray(np.stack([p[k] for p in kws])) for k, v in kws[0].items()
                   if isinstance(v, np.ndarray) and v.ndim == 1} for _, kws, _, _ in groups]
        one = jax.jit(lambda bs, xss, arrs: [f(b, tuple(xs), None, a) for f, b, xs, a in zip(fns, bs, xss, arrs)])
        bs, xss = [g[2] for g in groups], [g[3] for g in groups]
        jax.block_until_ready(one(bs, xss, arrays))
        one_t = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(one(bs, xss, arrays))
            one_t.append(time.perf_counter() - t0)
        row = {"method": method, "device": dev.device_kind, "groups": len(groups), "bytes": moved,
               "block_ms": 1e3 * min(block), "dispatch_ms": 1e3 * min(dispatch),
               "dispatch_median_ms": 1e3 * float(np.median(dispatch)), "busy_ms": prof.get("busy_ms"),
               "traced_wall_ms": prof.get("wall_ms"), "one_jit_ms": 1e3 * min(one_t),
               "top": prof.get("top")}
        for k in ("block_ms", "one_jit_ms", "busy_ms"):
            if bound and row.get(k):
                row[k.replace("_ms", "_of_bound")] = moved / (row[k] / 1e3) / bound
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: batched_host.py OUTDIR")
    main(sys.argv[1])
