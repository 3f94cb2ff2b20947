"""Streaming-merge benchmark: our scripts/merge.py against mergekit 0.1.5 on the same llama checkpoints.

    python scripts/bench_merge.py --workdir /work/bench_merge --size 1b --methods linear,task_arithmetic,ties \
        --tools ours,mergekit --repeats 2 --out /work/bench_merge/results.json
    python3 scripts/bench_merge.py --workdir /tmp/bm --size 1b --device gpu      # GPU machine: ours only

Inputs (made once, cached in --workdir/<size>/): a random llama HF checkpoint in bf16 (`1b`: TinyLlama's shape,
hidden 2048, 22 layers, 32/4 heads, FFN 5632, vocab 32000, untied head: 1.10 B parameters; `small`: hidden 768,
12 layers, 12/4 heads, FFN 2048: 0.12 B), sharded like HF (2 GB shards, index), and three "fine-tunes"
x_i = bf16(b + 1e-3 N(0, 1)) (norm weights: b = 1). Written by our own code (execute.PlannedShardWriter).

Each merge runs as its own process from the same YAML (`dtype: float32` load/compute dtype and
`out_dtype: bfloat16` unless --dtype says otherwise):
  ours:     python scripts/merge.py --mergekit_yaml X.yml --output OUT --overwrite --no_progress \
                --compute_dtype C        (--compute_dtype: mergekit (default: arithmetic in the YAML's dtype, as
                                          mergekit) or float32; they differ only for --dtype bfloat16)
  mergekit: /tmp/mk/bin/mergekit-yaml X.yml OUT      (its default CPU options)
with a warm page cache (every input file read once, untimed, before each run; os.sync() after each run so one
run's write-back does not land in the next), tools alternating in order across repeats.

Memory, per run:
  peak_rss: the kernel's high-water mark of the merge process (ru_maxrss from wait4, = VmHWM of the largest
    process of the tree): exact, no sampling gaps. It counts every resident page mapped by the process,
    including memory-mapped file pages (safetensors' safe_open maps the inputs; pages read through the map stay
    in RSS while mapped), which the page cache would hold anyway.
  peak_anon: the largest sum of RssAnon (private memory, no file pages) over the process tree, sampled from
    /proc every 20 ms: the memory the merge itself needs.
Throughput: GB/s = (bytes of every input tensor read + bytes written) / wall time.
Read bound (issue 14: an end-to-end merge is bound by reading its inputs): after each method's runs, the inputs
are read once more into one reused buffer, from the page cache (the state the runs start in) and with O_DIRECT
from the device (`--read_bandwidth both|cache|none`); "of read bound" = input bytes / wall time / the page-cache
read bandwidth (the wall time includes the process's start-up). With --device gpu the page cache is also read
from as many threads as the merge's read workers (execute.READ_WORKERS_ACCELERATOR), the bound of a merge that
reads with all of them; the table gives both fractions.
Load: each run records the 1-minute load average before and after it (`load_1min`; the table's last column lists
every run as "seconds @ load before-after"): on a shared machine the times mean little without it.
Agreement: per tensor max |ours - mergekit| (float32), the number of bitwise-equal tensors and, for bf16 outputs,
the largest distance in bf16 ulps (ties may differ by one rounding: mergekit's torch kernels vs ours).

--device gpu (no mergekit there): end-to-end runs of ours, plus a kernel-only figure per method: every tensor of
the model already on the device (random bf16), the cached fused kernel (execute.KernelCache) run over all of
them; bytes moved = (inputs + base + output) x tensor bytes; fraction of the HBM bound (from jax's device kind:
H200 4.8 TB/s, H100 3.35 TB/s, A100 2.0 TB/s).
A JSON of all results is written to --out and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
}
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
MERGEKIT = "/tmp/mk/bin/mergekit-yaml"
MODELS = ("base", "ft_a", "ft_b", "ft_c")
WEIGHTS = (0.5, 0.3, 0.2)


# ------------------------------------------------------------------------------------------------ the inputs
def llama_specs(cfg: dict) -> list[tuple[str, tuple]]:
    """HF llama tensor names and shapes, in HF's order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    specs = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                  (p + "mlp.down_proj.weight", (h, f)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def random_tensor(name: str, shape: tuple, model_index: int):
    """bf16 jax array: the base b (norms 1, else N(0, 0.02)); model i > 0: b + 1e-3 N(0, 1)."""
    import jax
    import jax.numpy as jnp

    if name.endswith("norm.weight"):
        b = jnp.ones(shape, jnp.float32)
    else:
        b = 0.02 * jax.random.normal(jax.random.key(_seed("base", name)), shape, jnp.float32)
    if model_index > 0:
        b = b + 1e-3 * jax.random.normal(jax.random.key(_seed(model_index, name)), shape, jnp.float32)
    return b.astype(jnp.bfloat16)


