"""Decode speed of `models.generation.generate` against transformers' `generate`, in the same run.

    python scripts/bench_generate.py --shape 135m,1b --batch 1,64                     # ours only
    python scripts/bench_generate.py --shape 135m --batch 1 --profile /tmp/prof        # + a kernel summary
    python scripts/bench_generate.py --shape 135m,1b --batch 1,64 \\
        --anchor ../shared/anchors/hf_generate.py --anchor_modes default,static      # + transformers, same run

The workload is the PyTorch anchor's (`../shared/anchors/hf_generate.py`): a llama of the given shape with random
bf16 weights, a 64-token random prompt, 256 new tokens, greedy, no early stop. Tokens/s counts new tokens x batch
over the wall time of one whole call (median of --repeats after a warm-up call), as the anchor does.
--sampling greedy,sample adds rows that sample (temperature 0.8, top-k 50, top-p 0.95: the per-step cost of
the logits warpers, issue 14's "sampling costs nothing measurable"). --stream 0,16 adds rows that time
`Generator.stream` with chunks of 16 tokens (the host reading each chunk as it is made) beside the one-program call.
--cache_window 0,128 times `Generator(cache_window=...)`: 0 reads the whole cache every step, 128 runs the decode loop
over the cache windows T + 128, T + 256, ... (each step reads the slots below its window's end).
--one_token 0,1 runs each shape and batch without and with `Generator(model, one_token=True)` (the default, 1)
(models/one_token.py: split-K Pallas kernels, on a GPU, for the one-row products that XLA would run as reduction
kernels), in that order, in one run; an item FIELD=VALUE[/FIELD=VALUE] runs it with those `OneTokenMatmuls`
fields (e.g. `min_elements=262144/out=32`; `layers=0`: the products alone, without models/one_token_layer.py).

Besides the whole call, each row reports the decode step alone, `step_ms = (t(N new) - t(1 new)) / (N - 1)`,
and its memory bound: each step must read every weight once and, per layer, the keys and values of the slots
attention reads (the whole cache: T + N slots), `bound_ms = bytes / bandwidth`, with the bandwidth of a
device-to-device copy measured in the same run (`hbm_gb_s`). `x_bound = step_ms / bound_ms` is how far a step is from that bound.

--profile DIR traces one whole call with jax.profiler and prints the device kernels of the decode loop: kernels
per step, their total time against the step's wall time (the rest is launch gaps), and the top kernels.
The anchor runs as a subprocess per (mode, shape, batch) after our rows; its printed line is parsed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configurable_fm.models.attention as attn
from configurable_fm.models.factory import build_model
from configurable_fm.models.generation import Generator
from configurable_fm.models.one_token import OneTokenMatmuls
from configurable_fm.profiling import trace_kernels
from experiments.shapes import SHAPES as BENCH_SHAPES

ATTENTION = ["auto"]
SHAPES = {  # the anchor's shapes (experiments/shapes.py) and a CPU one
    **BENCH_SHAPES,
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, rope_theta=1e4),
}


def copy_bandwidth_gb_s(n_bytes: int = 2 << 30) -> float:
    """Device memory bandwidth of y = x + 1 on an n_bytes bf16 array (reads and writes it once): GB/s."""
    x = jnp.zeros((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / min(times) / 1e9


def build(shape: str):
    spec = dict(SHAPES[shape], family="llama", tie_word_embeddings=True, max_position_embeddings=2048)
    return build_model(spec, seed=0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)


def timed(fn, repeats: int) -> float:
    np.asarray(fn())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


SAMPLING = {  # --sampling modes: generate() keyword arguments (sample: transformers' usual sampling settings)
    "greedy": {},
    "sample": dict(temperature=0.8, top_k=50, top_p=0.95, rng=jax.random.key(0)),
}


def bench_one(shape: str, batch: int, prompt: int, new: int, repeats: int, hbm_gb_s: float,
              sampling: str = "greedy", one_token: bool | OneTokenMatmuls = False, stream: int = 0,
              cache_window: int = 512) -> dict:
    model = build(shape)
    cfg = model.cfg
    gen = Generator(model, one_token=one_token, cache_window=cache_window)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt), dtype=np.int32)
    kw = SAMPLING[sampling]
    if stream:  # Generator.stream: every chunk of `stream` tokens read by the host as it is made
        call = lambda n: np.concatenate(list(gen.stream(ids, max_new_tokens=n, chunk=stream, **kw)), axis=1)
    else:
        call = lambda n: gen(ids, max_new_tokens=n, **kw)
    t_full = timed(lambda: call(new), repeats)
    t_one = timed(lambda: call(1), repeats)
    step_s = (t_full - t_one) / (new - 1)
    weight_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model)))
    slots = prompt + new
    kv_bytes = cfg.num_layers * 2 * batch * slots * cfg.num_kv_heads * cfg.dim_per_head * 2
    bound_s = (weight_bytes + kv_bytes) / (hbm_gb_s * 1e9)
    return {"shape": shape, "batch": batch, "prompt": prompt, "new_tokens": new,
            "tokens_per_s": new * batch / t_full, "call_s": t_full, "prefill_plus_one_s": t_one,
            "step_ms": step_s * 1e3, "bound_ms": bound_s * 1e3, "x_bound": step_s / bound_s,
            "weight_gb": weight_bytes / 1e9,
            "kv_gb": kv_bytes / 1e9, "hbm_gb_s": hbm_gb_s, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "attention": ATTENTION[0], "sampling": sampling,
            "one_token": option_record(one_token), "stream": stream, "cache_window": cache_window,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def traced_call(gen: Generator, ids, new: int, logdir: str, top: int = 25) -> dict:
    """The device kernels per decode step of one `gen(ids, max_new_tokens=new)` call traced into logdir
    (configurable_fm.profiling.trace_kernels), compiled before the trace."""
    np.asarray(gen(ids, max_new_tokens=new))
    return trace_kernels(lambda: np.asarray(gen(ids, max_new_tokens=new)), logdir, steps=new, top=top)


def profile(shape: str, batch: int, prompt: int, new: int, logdir: str,
            one_token: bool | OneTokenMatmuls = False) -> dict:
    """Traces one generate call; summarises the device kernels per decode step (configurable_fm.profiling)."""
    model = build(shape)
    gen = Generator(model, one_token=one_token)
    ids = np.random.default_rng(0).integers(3, model.cfg.vocab_size, (batch, prompt), dtype=np.int32)
    summary = traced_call(gen, ids, new, logdir)
    return {"shape": shape, "batch": batch, "new_tokens": new, "one_token": option_record(one_token), **summary}


def one_token_option(item: str) -> bool | OneTokenMatmuls:
    """'0' -> False, '1' -> True, 'FIELD=VALUE[/FIELD=VALUE]' -> OneTokenMatmuls with those (integer) fields."""
    if item in ("0", "1"):
        return item == "1"
    fields = {}
    for part in item.split("/"):
        key, _, value = part.partition("=")
        if key not in OneTokenMatmuls._fields or key == "interpret" or not value.isdigit():
            raise ValueError(f"{part!r}: expected 0, 1 or FIELD=INTEGER with FIELD one of "
                             f"{[f for f in OneTokenMatmuls._fields if f != 'interpret']}")
        fields[key] = int(value)
    return OneTokenMatmuls(**fields)


def option_record(one_token: bool | OneTokenMatmuls):
    """A row's one_token value: the bool, or the options' non-default fields."""
    if isinstance(one_token, OneTokenMatmuls):
        return {k: v for k, v in one_token._asdict().items() if v != OneTokenMatmuls._field_defaults[k]}
    return one_token


def run_anchor(script: str, mode: str, shape: str, batch: int) -> dict:
    cmd = [sys.executable, script, shape, str(batch)] + (["static"] if mode == "static" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if "tokens/s" in ln), "")
    m = re.search(r"([\d,]+) tokens/s, ([\d.]+) ms/step", line)
    row = {"anchor": mode, "shape": shape, "batch": batch, "line": line or proc.stderr[-400:]}
    if m:
        row.update(tokens_per_s=float(m.group(1).replace(",", "")), step_ms=float(m.group(2)))
    return row


def counts(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A flag's comma-separated ints >= 0, or a usage error naming it."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        p.error(f"{flag}: expected comma-separated ints >= 0, got {text!r}")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="135m", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--batch", default="1,64")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", default="", help="a log directory: trace one call per shape/batch")
    p.add_argument("--anchor", default="", help="path of the transformers anchor script (hf_generate.py)")
    p.add_argument("--anchor_modes", default="default,static")
    p.add_argument("--attention", default="auto", help="auto (the model's choice), xla or cudnn")
    p.add_argument("--sampling", default="greedy", help="comma-separated: " + ",".join(SAMPLING) +
                   " (sample: temperature 0.8, top_k 50, top_p 0.95)")
    p.add_argument("--one_token", default="1", help="comma-separated 0/1: Generator(one_token=...), models/"
                   "one_token.py's kernels for one-row products (1,0: both, the A/B in one run); or "
                   "FIELD=VALUE[/FIELD=VALUE]: OneTokenMatmuls fields")
    p.add_argument("--stream", default="0", help="comma-separated chunk sizes: rows timing Generator.stream with "
                   "that chunk (0: the one-program call)")
    p.add_argument("--cache_window", default="512", help="comma-separated Generator(cache_window=...) values: the "
                   "decode loop's first cache window in new tokens, doubling (0: every step reads the whole cache)")
    p.add_argument("--out", default="")
    args = p.parse_args()
    try:
        one_token = [one_token_option(item) for item in args.one_token.split(",")]
    except ValueError as e:
        p.error(f"--one_token: {e}")
    streams = counts(p, "--stream", args.stream)
    windows = counts(p, "--cache_window", args.cache_window)
    unknown = sorted(set(args.sampling.split(",")) - set(SAMPLING))
    if unknown:
        p.error(f"--sampling: unknown mode(s) {unknown}; choose from {sorted(SAMPLING)}")
    ATTENTION[0] = args.attention
    if args.attention != "auto":
        auto = attn.dot_product_attention
        attn.dot_product_attention = lambda *a, **k: auto(*a, **{**k, "implementation": args.attention})
    hbm = copy_bandwidth_gb_s() if jax.default_backend() != "cpu" else copy_bandwidth_gb_s(64 << 20)

    def emit(row):
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    shapes, batches = args.shape.split(","), [int(b) for b in args.batch.split(",")]
    for shape in shapes:
        for batch in batches:
            for i, kernels in enumerate(one_token):
                for sampling in args.sampling.split(","):
                    for stream in streams:
                        for window in windows:
                            emit(bench_one(shape, batch, args.prompt, args.new, args.repeats, hbm, sampling, kernels,
                                           stream, window))
                if args.profile:
                    emit(profile(shape, batch, args.prompt, min(args.new, 32),
                                 os.path.join(args.profile, f"{shape}_b{batch}_t{i}"), kernels))
    if args.anchor:
        for mode in args.anchor_modes.split(","):
            for shape in shapes:
                for batch in batches:
                    emit(run_anchor(args.anchor, mode, shape, batch))


if __name__ == "__main__":
    main()
