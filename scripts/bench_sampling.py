"""Per-step cost of choosing the next token (`models.generation.choose_tokens`) at a real vocabulary size, alone.

    python scripts/bench_sampling.py                          # V = 49,152 (SmolLM2), batch 1 and 64
    python scripts/bench_sampling.py --vocab 128256 --batch 1,8 --out rows.jsonl

Rows (median and min of --rounds interleaved rounds of --calls jitted calls, ms per call): greedy (argmax); the
sampling settings of transformers' defaults and common chat use, each with the candidates `generate` ranks for it
(`sampling_candidates`: none, top_k's bucket, the whole row) and with the whole row sorted (`candidates` = RANK_ALL:
what every sampling setting cost before candidates were ranked, the same kept set and the same draw, which the
script checks). The top-k setting also runs with each group size of --groups (`top_values`: the groups of largest
max gathered, then their top k; 0 = one `lax.top_k` over the row), checked the same way. The decode
step around it is bench_generate.py's (`--sampling greedy,sample`).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configurable_fm.models.generation import (  # noqa: E402
    RANK_ALL, choose_tokens, default_group, sampling_candidates)

SETTINGS = {"temperature 0.8": (None, None), "top_k 50, top_p 0.95": (50, 0.95), "top_p 0.95": (None, 0.95)}
GROUPED = "top_k 50, top_p 0.95"  # the setting that also runs with each --groups size


def bench(vocab: int, batch: int, rounds: int, calls: int, groups: list[int] = ()) -> list[dict]:
    z = jnp.asarray(np.random.RandomState(0).randn(batch, vocab).astype(np.float32) * 3)
    key, group0 = jax.random.key(0), default_group()
    # name -> (function, traced (temperature, top_k, top_p), candidates, group, the case it must equal)
    cases = {"greedy": (functools.partial(choose_tokens, greedy=True), (1.0, 1, 1.0), 0, group0, None)}
    for name, (k, p) in SETTINGS.items():
        traced, c = (0.8, vocab if k is None else k, 1.0 if p is None else p), sampling_candidates(k, p)
        whole = name + ", whole row sorted"
        cases[name] = (functools.partial(choose_tokens, greedy=False, candidates=c), traced, c, group0, whole)
        cases[whole] = (functools.partial(choose_tokens, greedy=False, candidates=RANK_ALL), traced, RANK_ALL,
                        group0, None)
        for group in groups if name == GROUPED else ():
            cases[f"{name}, group {group}"] = (functools.partial(choose_tokens, greedy=False, candidates=c,
                                                                 group=group), traced, c, group, whole)
    fns = {n: jax.jit(case[0]) for n, case in cases.items()}
    args = {n: (z, key, jnp.float32(t), jnp.int32(k), jnp.float32(p)) for n, (_, (t, k, p), *_) in cases.items()}
    out = {n: np.asarray(fns[n](*args[n])) for n in cases}
    for n, case in cases.items():
        if case[4] is not None and not np.array_equal(out[n], out[case[4]]):
            raise AssertionError(f"{n}: ranking candidates drew other tokens than the whole sort")
    times: dict[str, list[float]] = {n: [] for n in cases}
    for _ in range(rounds):
        for n in cases:
            t = time.perf_counter()
            for _ in range(calls):
                r = fns[n](*args[n])
            r.block_until_ready()
            times[n].append((time.perf_counter() - t) / calls * 1e3)
    return [{"vocab": vocab, "batch": batch, "case": n, "candidates": cases[n][2], "group": cases[n][3],
             "ms_median": round(float(np.median(times[n])), 4), "ms_min": round(min(times[n]), 4),
             "device": jax.devices()[0].device_kind} for n in cases]


def int_list(text: str, least: int) -> list[int]:
    """'1,64' -> [1, 64]; argparse's usage error for anything but ints >= least."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected ints >= {least} separated by commas, got {text!r}")
    return values


def positive_ints(text: str) -> list[int]:
    return int_list(text, 1)


def non_negative_ints(text: str) -> list[int]:
    return int_list(text, 0)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=positive_int, default=49152)
    ap.add_argument("--batch", type=positive_ints, default=[1, 64], help="comma-separated batch sizes")
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--calls", type=positive_int, default=20)
    ap.add_argument("--groups", type=non_negative_ints, default=[],
                    help="group sizes for the top-k setting also timed, e.g. 0,16,64 (0: one lax.top_k; default: none "
                         "beyond the backend's own, models.generation.default_group)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    rows = []
    for b in a.batch:
        for row in bench(a.vocab, b, a.rounds, a.calls, a.groups):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