def make_checkpoints(root: Path, size: str) -> dict[str, Path]:
    """The four checkpoints under root/<size>/ (made once; a `.done` marker makes them reusable)."""
    import ml_dtypes
    import transformers

    from configurable_fm.ops.merge.execute import PlannedShardWriter

    cfg = SIZES[size]
    specs = llama_specs(cfg)
    out = {}
    for i, model in enumerate(MODELS):
        d = root / size / model
        out[model] = d
        if (d / ".done").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        writer = PlannedShardWriter(d, [(n, s, ml_dtypes.bfloat16) for n, s in specs], 2 * 10**9)
        for name, shape in specs:
            writer.add(name, random_tensor(name, shape, i))
        writer.finish()
        config = transformers.LlamaConfig(**cfg, max_position_embeddings=2048, tie_word_embeddings=False,
                                          torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
        config.to_json_file(d / "config.json")
        (d / ".done").write_text("ok\n")
        print(f"wrote {d} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


SLERP_T = "[0.0, 0.5, 0.3, 0.7, 1.0]"  # the depth gradient of mergekit's README slerp example (one t per layer)


def merged_models(method: str) -> tuple[str, ...]:
    """The non-base models a method merges: slerp interpolates the base towards one fine-tune, the others take all."""
    return MODELS[1:2] if method == "slerp" else MODELS[1:]


def write_yaml(path: Path, method: str, ckpt: dict[str, Path], dtype: str) -> Path:
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {ckpt['base']}")
    lines.append("models:")
    if method == "slerp":  # mergekit lists the base among the models; t follows a depth gradient
        lines += [f"  - model: {ckpt['base']}", f"  - model: {ckpt[MODELS[1]]}", "parameters:", f"  t: {SLERP_T}"]
    else:
        for model, w in zip(MODELS[1:], WEIGHTS):
            lines += [f"  - model: {ckpt[model]}", "    parameters:", f"      weight: {w}"]
            if method == "ties":
                lines.append("      density: 0.5")
    if method == "ties":
        lines += ["parameters:", "  normalize: true"]
    if dtype != "none":
        lines += [f"dtype: {dtype}", "out_dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")
    return path


def input_files(ckpt: dict[str, Path], method: str) -> list[Path]:
    models = merged_models(method) if method == "linear" else (MODELS[0], *merged_models(method))  # + base
    return [f for m in models for f in sorted(ckpt[m].glob("*.safetensors"))]


def read_files(files, flags: int = 0) -> float:
    """Reads every byte of `files` with os.preadv into one reused 64 MiB aligned buffer (`flags` for os.open, e.g.
    os.O_DIRECT); returns the seconds taken."""
    from configurable_fm.ops.merge.host_io import DIRECT_BLOCK, aligned_empty

    view = memoryview(aligned_empty((64 << 20,), np.uint8, DIRECT_BLOCK))
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | flags)
        try:
            pos = 0
            while (n := os.preadv(fd, [view], pos)) > 0:
                pos += n
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def read_files_parallel(files, threads: int, chunk: int = 64 << 20) -> float:
    """Reads every byte of `files` from `threads` threads at once, each taking the next 64 MiB chunk of the
    next file into its own reused aligned buffer (as the merge's read workers read different tensors at once);
    returns the seconds taken."""
    import concurrent.futures as cf

    from configurable_fm.ops.merge.host_io import DIRECT_BLOCK, aligned_empty

    jobs = [(f, pos, min(pos + chunk, os.path.getsize(f))) for f in files
            for pos in range(0, os.path.getsize(f), chunk)]
    local = threading.local()

    def read(job):
        if not hasattr(local, "view"):
            local.view = memoryview(aligned_empty((chunk,), np.uint8, DIRECT_BLOCK))
        file, pos, end = job
        fd = os.open(file, os.O_RDONLY)
        try:
            while pos < end and (n := os.preadv(fd, [local.view[:end - pos]], pos)) > 0:
                pos += n
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, jobs))
    return time.perf_counter() - t0


def warm(files) -> None:
    """One untimed read of every file into the page cache."""
    read_files(files)


