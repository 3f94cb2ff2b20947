"""Training throughput and model-FLOPs utilisation (MFU) of the trainer's own train step.

    python scripts/bench_train.py --variant 1b --seq_len 2048 --grid "4:none,8:dots,16:full" --steps 10
    python scripts/bench_train.py --variant 7b --seq_len 4096 --grid "8:full" --mesh 1,8,1     # FSDP over 8 GPUs
    python scripts/bench_train.py --variant 7b --seq_len 4096 --grid "8:full" --mesh 1,4,2     # FSDP 4 x tensor 2
    python scripts/bench_train.py --variant 1b --grid "8:dots" --scan_layers                     # layers as one scan
    python scripts/bench_train.py --variant 1b --grid "8:dots,8:dots:xla" --compile_only [--scan_layers]
    python scripts/bench_train.py --variant 1b --grid "8:none" --profile /tmp/prof   # + where the step's time goes
    python scripts/bench_train.py --variant 1b --grid "32:none" --accum 4            # 4 micro-batches of 8 per step
    python scripts/bench_train.py --variant 1b --grid "8:none" --fuse_projections 0,1  # q/k/v, gate/up fused or not
    python scripts/bench_train.py --variant 1b --grid "8:none" --anchor ../shared/anchors/torch_train.py  # + torch

For each `batch:remat` entry of the grid: build the pretrain variant's llama (bf16 compute, fp32 master weights,
AdamW), jit the trainer's step (`make_train_step`, donated state) on random tokens, run `--warmup` steps, then
time `--steps` steps (block_until_ready). Reports tokens/s and MFU = tokens/s x FLOPs/token / (devices x peak),
FLOPs/token from configurable_fm.train.flops (training = 3 x forward; attention counted PaLM-style over the
full T x T score matrix, and also with exact causal halving, the stricter figure). One JSON line per entry is
printed and appended to --out.

--mesh data,fsdp,tensor (default 1,1,1: one device) shards the step as the trainer does: parameters and optimizer
state by the logical-axis rules of configurable_fm/sharding.py, the batch over data x fsdp; the grid's batch is
the global batch (weak scaling: grow it with the device count). Then MFU counts every device of the mesh and
`peak_memory_gb` is the largest peak allocation over them (device.memory_stats(); None on the CPU). Several GPUs
of one host run from one process; for one process per GPU start it under jax.distributed (README, multi-host).

--accum A splits each step's batch into A micro-batches (the trainer's gradient accumulation: one optimizer update
per A forward/backward passes, which amortises the update's fixed cost; the grid's batch is the whole step's).

--scan_layers runs the decoder layers as one jax.lax.scan (models/llama.py; same parameters and results).
--fuse_projections 0,1 runs every entry without and with `models.layers.fuse_projections()` around the step (llama's
q/k/v and gate/up as one matmul each, as MaxText's fused_qkv / fused_mlp; the trainer does not fuse them today): an
A/B of larger GEMMs against the concatenation and split they cost.
--anchor SCRIPT runs the PyTorch anchor (../shared/anchors/torch_train.py: transformers + torch.compile, its own
TinyLlama-shaped model, batch --anchor_batch) as a subprocess after our rows, in the same run, and adds a row
{"anchor", "tokens_per_s", "mfu", "line"} parsed from its printed line, and `mfu_over_anchor` (our best MFU over
the anchor's; the models differ, so MFU is the comparable figure) in a final {"summary": ...} row.
`compile_s` is the first step's wall time (trace + compile + one step). --compile_only builds nothing: it traces and
lowers the step on abstract parameters and optimizer state (`lower_s`) and compiles it (`compile_s`, XLA only),
then reports those two times (and the process CPU times, `*_cpu_s`, steadier on a shared machine) and runs no
step; it works for any variant on any machine (e.g. the CPU). --profile DIR traces 3 more steps per entry with
jax.profiler and adds `profile` to its row: device kernels per step, device time by category (matmul, attention,
fusions, copies) and the top kernels (configurable_fm.profiling). Every row records the XLA_FLAGS it ran under
(`xla_flags`), e.g. the GPU autotuner's share of the compile time:
    XLA_FLAGS=--xla_gpu_autotune_level=0 python scripts/bench_train.py --grid 8:dots --scan_layers --compile_only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configurable_fm.models.attention as attn
import configurable_fm.sharding as shd
from configurable_fm.bricks.paths import flat_params, flat_state
from configurable_fm.models.factory import build_model
from configurable_fm.models.layers import fuse_projections
from configurable_fm.profiling import trace_kernels
from configurable_fm.train import flops
from configurable_fm.train.optim import make_optimizer
from configurable_fm.train.trainer import ModelParts, make_train_step, on_mesh
from experiments.pretrain import get_config

AUTO_ATTENTION = attn.dot_product_attention
PROFILE_STEPS = 3  # steps traced per entry with --profile


def bench_one(variant: str, seq_len: int, batch: int, remat: str, steps: int, warmup: int, attention: str,
              mesh_shape: tuple = (1, 1, 1), scan_layers: bool = False, compile_only: bool = False,
              profile: str = "", accum: int = 1, fuse: bool = False):
    if accum < 1 or batch % accum:
        raise ValueError(f"--accum {accum}: the batch ({batch}) must split into that many equal micro-batches")
    cfg = get_config(variant)
    model_spec = cfg.model.to_dict()
    model_spec["max_position_embeddings"] = max(seq_len, model_spec["max_position_embeddings"])
    make = lambda: build_model(model_spec, seed=0, param_dtype=jnp.float32, dtype=jnp.bfloat16, remat=remat,
                               scan_layers=scan_layers)
    model = nnx.eval_shape(make) if compile_only else make()
    # 'auto' lets the model choose (cuDNN on GPU in bf16); 'xla' / 'cudnn' force one implementation.
    attn.dot_product_attention = AUTO_ATTENTION if attention == "auto" else (
        lambda *a, **k: AUTO_ATTENTION(*a, **{**k, "implementation": attention}))
    parts = ModelParts.of(model)
    mesh = shd.make_mesh(mesh_shape)
    shardings = flat_state(shd.param_shardings(model, mesh), nnx.Variable)
    if compile_only:
        params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k].get_value())
                  for k, v in flat_params(model).items()}
    else:
        params = {k: jax.device_put(v, shardings[k].get_value()) for k, v in flat_params(model).items()}
    del model
    tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    opt_state = jax.eval_shape(tx.init, params) if compile_only else on_mesh(jax.jit(tx.init)(params), mesh)[0]
    train_step = make_train_step(parts, tx, accum)

    def fused_step(*args):  # the context is read while the step is traced: it is part of this jit's program
        with fuse_projections(fuse):
            return train_step(*args)

    step = jax.jit(fused_step, donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, model_spec["vocab_size"], (batch, seq_len + 1), dtype=np.int32)
    batch_arrays = shd.global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, mesh)
    if compile_only:
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = step.lower(params, opt_state, {}, batch_arrays)
        t1, c1 = time.perf_counter(), time.process_time()
        lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
        return {"variant": variant, "params": sum(int(np.prod(v.shape)) for v in params.values()),
                "seq_len": seq_len, "batch": batch, "remat": remat, "attention": attention,
                "scan_layers": scan_layers, "accum": accum, "fuse_projections": fuse, "lower_s": t1 - t0,
                "compile_s": t2 - t1, "lower_cpu_s": c1 - c0, "compile_cpu_s": c2 - c1,
                "device": jax.devices()[0].device_kind, "devices": len(list(mesh.devices.flat)),
                "mesh": list(mesh_shape), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, {}, batch_arrays)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        params, opt_state, metrics = step(params, opt_state, {}, batch_arrays)
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state, {}, batch_arrays)
    jax.block_until_ready((params, metrics))
    dt = (time.perf_counter() - t0) / steps
    trace = None
    if profile:
        def traced_steps():
            nonlocal params, opt_state, metrics
            for _ in range(PROFILE_STEPS):
                params, opt_state, metrics = step(params, opt_state, {}, batch_arrays)
            jax.block_until_ready((params, metrics))

        name = f"{variant}_b{batch}_{remat}_{attention}" + "_fused" * fuse
        trace = trace_kernels(traced_steps, os.path.join(profile, name), steps=PROFILE_STEPS)
    from configurable_fm.models.factory import config_from_dict

    mcfg = config_from_dict(model_spec)
    tps = batch * seq_len / dt
    peak = flops.peak_flops_per_device()
    devices = list(mesh.devices.flat)
    stats = [d.memory_stats() or {} for d in devices]
    peak_mem = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) / 1e9 or None
    full = flops.flops_per_token(mcfg, seq_len)
    causal = flops.flops_per_token(mcfg, seq_len, causal_halving=True)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    return {
        "variant": variant, "params": n_params, "seq_len": seq_len, "batch": batch, "remat": remat,
        "attention": attention, "scan_layers": scan_layers, "accum": accum, "fuse_projections": fuse, "step_s": dt,
        "tokens_per_s": tps, "compile_s": compile_s,
        "loss": float(metrics["loss"]), "tflops_per_s": tps * full / 1e12,
        "mfu": flops.mfu(tps, full, len(devices), peak),
        "mfu_causal": flops.mfu(tps, causal, len(devices), peak),
        "device": jax.devices()[0].device_kind, "devices": len(devices), "mesh": list(mesh_shape),
        "tokens_per_s_per_device": tps / len(devices), "peak_memory_gb": peak_mem, "jax": jax.__version__,
        "peak_flops": peak, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **({"profile": trace} if trace is not None else {}),
    }


ANCHOR_LINE = re.compile(r"([\d,]+) tokens/s, MFU ([\d.]+)%")


def run_anchor(script: str, batch: int, compile_: bool) -> dict:
    """The anchor's row: `python SCRIPT BATCH [compile]` as a subprocess; its 'N tokens/s, MFU M%' line parsed
    (tokens_per_s, mfu as a fraction); `line` holds that line, or the end of its stderr when it printed none."""
    cmd = [sys.executable, script, str(batch)] + (["compile"] if compile_ else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ANCHOR_LINE.search(ln)), "")
    row = {"anchor": os.path.basename(script), "batch": batch, "compile": compile_, "returncode": proc.returncode,
           "line": line or proc.stderr[-400:]}
    m = ANCHOR_LINE.search(line)
    if m:
        row.update(tokens_per_s=float(m.group(1).replace(",", "")), mfu=float(m.group(2)) / 100)
    return row


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="1b")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--grid", default="8:dots", help="comma-separated batch:remat[:attention] entries")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor mesh sizes (one may be -1: the rest)")
    p.add_argument("--out", default="")
    p.add_argument("--scan_layers", action="store_true", help="run the decoder layers as one jax.lax.scan")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--profile", default="", help="a log directory: trace 3 more steps per entry and add a summary "
                   "of the device kernels (configurable_fm.profiling: top kernels, time by category)")
    p.add_argument("--compile_only", action="store_true",
                   help="only trace, lower and compile the step on abstract inputs; report lower_s and compile_s")
    p.add_argument("--fuse_projections", default="0",
                   help="comma-separated 0/1: run each entry without (0) and/or with (1) fused q/k/v and gate/up")
    p.add_argument("--anchor", default="", help="the PyTorch anchor script (../shared/anchors/torch_train.py), "
                   "run after our rows in the same run")
    p.add_argument("--anchor_batch", type=int, default=8)
    p.add_argument("--anchor_compile", type=int, default=1, help="1: the anchor with torch.compile, 0: eager")
    args = p.parse_args(argv)
    if args.anchor and not os.path.isfile(args.anchor):
        p.error(f"--anchor: no file {args.anchor!r}")
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    fuses = args.fuse_projections.split(",")
    if not fuses or any(f not in ("0", "1") for f in fuses):
        p.error(f"--fuse_projections takes 0, 1 or 0,1; got {args.fuse_projections!r}")
    mfus = []
    for entry in args.grid.split(","):
        fields = entry.split(":")
        batch, remat = int(fields[0]), fields[1]
        attention = fields[2] if len(fields) > 2 else "auto"
        for fuse in (f == "1" for f in fuses):
            try:
                row = bench_one(args.variant, args.seq_len, batch, remat, args.steps, args.warmup, attention,
                                mesh_shape, scan_layers=args.scan_layers, compile_only=args.compile_only,
                                profile=args.profile, accum=args.accum, fuse=fuse)
            except Exception as e:  # e.g. out of memory for one grid point: record it and go on
                row = {"variant": args.variant, "batch": batch, "remat": remat, "attention": attention,
                       "scan_layers": args.scan_layers, "accum": args.accum, "fuse_projections": fuse,
                       "error": f"{type(e).__name__}: {str(e)[:300]}"}
            emit(row, args.out)
            mfus.append(row.get("mfu"))
    if args.anchor:
        anchor = run_anchor(args.anchor, args.anchor_batch, bool(args.anchor_compile))
        emit(anchor, args.out)
        ours = max((m for m in mfus if m is not None), default=None)
        ratio = ours / anchor["mfu"] if ours is not None and anchor.get("mfu") else None
        emit({"summary": "bench_train", "best_mfu": ours, "anchor_mfu": anchor.get("mfu"), "mfu_over_anchor": ratio},
             args.out)


def emit(row: dict, out: str) -> None:
    """Prints the row as one JSON line and appends it to `out` (when given)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
