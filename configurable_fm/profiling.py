"""Device-kernel summaries of a jax.profiler trace: where a step's device time goes, for the bench scripts.

    summary = trace_kernels(lambda: np.asarray(step(...)), "/tmp/prof", steps=3)
    summary["top"]        # the 25 kernels of largest total time: name, count, total_ms, mean_us
    summary["categories"] # device time by kind: matmul, attention, fusion (XLA's fused elementwise/reductions), ...

`trace_kernels(fn, logdir)` runs fn() once under `jax.profiler.trace` (a perfetto trace is written into logdir),
then reads the trace's complete events ('X') of the GPU device processes. `busy_ms` sums the kernels' durations
(overlapping kernels of several streams count twice); `wall_ms` is fn()'s wall time under the trace. With `steps`,
per-step figures divide by it. On a machine without a GPU the trace holds no device process: the summary says so.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
from typing import Any, Callable

CATEGORIES = (  # the first pattern a kernel's name matches (case-insensitive) names its category
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|sm\d+_|matmul|dot"),
    ("collective", r"nccl|all_reduce|all_gather|reduce_scatter"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("reduction fusion", r"reduce"),
    ("loop fusion", r"fusion"),
)


def category(name: str) -> str:
    """The CATEGORIES entry of a kernel name; 'other' when none matches."""
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def _device_kernels(logdir: str) -> list[dict] | None:
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        return None
    with gzip.open(files[-1]) as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {p for p, n in names.items() if re.search(r"/device:GPU", n)}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


def summarize(kernels: list[dict], steps: int = 1, top: int = 25) -> dict[str, Any]:
    """Totals of trace events [{'name', 'dur' (µs)}]: per kernel name and per category, largest first."""
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e["name"], []).append(float(e.get("dur", 0)))
    busy_us = sum(sum(v) for v in by_name.values())
    by_cat: dict[str, float] = {}
    for n, d in by_name.items():
        by_cat[category(n)] = by_cat.get(category(n), 0.0) + sum(d)
    steps = max(int(steps), 1)
    return {
        "device_events": len(kernels), "events_per_step": len(kernels) / steps,
        "busy_ms": busy_us / 1e3, "busy_ms_per_step": busy_us / 1e3 / steps,
        "categories": [{"category": c, "ms_per_step": t / 1e3 / steps, "share": t / busy_us if busy_us else 0.0}
                       for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])],
        "top": [{"name": n[:120], "category": category(n), "count": len(d), "total_ms": sum(d) / 1e3,
                 "mean_us": sum(d) / len(d), "share": sum(d) / busy_us if busy_us else 0.0}
                for n, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]],
    }


def trace_kernels(fn: Callable[[], Any], logdir: str, steps: int = 1, top: int = 25) -> dict[str, Any]:
    """Runs fn() (which should block until its device work is done) once under jax.profiler.trace into logdir;
    returns summarize() of the device kernels plus wall_ms, or {'profile': 'no device kernels ...'}."""
    import jax

    os.makedirs(logdir, exist_ok=True)
    t = time.perf_counter()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        fn()
    wall_ms = (time.perf_counter() - t) * 1e3
    kernels = _device_kernels(logdir)
    if not kernels:
        return {"profile": "no device kernels in the trace (no GPU, or no perfetto trace written)",
                "logdir": logdir, "wall_ms": wall_ms}
    return {"wall_ms": wall_ms, "wall_ms_per_step": wall_ms / max(int(steps), 1), "logdir": logdir,
            **summarize(kernels, steps, top)}