def read_bandwidth(files, direct: bool, threads: int = 1) -> dict:
    """The machine's file read bandwidth over `files`, the bound of an end-to-end merge that reads them (read_files):
    from the page cache (after `warm`, best of two passes; with `threads` > 1 also read from that many threads at
    once, `read_files_parallel`) and, with `direct`, from the device (O_DIRECT: the page cache bypassed; one pass).
    GB/s."""
    total = checkpoint_bytes(files)
    warm(files)
    out = {"kind": "read_bandwidth", "bytes": total,
           "page_cache_gb_s": total / min(read_files(files), read_files(files)) / 1e9}
    if threads > 1:
        out["read_threads"] = threads
        out["page_cache_parallel_gb_s"] = total / min(read_files_parallel(files, threads),
                                                      read_files_parallel(files, threads)) / 1e9
    if direct and hasattr(os, "O_DIRECT"):
        try:
            out["direct_gb_s"] = total / read_files(files, os.O_DIRECT) / 1e9
        except OSError as e:  # a file system without O_DIRECT
            out["direct_error"] = str(e)
    return out


# ---------------------------------------------------------------------------------------------- measurement
def _tree(pid: int) -> list[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.Error:
        return []


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# A tiny launcher (python -S, ~10 MB): forks and execs the command, waits with wait4 and writes the child's
# ru_maxrss. Forking the command from this benchmark process instead would start the child's high-water mark at
# the benchmark's own RSS (Linux copies the mm's hiwater on fork and keeps it across exec).
_LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss,
               "cpu_s": ru.ru_utime + ru.ru_stime}, f)
