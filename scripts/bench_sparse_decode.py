"""Batch-1 decode speed of a dense llama against its MoEfied copy computing only the chosen experts, in one run
(issue 13: a measured speed-up of at least 1.3x on a ~1B model with a sparse FFN kernel, the dense model the baseline).

    python scripts/bench_sparse_decode.py                                        # 1b, E = 16, top_k 4 and 8 (GPU)
    python scripts/bench_sparse_decode.py --shape 1b --top_k 4,8 --masked --out results/sparse_decode.jsonl
    python scripts/bench_sparse_decode.py --shape 1b --top_k 4 --modes pallas --pallas neurons=16,out=16,num_warps=2
    python scripts/bench_sparse_decode.py --top_k 4,2 --modes pallas --pallas "decode=0;matvec=1;token_width=256" \
        --profile /tmp/prof     # the general kernels against the one-token ones, two tile sets, kernels per step
    python scripts/bench_sparse_decode.py --shape tiny --new_tokens 8 --repeats 1   # CPU smoke run (Pallas interpreted)

The workload is scripts/bench_generate.py's: a llama of --shape ('1b', the default: experiments/pretrain.py's 1b,
width 2048, 16 layers, 32/8 heads, FFN 8192, vocab 49152, tied embeddings; '135m': SmolLM2-135M's shape; 'small'
(4 x 256, FFN 1024) and 'tiny' (2 x 64, FFN 256) for CPU smoke runs) with random
bf16 weights, a 64-token random prompt, --new_tokens new tokens, greedy, timed with `models.generation.Generator`
(median of --repeats calls after a warm-up). The MoEfied model is `moefy(dense, num_experts=E, num_experts_per_tok=k,
split='random', router='centroid')` (data-free: the speed does not depend on the quality of the split), run with
`with_dispatch(moe, mode)` for each mode of --modes ('gather', 'pallas'; --masked adds the masked forward, slower
than dense: it computes every expert). --pallas takes one or more ';'-separated sets of dispatch.PallasOptions
fields ('decode=0' the general kernels for one token, 'matvec=0' the one-token kernels with Triton dots, tile
bounds such as 'neurons=16' (general kernels) or 'token_neurons=32' (one-token kernels)); with several sets each
is a row 'moefied+pallas[SET]'. --profile DIR traces one call of min(32, --new_tokens) tokens per row
(configurable_fm.profiling) and adds the device kernels per decode step. --one_token 1 (the default)
runs every row (the dense one too) with `Generator(model, one_token=True)` (models/one_token.py: the attention
projections' one-row products as split-K kernels), 0 without.

Each row (one JSON line; --out FILE appends them; a table at the end):
    tokens_per_s   new tokens x batch / the wall time of one whole call
    step_ms        one decode step, (t(N new) - t(1 new)) / (N - 1) (the prompt's prefill cancels)
    speedup        dense step_ms / this row's step_ms    (speedup_call: the same for tokens_per_s)
    ffn_read       the fraction of the FFN weights a decode step must read: min(E, S + batch k) / E for the
                   dispatching modes, 1 for dense and masked
    bound_speedup  the memory-bound speed-up: dense bytes / this row's bytes per step, bytes = the parameters read
                   (all but the unread experts; the router included) + the KV cache (prompt + new slots)
    bound_ms, x_bound   bytes / the copy bandwidth measured in the same run (bench_generate's), step_ms / bound_ms
    ffn_rel_err    (dispatching rows) max |y - y_masked| / max |y_masked| of layer 0's FFN on a random bf16 token
    tokens_as_masked   (dispatching rows) the fraction of new tokens equal to the masked model's greedy ones (bf16
                   rounding differs between the paths, so a near-tie may flip a token and the rest of the text)
    profile        (--profile) events_per_step, busy_ms_per_step, wall_ms_per_step, categories and the top kernels
Bad options are one-line usage errors.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_generate import copy_bandwidth_gb_s, timed, traced_call  # noqa: E402
from configurable_fm.analysis.moefication import PallasOptions, moefy, with_dispatch  # noqa: E402
from configurable_fm.bricks.paths import flat_params  # noqa: E402
from configurable_fm.models.factory import build_model  # noqa: E402
from configurable_fm.models.generation import Generator  # noqa: E402
from experiments.shapes import SHAPES as BENCH_SHAPES  # noqa: E402

SHAPES = {  # the anchors' shapes and two small ones for CPU smoke runs
    **BENCH_SHAPES,
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 rope_theta=1e4),
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                  num_kv_heads=2, rope_theta=1e4),
}
MODES = ("gather", "pallas")
INT_OPTIONS = [f for f in PallasOptions._fields if f != "interpret"]


class Parser(argparse.ArgumentParser):
    """Usage errors on one line (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def numbers(text: str) -> list[int]:
    """An argparse type: a comma-separated list of ints ('4,8')."""
    try:
        out = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None
    if not out:
        raise argparse.ArgumentTypeError("an empty list")
    return out


def modes(text: str) -> list[str]:
    out = [t for t in text.split(",") if t]
    bad = [t for t in out if t not in MODES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{text!r}: choose among {','.join(MODES)}")
    return out


BINARY_OPTIONS = ("decode", "matvec", "route")  # 0 or 1; the other fields are positive


def pallas_options(text: str) -> list[tuple[str, PallasOptions]]:
    """An argparse type: 'neurons=16,out=16;decode=0' -> [(set text, PallasOptions)] (';' separates sets; the
    fields a set does not name keep their defaults)."""
    sets = []
    for part in text.split(";"):
        fields = {}
        for item in (t for t in part.split(",") if t):
            key, _, value = item.partition("=")
            ok = value in ("0", "1") if key in BINARY_OPTIONS else value.isdigit() and int(value) >= 1
            if key not in INT_OPTIONS or not ok:
                raise argparse.ArgumentTypeError(f"{item!r}: expected name=int (0/1 for {','.join(BINARY_OPTIONS)}, "
                                                 f"else positive) with a name among {','.join(INT_OPTIONS)}")
            fields[key] = int(value)
        sets.append((part, PallasOptions(**fields)))
    return sets


def build(shape: str):
    spec = dict(SHAPES[shape], family="llama", tie_word_embeddings=True, max_position_embeddings=2048)
    return build_model(spec, seed=0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)


def nbytes(arrays) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)


def measure(model, ids, new: int, repeats: int, profile_dir: str = "", one_token: bool = False
            ) -> tuple[dict, np.ndarray]:
    """Whole-call and per-step times of greedy generation of `new` tokens after `ids`, and the new tokens; with
    `profile_dir`, the device kernels per step of one traced call of min(32, new) tokens; `one_token`: the
    Generator's option (models/one_token.py)."""
    gen = Generator(model, one_token=one_token)
    last = {}

    def full():
        last["out"] = gen(ids, max_new_tokens=new)
        return last["out"]

    t_full = timed(full, repeats)
    t_one = timed(lambda: gen(ids, max_new_tokens=1), repeats)
    times = {"tokens_per_s": new * ids.shape[0] / t_full, "call_s": t_full, "prefill_plus_one_s": t_one,
             "step_ms": (t_full - t_one) / (new - 1) * 1e3}
    if profile_dir:
        summary = traced_call(gen, ids, min(32, new), profile_dir, top=12)
        times["profile"] = {k: summary[k] for k in ("events_per_step", "busy_ms_per_step", "wall_ms_per_step",
                                                     "categories", "top", "profile") if k in summary}
    return times, np.asarray(last["out"])[:, ids.shape[1]:]


@nnx.jit
def _ffn(layer, x):
    return layer(x)


def ffn_error(masked, fast, seed: int = 0) -> float:
    """max |y_fast - y_masked| / max |y_masked| of layer 0's FFN on one random token (checks the kernels)."""
    x = jax.random.normal(jax.random.key(seed), (1, 1, masked.cfg.hidden_size), jnp.bfloat16)
    want = np.asarray(_ffn(masked.layers[0].mlp, x), np.float32)
    got = np.asarray(_ffn(fast.layers[0].mlp, x), np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main(argv=None):
    p = Parser(prog="python scripts/bench_sparse_decode.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--experts", type=int, default=16, help="E: experts per FFN")
    p.add_argument("--top_k", type=numbers, default=[4, 8], help="routed experts per token, comma-separated")
    p.add_argument("--modes", type=modes, default=list(MODES), help="dispatching modes, comma-separated")
    p.add_argument("--masked", action="store_true", help="also the masked forward (every expert computed)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pallas", type=pallas_options, default=[("", PallasOptions())],
                   help="';'-separated sets of Pallas options (dispatch.PallasOptions), e.g. 'decode=0;neurons=16'")
    p.add_argument("--profile", default="", help="a log directory: trace one call per row (kernels per step)")
    p.add_argument("--one_token", type=int, choices=(0, 1), default=1,
                   help="1: every row's Generator(one_token=True) (models/one_token.py), the dense row included")
    p.add_argument("--seed", type=int, default=0, help="the split's key")
    p.add_argument("--out", default="", help="append the JSON lines to this file")
    args = p.parse_args(argv)
    f = SHAPES[args.shape]["intermediate_size"]
    if args.experts < 2 or f % args.experts:
        p.error(f"--experts {args.experts}: must be >= 2 and divide the FFN width {f} of --shape {args.shape}")
    if any(not 1 <= k <= args.experts for k in args.top_k):
        p.error(f"--top_k {args.top_k}: each must lie in 1..{args.experts}")
    if args.new_tokens < 2 or args.prompt < 1 or args.repeats < 1 or args.batch < 1:
        p.error("--new_tokens must be >= 2 and --prompt, --repeats, --batch >= 1")

    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    hbm = copy_bandwidth_gb_s() if jax.default_backend() != "cpu" else copy_bandwidth_gb_s(64 << 20)
    dense = build(args.shape)
    cfg = dense.cfg
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt), dtype=np.int32)
    params = flat_params(dense)
    dense_bytes = nbytes(params.values())
    ffn_bytes = nbytes(v for k, v in params.items() if ".mlp." in k)
    kv_bytes = cfg.num_layers * 2 * args.batch * (args.prompt + args.new_tokens) * cfg.num_kv_heads * \
        cfg.dim_per_head * 2
    base = {"shape": args.shape, "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "experts": args.experts, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "hbm_gb_s": hbm, "xla_flags": os.environ.get("XLA_FLAGS", ""), "one_token": bool(args.one_token)}

    def row(name, model, top_k=None, ffn_read=1.0, extra_bytes=0, masked_tokens=None, masked=None):
        step_bytes = dense_bytes - ffn_bytes * (1.0 - ffn_read) + extra_bytes + kv_bytes
        logdir = os.path.join(args.profile, re.sub(r"[^\w+-]", "_", f"{len(rows):02d}_{name}")) if args.profile else ""
        times, tokens = measure(model, ids, args.new_tokens, args.repeats, logdir, bool(args.one_token))
        r = dict(base, row=name, top_k=top_k, ffn_read=ffn_read, **times)
        if masked is not None:  # the dispatching forward against the masked one (bf16: rounding differs)
            r.update(ffn_rel_err=ffn_error(masked, model), tokens_as_masked=float(np.mean(tokens == masked_tokens)))
        r.update(bound_ms=step_bytes / (hbm * 1e9) * 1e3, bound_speedup=(dense_bytes + kv_bytes) / step_bytes)
        r["x_bound"] = r["step_ms"] / r["bound_ms"]
        dense_row = rows[0] if rows else r
        r.update(speedup=dense_row["step_ms"] / r["step_ms"], speedup_call=r["tokens_per_s"] /
                 dense_row["tokens_per_s"])
        emit(r)
        return tokens

    row("dense", dense)
    for k in args.top_k:
        moe = moefy(dense, num_experts=args.experts, num_experts_per_tok=k, split="random", router="centroid",
                    key=args.seed)
        router_bytes = nbytes(v for name, v in flat_params(moe).items() if ".router." in name)
        read = min(args.experts, args.batch * k) / args.experts  # split 'random': no shared experts
        if args.masked:
            masked_tokens = row("moefied+masked", moe, k, 1.0, router_bytes)
        else:
            masked_tokens = np.asarray(Generator(moe)(ids, max_new_tokens=args.new_tokens))[:, args.prompt:]
        for mode in args.modes:
            variants = args.pallas if mode == "pallas" else [("", None)]
            for text, options in variants:
                try:
                    fast = with_dispatch(moe, mode, pallas=options)
                except ValueError as e:  # e.g. no Pallas blocks for this shape
                    p.error(str(e))
                name = f"moefied+{mode}" + (f"[{text}]" if mode == "pallas" and len(variants) > 1 else "")
                row(name, fast, k, read, router_bytes, masked_tokens, moe)
        del moe

    print(f"\n{args.shape}, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, E={args.experts}, "
          f"{base['device']}, copy bandwidth {hbm:.0f} GB/s")
    print(f"{'row':<32} {'top_k':>5} {'ffn_read':>8} {'tok/s':>9} {'step_ms':>8} {'speedup':>7} {'bound_x':>7} "
          f"{'x_bound':>7} {'ffn_err':>8} {'tok=msk':>7} {'kernels':>7} {'busy_ms':>7}")
    for r in rows:
        check = f"{r['ffn_rel_err']:>8.1e} {r['tokens_as_masked']:>7.2f}" if "ffn_rel_err" in r else f"{'':>16}"
        prof = r.get("profile", {})
        kernels = f"{prof['events_per_step']:>7.0f} {prof['busy_ms_per_step']:>7.3f}" if "events_per_step" in prof \
            else ""
        print(f"{r['row']:<32} {r['top_k'] or '-':>5} {r['ffn_read']:>8.3f} {r['tokens_per_s']:>9.1f} "
              f"{r['step_ms']:>8.3f} {r['speedup']:>7.2f} {r['bound_speedup']:>7.2f} {r['x_bound']:>7.2f} {check} "
              f"{kernels}")
    for r in rows:
        for k in r.get("profile", {}).get("top", [])[:8]:
            print(f"  {r['row']:<30} {k['count']:>5} x {k['mean_us']:7.2f} us  {k['name'][:90]}")


if __name__ == "__main__":
    main()