"""


def run_measured(cmd: list[str], log: Path, env=None) -> dict:
    """Runs cmd through _LAUNCHER: wall time, the child's ru_maxrss, and the tree sums of RSS and RssAnon
    sampled every 20 ms (the launcher itself excluded)."""
    usage_file = log.with_suffix(".usage.json")
    usage_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(usage_file), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak_rss = peak_anon = 0
        while proc.poll() is None:
            pids = _tree(proc.pid)[1:]
            peak_rss = max(peak_rss, sum(_status_kb(p, "VmRSS") for p in pids))
            peak_anon = max(peak_anon, sum(_status_kb(p, "RssAnon") for p in pids))
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not usage_file.exists():
        return {"wall_s": wall, "rc": proc.returncode or 1}
    usage = json.loads(usage_file.read_text())
    return {"wall_s": wall, "rc": usage["rc"], "peak_rss_gb": usage["maxrss_kb"] * 1024 / 1e9,
            "peak_tree_rss_sampled_gb": peak_rss * 1024 / 1e9, "peak_anon_gb": peak_anon * 1024 / 1e9,
            "cpu_s": usage["cpu_s"]}


def compare(ours: Path, theirs: Path) -> dict:
    """Per-tensor agreement of two bf16/f32 outputs (jax on the host for the casts)."""
    import jax.numpy as jnp

    from configurable_fm.ops.merge.execute import PreadStore

    a, b = PreadStore(ours), PreadStore(theirs)
    if set(a) != set(b):
        return {"error": f"different tensors: only ours {sorted(set(a) - set(b))[:5]}, "
                         f"only mergekit {sorted(set(b) - set(a))[:5]}"}
    worst, equal, max_ulp, n_diff, n_total, dtypes = 0.0, 0, 0, 0, 0, set()
    worst_name = None
    for name in a:
        x, y = a[name], b[name]
        dtypes.add(f"{x.dtype}/{y.dtype}")
        if x.shape != y.shape:
            return {"error": f"{name}: shape {x.shape} (ours) vs {y.shape} (mergekit)"}
        xf, yf = jnp.asarray(x).astype(jnp.float32), jnp.asarray(y).astype(jnp.float32)
        d = float(jnp.max(jnp.abs(xf - yf))) if x.size else 0.0
        if d > worst:
            worst, worst_name = d, name
        ne = int(jnp.sum(xf != yf))
        n_diff += ne
        n_total += x.size
        equal += ne == 0 and x.dtype == y.dtype
        if x.dtype == y.dtype and x.itemsize == 2 and ne:
            # ulps between same-format floats: order-preserving integer images of the bit patterns
            xi = jnp.asarray(x.view(np.int16)).astype(jnp.int32)
            yi = jnp.asarray(y.view(np.int16)).astype(jnp.int32)
            xi = jnp.where(xi < 0, -32768 - xi, xi)
            yi = jnp.where(yi < 0, -32768 - yi, yi)
            max_ulp = max(max_ulp, int(jnp.max(jnp.abs(xi - yi))))
    return {"tensors": len(a), "bitwise_equal_tensors": equal, "max_abs_diff": worst, "worst_tensor": worst_name,
            "elements_differing": n_diff, "fraction_differing": n_diff / max(n_total, 1), "max_ulp": max_ulp,
            "dtypes": sorted(dtypes)}


def checkpoint_bytes(files) -> int:
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------------------------------- CPU mode
def bench_cpu(args, ckpt) -> list[dict]:
    work = Path(args.workdir)
    rows = []
    tools = args.tools.split(",")
    ours_cmd = args.ours_cmd.split() if args.ours_cmd else [sys.executable, str(ROOT / "scripts" / "merge.py")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for mi, method in enumerate(args.methods.split(",")):
        yml = write_yaml(work / f"{args.size}_{method}.yml", method, ckpt, args.dtype)
        files = input_files(ckpt, method)
        in_bytes = checkpoint_bytes(files)
        outs = {}
        for r in range(args.repeats):
            order = tools if (r + mi) % 2 == 0 else tools[::-1]
            for tool in order:
                out = work / "out" / f"{args.size}_{method}_{tool}"
                outs[tool] = out
                shutil.rmtree(out, ignore_errors=True)
                if tool == "ours":
                    cmd = ours_cmd + ["--mergekit_yaml", str(yml), "--output", str(out), "--overwrite",
                                      "--no_progress", "--compute_dtype", args.compute_dtype]
                elif tool == "mergekit":
                    cmd = [MERGEKIT, str(yml), str(out)]
                else:
                    raise SystemExit(f"unknown tool {tool!r} (ours, mergekit)")
                warm(files)
                load_before = os.getloadavg()[0]
                res = run_measured(cmd, work / f"{args.size}_{method}_{tool}_{r}.log",
                                   env=env if tool == "ours" else None)
                res["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after the run
                os.sync()
                if res["rc"] != 0:
                    tail = (work / f"{args.size}_{method}_{tool}_{r}.log").read_text()[-2000:]
                    raise SystemExit(f"{tool} {method} failed (rc {res['rc']}):\n{tail}")
                out_bytes = checkpoint_bytes(sorted(out.glob("*.safetensors")))
                res.update(method=method, tool=tool, repeat=r, size=args.size, input_bytes=in_bytes,
                           output_bytes=out_bytes, gb_per_s=(in_bytes + out_bytes) / res["wall_s"] / 1e9)
                print(json.dumps(res), flush=True)
                rows.append(res)
        if args.read_bandwidth != "none":
            from configurable_fm.ops.merge.execute import READ_WORKERS_ACCELERATOR

            bw = read_bandwidth(files, direct=args.read_bandwidth == "both",
                                threads=READ_WORKERS_ACCELERATOR if args.device == "gpu" else 1)
            bw.update(method=method)
            print(json.dumps(bw), flush=True)
            rows.append(bw)
        if {"ours", "mergekit"} <= set(outs):
            agree = compare(outs["ours"], outs["mergekit"])
            agree.update(method=method, kind="agreement")
            print(json.dumps(agree), flush=True)
            rows.append(agree)
        if not args.keep_outputs:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    return rows


def table_cpu(rows) -> str:
    runs = [r for r in rows if "wall_s" in r]
    cache_bw = {r["method"]: r["page_cache_gb_s"] for r in rows if r.get("kind") == "read_bandwidth"}
    parallel_bw = {r["method"]: (r["read_threads"], r["page_cache_parallel_gb_s"]) for r in rows
                   if r.get("kind") == "read_bandwidth" and "page_cache_parallel_gb_s" in r}
    lines = ["| method | tool | time (s) | peak RSS (GB) | peak anon (GB) | speedup | GB/s | of read bound | "
             "runs: s @ load |", "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in runs:
        by.setdefault((r["method"], r["tool"]), []).append(r)
    for (method, tool), rs in by.items():
        t = statistics.median(r["wall_s"] for r in rs)
        mk = by.get((method, "mergekit"))
        speed = statistics.median(r["wall_s"] for r in mk) / t if mk else float("nan")
        each = ", ".join(f"{r['wall_s']:.1f} @ {r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f}" for r in rs
                         if "load_1min" in r)
        bound = (f"{100 * rs[0]['input_bytes'] / t / 1e9 / cache_bw[method]:.0f}% of {cache_bw[method]:.1f} GB/s"
                 if method in cache_bw else "")
        if method in parallel_bw:
            threads, bw = parallel_bw[method]
            bound += f" ({100 * rs[0]['input_bytes'] / t / 1e9 / bw:.0f}% of {bw:.1f} GB/s, {threads} threads)"
        lines.append(f"| {method} | {tool} | {t:.1f} | {max(r['peak_rss_gb'] for r in rs):.2f} | "
                     f"{max(r['peak_anon_gb'] for r in rs):.2f} | {speed:.2f}x | "
                     f"{statistics.median(r['gb_per_s'] for r in rs):.2f} | {bound} | {each} |")
    agree = [r for r in rows if r.get("kind") == "agreement"]
    if agree:
        lines += ["", "| method | tensors | bitwise equal | max abs diff | max bf16 ulps | elements differing |",
                  "|---|---|---|---|---|---|"]
        for a in agree:
            if "error" in a:
                lines.append(f"| {a['method']} | error: {a['error']} | | | | |")
                continue
            lines.append(f"| {a['method']} | {a['tensors']} | {a['bitwise_equal_tensors']} | {a['max_abs_diff']:.3g}"
                         f" | {a['max_ulp']} | {a['fraction_differing']:.2e} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- GPU mode
def hbm_bound(device_kind: str):
    for k, v in HBM_BYTES_PER_S.items():
        if k in device_kind:
            return v
    return None


def bench_kernels(args) -> list[dict]:
    """Kernel-only: all tensors of the model on the device, the fused kernel over every one, timed."""
    import jax
    import jax.numpy as jnp

    from configurable_fm.ops.merge import params as P
    from configurable_fm.ops.merge.execute import KernelCache, merge_stacked, traced_parameters
    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
    from configurable_fm.ops.merge.precision import resolve
    from configurable_fm.ops.merge.registry import get_method

    dev = jax.devices()[0]
    bound = hbm_bound(dev.device_kind)
    specs = llama_specs(SIZES[args.size])
    tensors = {m: [jax.device_put(random_tensor(n, s, i), dev) for n, s in specs] for i, m in enumerate(MODELS)}
    jax.block_until_ready(tensors)
    names = [n for n, _ in specs]
    rows = []
    for method in args.methods.split(","):
        plan = load_mergekit_yaml(Path(args.workdir) / f"{args.size}_{method}.yml")
        m = get_method(method)
        merged = merged_models(method)
        cache = KernelCache()
        depth = P.num_layers_of(names)
        load = None if plan.dtype is None else np.dtype(jnp.dtype(plan.dtype))
        out_dtype = np.dtype(jnp.bfloat16) if plan.out_dtype in (None, "bfloat16") else np.dtype(plan.out_dtype)
        compute = resolve(args.compute_dtype, load, [np.dtype(jnp.bfloat16)])
        calls = []
        for j, name in enumerate(names):
            kw = P.resolve_for_tensor(m, name, parameters=plan.parameters, model_parameters=list(plan.model_parameters),
                                      model_names=plan.model_names, num_layers=depth)
            fn = cache.get(m, kw, load, out_dtype, compute)
            b = None if plan.base is None else tensors["base"][j]
            calls.append((fn, b, tuple(tensors[x][j] for x in merged)))
        jax.block_until_ready([fn(b, xs, None) for fn, b, xs in calls])  # compile
        times = []
        for _ in range(args.kernel_iters):
            t0 = time.perf_counter()
            jax.block_until_ready([fn(b, xs, None) for fn, b, xs in calls])
            times.append(time.perf_counter() - t0)
        t = min(times)
        n_in = len(merged) + (plan.base is not None)
        moved = sum((n_in * 2 + out_dtype.itemsize) * int(np.prod(s)) for _, s in specs)
        row = {"kind": "kernel", "method": method, "compute_dtype": compute or "float32", "device": dev.device_kind,
               "seconds": t, "bytes_moved": moved,
               "tb_per_s": moved / t / 1e12, "hbm_bound_tb_per_s": None if bound is None else bound / 1e12,
               "fraction_of_bound": None if bound is None else moved / t / bound, "kernels_compiled": len(cache)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        # Batched: the tensors of one shape and one set of baked parameters (a layer's q/k/v/o/MLP weights over
        # all layers; traced ones, e.g. slerp's t, may differ) stacked once, as a reader would deliver them, and
        # merged by one merge_stacked call each.
        groups: dict = {}
        for j, name in enumerate(names):
            kw = P.resolve_for_tensor(m, name, parameters=plan.parameters,
                                      model_parameters=list(plan.model_parameters),
                                      model_names=plan.model_names, num_layers=depth)
            traced = traced_parameters(m, kw)
            scalars = {k: v for k, v in kw.items() if k not in traced}
            groups.setdefault((specs[j][1], repr(sorted(scalars.items()))), []).append((j, name, kw))
        batches = []
        for members in groups.values():
            idx = [j for j, _, _ in members]
            stack = lambda who: jnp.stack([tensors[who][j] for j in idx])
            batches.append(([n for _, n, _ in members], [kw for _, _, kw in members],
                            None if plan.base is None else stack("base"), [stack(x) for x in merged]))
        jax.block_until_ready([b[2:] for b in batches])
        bcache = KernelCache()
        run = lambda: [merge_stacked(m, base, xs, kws, out_dtype=out_dtype, load_dtype=load, names=ns,
                                     cache=bcache, compute_dtype=compute) for ns, kws, base, xs in batches]
        jax.block_until_ready(run())  # compile
        times = []
        for _ in range(args.kernel_iters):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        t = min(times)
        row = dict(row, kind="kernel_batched", seconds=t, tb_per_s=moved / t / 1e12, calls=len(batches),
                   fraction_of_bound=None if bound is None else moved / t / bound, kernels_compiled=len(bcache))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del batches
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="cached inputs, YAMLs, outputs and logs (outside the repo)")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--methods", default="linear,task_arithmetic,ties")
    p.add_argument("--tools", default="ours,mergekit")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "none"), default="float32",
                   help="the YAML's dtype (load/compute dtype; out_dtype bfloat16), or none for neither")
    p.add_argument("--compute_dtype", choices=("mergekit", "float32"), default="mergekit",
                   help="our merge arithmetic (scripts/merge.py --compute_dtype)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--kernel_iters", type=int, default=5)
    p.add_argument("--kernels_only", action="store_true",
                   help="--device gpu: only the kernel-only rows (no checkpoints written, no end-to-end merges)")
    p.add_argument("--ours_cmd", default="", help="replace 'python scripts/merge.py' (e.g. a patched launcher)")
    p.add_argument("--keep_outputs", action="store_true")
    p.add_argument("--read_bandwidth", choices=("cache", "both", "none"), default="both",
                   help="measure the inputs' read bandwidth after each method's runs: from the page cache, "
                        "and (both) from the device with O_DIRECT")
    p.add_argument("--out", default="", help="results JSON (default WORKDIR/results_<size>_<device>.json)")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    if args.kernels_only:  # the YAMLs alone (their parameters); the kernels read random tensors, not files
        ckpt = {m: work / args.size / m for m in MODELS}
        for m in MODELS:  # a config.json makes each a valid model reference for the YAML parser
            ckpt[m].mkdir(parents=True, exist_ok=True)
            (ckpt[m] / "config.json").write_text(json.dumps({"model_type": "llama", **SIZES[args.size]}))
        for method in args.methods.split(","):
            write_yaml(work / f"{args.size}_{method}.yml", method, ckpt, args.dtype)
        rows = []
    else:
        ckpt = make_checkpoints(work, args.size)
        if args.device == "gpu":
            args.tools = "ours"
        rows = bench_cpu(args, ckpt)
    if args.device == "gpu" or args.kernels_only:
        rows += bench_kernels(args)
    import jax

    meta = {"size": args.size, "device": args.device, "jax_device": jax.devices()[0].device_kind,
            "cpus": os.cpu_count(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "dtype": args.dtype, "compute_dtype": args.compute_dtype,
            "params": int(sum(np.prod(s) for _, s in llama_specs(SIZES[args.size])))}
    out = Path(args.out or work / f"results_{args.size}_{args.device}.json")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(json.dumps(meta))
    print(table_cpu(rows))
    for r in rows:
        if r.get("kind") in ("kernel", "kernel_batched"):
            frac = "n/a" if r["fraction_of_bound"] is None else f"{100 * r['fraction_of_bound']:.0f}%"
            print(f"{r['kind']} {r['method']} ({r['compute_dtype']}): {r['bytes_moved'] / 1e9:.1f} GB in "
                  f"{r['seconds'] * 1e3:.1f} ms = {r['tb_per_s']:.2f} TB/s ({frac} of {r['hbm_bound_tb_per_s']} TB/s, "
                  f"{r['device']})")


if __name__ == "__main__":
    main()
