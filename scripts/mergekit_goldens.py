"""Write golden files from mergekit 0.1.5's own per-tensor merge code, for tests/ops/merge.

Run ONLY by hand, in a throwaway virtualenv outside the repository (never a project dependency):

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit==0.1.5
    /tmp/mk/bin/python scripts/mergekit_goldens.py                 # every method in METHOD_CASES
    /tmp/mk/bin/python scripts/mergekit_goldens.py ties della      # only these
    /tmp/mk/bin/python scripts/mergekit_goldens.py slices          # the `slices:` configs (SLICE_CASES)
    /tmp/mk/bin/python scripts/mergekit_goldens.py --dtype float16  # every method, arithmetic in float16
    /tmp/mk/bin/python scripts/mergekit_goldens.py --dtype bfloat16 ties arcee_fusion
    /tmp/mk/bin/python scripts/mergekit_goldens.py yaml_dtypes     # whole float16/bfloat16 YAML merges

For each method it calls `mergekit.merge_methods.api.merge_tensors` on small deterministic tensors (inputs built
from a numpy generator seeded by the case name) and writes

    tests/golden/mergekit_0.1.5/<method>.safetensors   "<case>/base" (S, absent without a base), "<case>/xs" (N, *S),
                                                       "<case>/y" (S), and for randomised methods "<case>/masks"
                                                       (N, *S; the masks mergekit drew) and "<case>/probs" (della)
    tests/golden/mergekit_0.1.5/<method>.json          {"mergekit": version, "torch": version,
                                                        "cases": {case: {"params": {...}, "shape": [...], "n": N,
                                                                         "base": bool, "note": "..."}}}

`params` are exactly the parameters given to mergekit (per-model ones as lists in input order).
Randomised sparsifiers (dare_*, della*) call `torch.bernoulli`; the script seeds torch and records every call's
input (della's keep probabilities) and output (the mask), so tests can inject the very masks mergekit used.

`slices` runs mergekit's whole pipeline (`mergekit.merge.run_merge`) on the YAML configs of SLICE_CASES over two
tiny random llama checkpoints A and B (transformers, every parameter ~ N(0, 1) from torch seeds 0 and 1) and writes

    tests/golden/mergekit_0.1.5/slices.safetensors   "inputs/A/<hf name>", "inputs/B/<hf name>" (the inputs) and
                                                     "<case>/<hf name>" (mergekit's output tensors)
    tests/golden/mergekit_0.1.5/slices.json          {"mergekit", "torch", "transformers", "input_config": the
                                                      inputs' config.json, "cases": {case: {"yaml": text with {A}
                                                      and {B} for the model paths, "num_hidden_layers": n,
                                                      "tensors": [output names]}}}

`--dtype float16|bfloat16` runs the same cases with the inputs cast to that dtype first (as mergekit's loader
does for a YAML's `dtype:`), so mergekit does its arithmetic in that dtype, and writes
tests/golden/mergekit_0.1.5/<dtype>/<method>.{safetensors,json}: the same keys, every array stored as float32
(the inputs' values are exact in float32: they are the float32 inputs rounded to <dtype>), and per case
"out_dtype", the dtype of the tensor mergekit returned (what it writes without an `out_dtype:`).

Extending: add a function returning a list of `Case` and an entry in METHOD_CASES (one row per method).
Sizes stay small (each file well under 1 MB). Exact ties in magnitude are built from dyadic numbers (so x − b is
exact) on tensors of at most 16 elements, where torch's CPU sort is stable; above that its tie order is arbitrary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import zlib
from typing import Callable, Optional

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "mergekit_0.1.5")


@dataclasses.dataclass
class Case:
    name: str
    xs: np.ndarray  # (N, *S) float32, the non-base inputs in order
    params: dict
    base: Optional[np.ndarray] = None  # (S) float32, or None for methods without a base
    note: str = ""
    seed: int = 0  # torch seed for randomised methods


# ---------------------------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------------------------


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def gaussian(name: str, shape, n: int, scale: float = 0.1, zero: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """base ~ N(0, 1), x_i = base + scale·N(0, 1) (x_i = base exactly for i in `zero`): distinct magnitudes."""
    r = rng_for(name)
    base = r.standard_normal(shape).astype(np.float32)
    xs = np.stack([base + (scale * r.standard_normal(shape)).astype(np.float32) for _ in range(n)])
    for i in zero:
        xs[i] = base
    return base, xs.astype(np.float32)


def dyadic(name: str, shape, n: int, levels=(-2, -1, 0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """base = k/8, δ = level/4: x − b is exact in float32, so equal |δ| are exact ties."""
    r = rng_for(name)
    base = (r.integers(-16, 17, size=shape) / 8).astype(np.float32)
    deltas = (r.choice(np.asarray(levels), size=(n, *shape)) / 4).astype(np.float32)
    return base, (base[None] + deltas).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Cases of the task-vector family (task_arithmetic, ties, dare_*, breadcrumbs*, della*, sce)
# ---------------------------------------------------------------------------------------------------------------


def task_arithmetic_cases() -> list[Case]:
    c = []
    b, x = gaussian("ta/basic", (4, 6), 2)
    c.append(Case("basic", x, {"weight": [0.7, 0.3]}, b))
    b, x = gaussian("ta/normalize_lambda", (3, 4, 5), 3)
    c.append(Case("normalize_lambda", x, {"weight": [0.5, 1.2, -0.3], "normalize": True, "lambda": 0.6}, b))
    b, x = gaussian("ta/weight0", (5, 4), 2)
    c.append(Case("weight0", x, {"weight": [0.0, 0.0]}, b, "weight 0 returns the base"))
    b, x = gaussian("ta/weights_sum0", (5, 4), 2)
    c.append(Case("weights_sum0", x, {"weight": [1.0, -1.0], "normalize": True}, b, "|Σw| < 1e-8 -> divisor 1"))
    b, x = gaussian("ta/one_model_norm", (64,), 1)
    c.append(Case("one_model_norm", x, {"weight": 1.0}, b))
    b, x = gaussian("ta/zero_tv", (4, 6), 3, zero=(1,))
    c.append(Case("zero_tv", x, {"weight": [0.4, 0.4, 0.2], "normalize": True}, b))
    return c


def ties_cases() -> list[Case]:
    c = []
    b, x = gaussian("ties/basic", (4, 6), 2)
    c.append(Case("basic", x, {"weight": [1.0, 1.0], "density": 0.5}, b))
    b, x = gaussian("ties/per_model", (10, 5), 3)
    c.append(Case("per_model", x, {"weight": [0.5, 0.8, 0.3], "density": [0.3, 0.7, 0.58]}, b,
                  "density 0.58 on 50 entries: int(0.58*50) = 28 in double precision, 29 in float32"))
    b, x = gaussian("ties/density_1_0", (4, 6), 2)
    c.append(Case("density_1_0", x, {"weight": [0.6, 0.4], "density": [1.0, 0.0]}, b))
    b, x = gaussian("ties/density_tiny", (4, 6), 2)
    c.append(Case("density_tiny", x, {"weight": [1.0, 1.0], "density": 0.01}, b, "k = max(1, int(d n)) = 1"))
    b, x = dyadic("ties/ties16", (16,), 3)
    c.append(Case("ties16", x, {"weight": [1.0, 0.5, 1.0], "density": 0.4}, b, "ties in magnitude, n = 16"))
    b, x = dyadic("ties/ties2x8", (2, 8), 2)
    c.append(Case("ties2x8", x, {"weight": [1.0, 1.0], "density": 0.3}, b, "ties in magnitude, n = 16"))
    b, x = gaussian("ties/rescale_lambda", (6, 5), 2)
    c.append(Case("rescale_lambda", x, {"weight": [0.9, 0.6], "density": 0.4, "rescale": True, "normalize": False,
                                        "lambda": 1.3}, b))
    b, x = gaussian("ties/neg_weights", (4, 6), 3)
    c.append(Case("neg_weights", x, {"weight": [1.0, -1.0, 0.5], "density": 0.6}, b))
    b, x = gaussian("ties/weights_sum0", (4, 6), 2)
    c.append(Case("weights_sum0", x, {"weight": [0.5, -0.5], "density": 0.8}, b))
    b, x = gaussian("ties/zero_tv", (4, 6), 2, zero=(0,))
    c.append(Case("zero_tv", x, {"weight": [1.0, 1.0], "density": 0.5}, b))
    b, x = gaussian("ties/norm64", (64,), 2)
    c.append(Case("norm64", x, {"weight": [1.0, 1.0], "density": 0.2}, b))
    b, x = gaussian("ties/one_model", (3, 7), 1)
    c.append(Case("one_model", x, {"weight": 0.8, "density": 0.5}, b))
    return c


def _dare_cases(tag: str) -> list[Case]:
    c = []
    b, x = gaussian(f"{tag}/basic", (4, 6), 2)
    c.append(Case("basic", x, {"weight": [1.0, 1.0], "density": 0.5}, b, seed=1))
    b, x = gaussian(f"{tag}/per_model", (5, 8), 3)
    c.append(Case("per_model", x, {"weight": [0.5, 0.8, 0.3], "density": [0.3, 0.7, 0.9]}, b, seed=2))
    b, x = gaussian(f"{tag}/density_1_0", (4, 6), 2)
    c.append(Case("density_1_0", x, {"weight": [0.6, 0.4], "density": [1.0, 0.0]}, b, seed=3))
    b, x = gaussian(f"{tag}/no_rescale_norm", (6, 5), 2)
    c.append(Case("no_rescale_norm", x, {"weight": [0.7, 0.5], "density": 0.6, "rescale": False,
                                         "normalize": True, "lambda": 0.8}, b, seed=4))
    b, x = gaussian(f"{tag}/norm64", (64,), 2)
    c.append(Case("norm64", x, {"weight": [1.0, -0.5], "density": 0.3}, b, seed=5))
    b, x = gaussian(f"{tag}/zero_tv", (4, 6), 2, zero=(1,))
    c.append(Case("zero_tv", x, {"weight": [1.0, 1.0], "density": 0.5}, b, seed=6))
    return c


def _breadcrumbs_cases(tag: str) -> list[Case]:
    c = []
    b, x = gaussian(f"{tag}/basic", (5, 6), 2)
    c.append(Case("basic", x, {"weight": [1.0, 1.0], "density": 0.8, "gamma": 0.1}, b))
    b, x = gaussian(f"{tag}/norm64_default_gamma", (64,), 2)
    c.append(Case("norm64_default_gamma", x, {"weight": [1.0, 0.5], "density": 0.5}, b,
                  "gamma 0.01 on 64 entries: n_top = 0 (0.1.4 dropped the whole tensor)"))
    b, x = gaussian(f"{tag}/per_model", (8, 5), 3)
    c.append(Case("per_model", x, {"weight": [0.5, 0.8, 0.3], "density": [0.3, 0.7, 0.9],
                                   "gamma": [0.05, 0.2, 0.15]}, b))
    b, x = gaussian(f"{tag}/density_1_0", (4, 6), 2)
    c.append(Case("density_1_0", x, {"weight": [0.6, 0.4], "density": [1.0, 0.0]}, b))
    b, x = gaussian(f"{tag}/big_gamma", (4, 6), 2)
    c.append(Case("big_gamma", x, {"weight": [1.0, 1.0], "density": 0.5, "gamma": 0.7}, b,
                  "n_top > n - target: n_bot = 0, the window keeps the target smallest entries"))
    b, x = dyadic(f"{tag}/ties16", (16,), 3)
    c.append(Case("ties16", x, {"weight": [1.0, 0.5, 1.0], "density": 0.5, "gamma": 0.125}, b,
                  "ties in magnitude, n = 16"))
    b, x = gaussian(f"{tag}/rescale_normalize", (6, 5), 2)
    c.append(Case("rescale_normalize", x, {"weight": [0.9, 0.6], "density": 0.6, "gamma": 0.1, "rescale": True,
                                           "normalize": True, "lambda": 1.2}, b))
    return c


def _della_cases(tag: str) -> list[Case]:
    c = []
    b, x = gaussian(f"{tag}/basic", (4, 6), 2)
    c.append(Case("basic", x, {"weight": [1.0, 1.0], "density": 0.5, "epsilon": 0.2}, b, seed=11))
    b, x = gaussian(f"{tag}/rank3", (2, 3, 5), 2)
    c.append(Case("rank3", x, {"weight": [0.7, 0.6], "density": 0.4}, b, "3-D: ranks along axis 1", seed=12))
    b, x = gaussian(f"{tag}/norm16", (16,), 3)
    c.append(Case("norm16", x, {"weight": [1.0, 0.5, -0.4], "density": [0.5, 0.3, 0.7], "epsilon": [0.1, 0.2, 0.25]},
                  b, seed=13))
    b, x = gaussian(f"{tag}/density_1_0", (4, 6), 2)
    c.append(Case("density_1_0", x, {"weight": [0.6, 0.4], "density": [1.0, 0.0]}, b, seed=14))
    b, x = gaussian(f"{tag}/no_rescale", (6, 5), 2)
    c.append(Case("no_rescale", x, {"weight": [0.8, 0.5], "density": 0.6, "epsilon": 0.1, "rescale": False,
                                    "normalize": True, "lambda": 1.1}, b, seed=15))
    b, x = gaussian(f"{tag}/zero_tv", (4, 6), 2, zero=(0,))
    c.append(Case("zero_tv", x, {"weight": [1.0, 1.0], "density": 0.5}, b, seed=16))
    return c


def sce_cases() -> list[Case]:
    c = []
    b, x = gaussian("sce/basic", (4, 6), 2)
    c.append(Case("basic", x, {}, b))
    b, x = gaussian("sce/topk", (5, 6), 3)
    c.append(Case("topk", x, {"select_topk": 0.5}, b))
    b, x = gaussian("sce/topk07_n10", (10,), 2)
    c.append(Case("topk07_n10", x, {"select_topk": 0.7}, b, "k = int(f32(10)·f32(0.7)) = 7"))
    b, x = gaussian("sce/topk_small", (4, 6), 2)
    c.append(Case("topk_small", x, {"select_topk": 0.03}, b, "k = int(24·0.03) = 0: nothing selected"))
    b, x = gaussian("sce/topk0", (4, 6), 2)
    c.append(Case("topk0", x, {"select_topk": 0.0}, b))
    b, x = gaussian("sce/zero_tvs", (4, 6), 2, zero=(0, 1))
    c.append(Case("zero_tvs", x, {"select_topk": 1.0}, b, "all task vectors zero: uniform weights"))
    b, x = gaussian("sce/zero_tv_norm", (64,), 3, zero=(1,))
    c.append(Case("zero_tv_norm", x, {"select_topk": 0.8, "int8_mask": True}, b))
    b, x = gaussian("sce/one_model", (3, 7), 1)
    c.append(Case("one_model", x, {}, b))
    return c


# ---------------------------------------------------------------------------------------------------------------
# Cases of the geometric methods (linear, slerp, nuslerp, multislerp, karcher, model_stock) and the selective ones
# (nearswap, arcee_fusion, ram, ramplus_tl, passthrough)
# ---------------------------------------------------------------------------------------------------------------

GEO_SHAPES = [(5, 7), (9,), (6, 3, 5)]  # a matrix, a 1-D norm, a 3-D tensor (slices of >= 5 entries: no nearly
#                                         antipodal random pair, where slerp's 1/sin θ amplifies rounding)


def randn(name: str, shape, n: int) -> np.ndarray:
    """n independent N(0, 1) float32 tensors of `shape`, stacked (n, *shape)."""
    return rng_for(name).standard_normal((n, *shape)).astype(np.float32)


def linear_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        x = randn(f"linear/{len(s)}d", s, 3)
        c.append(Case(f"three_{len(s)}d", x, {"weight": [0.2, 0.5, 0.3]}))
        c.append(Case(f"weights_sum_2.5_{len(s)}d", x, {"weight": [1.0, 2.0, -0.5]}, note="normalize divides by 2.5"))
        c.append(Case(f"no_normalize_{len(s)}d", x, {"weight": [0.7, 0.6, 0.1], "normalize": False}))
    x = randn("linear/misc", (4, 5), 2)
    c.append(Case("single", x[:1], {"weight": [2.5]}, note="one model: y = x"))
    c.append(Case("self", np.stack([x[0], x[0]]), {"weight": [0.4, 0.6]}, note="a model with itself: y = x"))
    c.append(Case("zero_weight", x, {"weight": [1.0, 0.0]}))
    return c


def slerp_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        x = randn(f"slerp/{len(s)}d", s, 2)
        for t in (0.0, 0.3, 0.5, 1.0):
            c.append(Case(f"random_{len(s)}d_t{t}", x[1:], {"t": t}, x[0]))
    b, x, y = randn("slerp/misc", (6, 4), 3)
    zero = np.zeros_like(b)
    c.append(Case("colinear", (2 * b)[None], {"t": 0.4}, b, "|dot| > 0.9995: lerp"))
    c.append(Case("antipodal", (-3 * b)[None], {"t": 0.4}, b, "|dot| > 0.9995: lerp"))
    c.append(Case("near_colinear", (b + 1e-3 * x)[None], {"t": 0.6}, b, "dot ~ 1 - 1e-7: lerp"))
    c.append(Case("zero_base", b[None], {"t": 0.3}, zero, "a zero norm counts as 1: dot = 0, theta = pi/2"))
    c.append(Case("zero_other", zero[None], {"t": 0.3}, b))
    c.append(Case("both_zero", np.zeros((1, 5), np.float32), {"t": 0.5}, np.zeros(5, np.float32)))
    c.append(Case("identical", b[None], {"t": 0.7}, b))
    c.append(Case("extrapolate", y[None], {"t": 1.3}, b))
    return c


def nuslerp_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        b, x1, x2 = randn(f"nuslerp/{len(s)}d", s, 3)
        for flat, row in ((True, False), (False, False), (False, True)):
            p = {"weight": [0.3, 0.9], "nuslerp_flatten": flat, "nuslerp_row_wise": row}
            c.append(Case(f"base_{len(s)}d_flat{int(flat)}_row{int(row)}", np.stack([x1, x2]), p, b))
            if len(s) != 1:  # (a 1-D tensor is one vector in every layout)
                c.append(Case(f"nobase_{len(s)}d_flat{int(flat)}_row{int(row)}", np.stack([x1, x2]), p))
    b, x1, x2 = randn("nuslerp/misc", (4, 6), 3)
    x = np.stack([x1, x2])
    c.append(Case("weights_sum_zero", x, {"weight": [1.0, -1.0]}, b, "|w1 + w2| < 1e-6: t = 0.5"))
    c.append(Case("t0", x, {"weight": [1.0, 0.0]}, b, "t = 0: y = x_1"))
    c.append(Case("t1", x, {"weight": [0.0, 2.0]}, b, "t = 1: y = x_2"))
    # rows with exactly representable unit vectors (cos exactly +-1 in float32), and a zero row
    v0, v1 = randn("nuslerp/rows", (4, 6), 2)
    v0[0] = [0.5, -0.5, 0.5, 0.5, 0.0, 0.0]
    v0[1] = [0.0, 2.0, 0.0, -2.0, 2.0, 2.0]
    v1[0] = 2.0 * v0[0]
    v1[1] = -0.25 * v0[1]
    v0[2] = 0.0
    c.append(Case("rows_colinear_antipodal_zero", np.stack([v0, v1]), {"weight": [0.6, 0.4], "nuslerp_flatten": False},
                  note="row 0 colinear, row 1 antipodal (lerp), row 2 zero (theta = pi/2)"))
    e = np.full((4, 4), 0.25, np.float32)  # norm 1 exactly
    c.append(Case("flat_colinear", np.stack([e, 4 * e]), {"weight": [0.6, 0.4]}))
    c.append(Case("flat_antipodal", np.stack([e, -2 * e]), {"weight": [0.25, 0.75]}))
    return c


def multislerp_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        b, *xs = randn(f"multislerp/{len(s)}d", s, 4)
        xs = np.stack(xs)
        c.append(Case(f"base_three_{len(s)}d", xs, {"weight": [0.2, 0.5, 0.3]}, b))
        c.append(Case(f"nobase_three_{len(s)}d", xs, {"weight": [1.0, 2.0, 1.0]}))
        c.append(Case(f"nobase_two_{len(s)}d", xs[:2], {"weight": [0.3, 0.7]}))
    b, x, z = randn("multislerp/misc", (5, 3), 3)
    c.append(Case("single_with_base", x[None], {"weight": [0.5]}, b, "one model: y = x"))
    c.append(Case("no_normalize", np.stack([x, z]), {"weight": [0.4, 0.4], "normalize_weights": False}, b))
    c.append(Case("antipodal_two_lerp", np.stack([x, -x]), {"weight": [0.5, 0.5]},
                  note="the weighted mean of the units vanishes: 2 inputs fall back to lerp"))
    c.append(Case("identical", np.stack([x, x, x]), {"weight": [0.2, 0.3, 0.5]}, b))
    c.append(Case("eps", np.stack([x, z]), {"weight": [0.5, 0.5], "eps": 1e-3}, b))
    return c


def karcher_cases() -> list[Case]:
    c = []
    for s, n in zip(GEO_SHAPES + [(5, 7)], (2, 3, 4, 3)):
        x = randn(f"karcher/{len(s)}d_{n}", s, n) * np.arange(1, n + 1, dtype=np.float32).reshape(-1, *[1] * len(s))
        c.append(Case(f"n{n}_{len(s)}d", x, {}))
    x = randn("karcher/misc", (6, 5), 3)
    zero = np.zeros((6, 5), np.float32)
    c.append(Case("max_iter1", x, {"max_iter": 1}))
    c.append(Case("max_iter50_tol1e-7", x, {"max_iter": 50, "tol": 1e-7}))
    c.append(Case("with_zero_input", np.stack([x[0], zero, x[1]]), {},
                  note="a zero input takes no part in the direction but counts in the mean norm"))
    c.append(Case("all_zero", np.zeros((2, 4), np.float32), {}, note="y = 0"))
    c.append(Case("identical", np.stack([x[0]] * 3), {}))
    c.append(Case("single", x[2:], {}))
    c.append(Case("colinear_scaled", np.stack([x[0], 2 * x[0]]), {}))
    return c


def model_stock_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        for n in (2, 3):
            b, *d = randn(f"model_stock/{len(s)}d_{n}", s, n + 1)
            xs = np.stack([b + 0.1 * d[i] + 0.05 * i for i in range(n)]).astype(np.float32)
            c.append(Case(f"n{n}_{len(s)}d", xs, {}, b))
            c.append(Case(f"n{n}_{len(s)}d_filter_wise", xs, {"filter_wise": True}, b))
    b, d, d2, d3 = randn("model_stock/misc", (4, 6), 4)
    d, d2 = 0.1 * d, 0.1 * d2
    c.append(Case("opposite_offsets_singular", np.stack([b + d, b - d]), {}, b,
                  "cos = -1, 1 + (N-1) cos = 0: t = 0, y = base (0.1.5 guard)"))
    c.append(Case("identical_offsets", np.stack([b + d, b + d]), {}, b, "cos = 1: t = 1"))
    d2[1] = -d[1]
    d2[2] = 0.0
    c.append(Case("rows_singular_and_zero", np.stack([b + d, b + d2]), {"filter_wise": True}, b,
                  "row 1 opposite (t = 0), row 2 a zero offset (cos = 0)"))
    c.append(Case("four_models", np.stack([b + d, b + d2, b + 0.5 * d - 0.2 * d2, b + 0.3 * d3]), {}, b))
    return c


def nearswap_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        b, d = randn(f"nearswap/{len(s)}d", s, 2)
        for t in (0.0, 0.01, 0.05, 1.0):
            c.append(Case(f"{len(s)}d_t{t}", (b + 0.05 * d)[None], {"t": t}, b))
    b = randn("nearswap/identical", (3, 4), 1)[0]
    c.append(Case("identical", b[None], {"t": 0.001}, b))
    return c


def _ram_cases(tag: str) -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        r = rng_for(f"{tag}/{len(s)}d")
        b = r.standard_normal(s).astype(np.float32)
        d = (0.1 * r.standard_normal((3, *s))).astype(np.float32)
        d[r.random((3, *s)) < 0.4] = 0.0  # zero task-vector entries: unique, shared and untouched entries
        xs = (b + d).astype(np.float32)
        for n in (1, 2, 3):
            c.append(Case(f"n{n}_{len(s)}d", xs[:n], {}, b))
        if tag == "ramplus_tl":
            c.append(Case(f"r_alpha_{len(s)}d", xs, {"r": 0.5, "alpha": 1.5}, b))
        c.append(Case(f"eps_{len(s)}d", xs, {"epsilon": 0.05}, b, "|tau| <= epsilon counts as unchanged"))
    b, d = randn(f"{tag}/misc", (4, 5), 2)
    c.append(Case("base_only", np.zeros((0, 4, 5), np.float32), {}, b, "no other model: y = base"))
    c.append(Case("identical_to_base", np.stack([b, b]), {}, b))
    c.append(Case("all_shared", np.stack([b + 0.1 * d] * 2), {}, b))
    return c


def arcee_importance_margin(b: np.ndarray, x: np.ndarray) -> float:
    """Smallest distance of an importance score to arcee_fusion's threshold, relative to the threshold
    (a float64 estimate of mergekit's float32 computation)."""
    b, x = b.astype(np.float64), x.astype(np.float64)

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(b) + 1e-8
    imp = np.abs(x - b) * np.sum(p * np.log(p / q), -1, keepdims=True)
    ordered = np.sort(imp.reshape(-1))
    idx = (np.array([0.25, 0.5, 0.75], np.float32) * np.float32(ordered.size - 1)).astype(np.int64)
    q1, median, q3 = ordered[idx]
    threshold = median + 1.5 * (q3 - q1)
    return float(np.min(np.abs(imp - threshold)) / max(abs(threshold), 1e-30))


def arcee_fusion_cases() -> list[Case]:
    """arcee_fusion's mask flips where an importance is within rounding of the threshold: the inputs are redrawn
    (next attempt number in the name seed) until no score lies within a relative 1e-3 of it."""
    c = []
    for s in [(6, 32), (64,), (2, 4, 16), (16, 8), (3, 50)]:
        for scale in (0.05, 0.5):
            name = f"{'x'.join(map(str, s))}_scale{scale}"
            for attempt in range(100):
                r = rng_for(f"arcee_fusion/{name}/{attempt}")
                b = r.standard_normal(s).astype(np.float32)
                x = (b + scale * r.standard_normal(s)).astype(np.float32)
                same = r.random(s) < 0.2
                x[same] = b[same]  # unchanged entries (importance 0)
                margin = arcee_importance_margin(b, x)
                if margin > 1e-3:
                    break
            else:
                raise RuntimeError(f"arcee_fusion/{name}: no input without near-threshold scores")
            c.append(Case(name, x[None], {}, b, f"min |imp - threshold| / threshold = {margin:.2e}"))
    return c


def passthrough_cases() -> list[Case]:
    c = []
    for s in GEO_SHAPES:
        x = randn(f"passthrough/{len(s)}d", s, 1)
        c.append(Case(f"{len(s)}d_noscale", x, {}))
        c.append(Case(f"{len(s)}d_scale", x, {"scale": [0.5]}))
        c.append(Case(f"{len(s)}d_scale0", x, {"scale": [0.0]}))
    return c


# One row per method: name -> case builder. Other method families add their rows here.
METHOD_CASES: dict[str, Callable[[], list[Case]]] = {
    "task_arithmetic": task_arithmetic_cases,
    "ties": ties_cases,
    "dare_linear": lambda: _dare_cases("dare_linear"),
    "dare_ties": lambda: _dare_cases("dare_ties"),
    "breadcrumbs": lambda: _breadcrumbs_cases("breadcrumbs"),
    "breadcrumbs_ties": lambda: _breadcrumbs_cases("breadcrumbs_ties"),
    "della": lambda: _della_cases("della"),
    "della_linear": lambda: _della_cases("della_linear"),
    "sce": sce_cases,
    "linear": linear_cases,
    "slerp": slerp_cases,
    "nuslerp": nuslerp_cases,
    "multislerp": multislerp_cases,
    "karcher": karcher_cases,
    "model_stock": model_stock_cases,
    "nearswap": nearswap_cases,
    "arcee_fusion": arcee_fusion_cases,
    "ram": lambda: _ram_cases("ram"),
    "ramplus_tl": lambda: _ram_cases("ramplus_tl"),
    "passthrough": passthrough_cases,
}

# Methods whose sparsifier draws with torch.bernoulli: which inputs draw (given their density), and whether the
# recorded bernoulli input (della's keep probabilities) is stored.
RANDOMIZED = {
    "dare_linear": ("random", False),
    "dare_ties": ("random", False),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", True),
}


# ---------------------------------------------------------------------------------------------------------------
# Running mergekit and writing files
# ---------------------------------------------------------------------------------------------------------------


def _draws(kind: str, density: float) -> bool:
    """Whether mergekit's sparsifier calls torch.bernoulli for this density (mergekit/sparsify.py)."""
    if density >= 1:
        return False
    return kind == "random" or density > 0


def run_case(method: str, case: Case, dtype: str = "float32") -> tuple[dict[str, np.ndarray], str]:
    """(arrays, the dtype name of mergekit's result) of one case, the inputs cast to `dtype` first."""
    import torch
    from mergekit.merge_methods.api import merge_tensors

    tdt = getattr(torch, dtype)
    tensors = ([] if case.base is None else [torch.from_numpy(case.base.copy()).to(tdt)])
    tensors += [torch.from_numpy(x.copy()).to(tdt) for x in case.xs]
    stored = lambda t: t.to(torch.float32).numpy()  # noqa: E731  (exact: float16/bfloat16 values fit float32)
    calls = []
    original = torch.bernoulli

    def recording_bernoulli(input, *args, **kwargs):
        out = original(input, *args, **kwargs)
        calls.append((input.detach().clone(), out.detach().clone()))
        return out

    torch.manual_seed(case.seed)
    torch.bernoulli = recording_bernoulli
    try:
        y = merge_tensors(tensors, method, parameters=case.params, base_index=None if case.base is None else 0)
    finally:
        torch.bernoulli = original
    arrays = {"xs": stored(torch.from_numpy(case.xs.copy()).to(tdt)), "y": stored(y)}
    if case.base is not None:
        arrays["base"] = stored(tensors[0])
    if method in RANDOMIZED:
        kind, store_probs = RANDOMIZED[method]
        n = case.xs.shape[0]
        dens = case.params.get("density", 1.0)
        dens = list(dens) if isinstance(dens, (list, tuple)) else [dens] * n
        masks = np.ones(case.xs.shape, np.float32)
        probs = np.full(case.xs.shape, np.nan, np.float32)
        drawing = [i for i in range(n) if _draws(kind, float(dens[i]))]
        if len(drawing) != len(calls):
            raise RuntimeError(f"{method}/{case.name}: expected {len(drawing)} bernoulli draws, got {len(calls)}")
        for i, (p, m) in zip(drawing, calls):
            masks[i] = stored(m.reshape(case.xs.shape[1:]))
            probs[i] = stored(p.reshape(case.xs.shape[1:]))
        arrays["masks"] = masks
        if store_probs:
            arrays["probs"] = probs
    elif calls:
        raise RuntimeError(f"{method}/{case.name}: deterministic method drew {len(calls)} random masks")
    return arrays, str(y.dtype).removeprefix("torch.")


def write_method(method: str, cases: list[Case], out_dir: str, dtype: str = "float32") -> str:
    import mergekit  # noqa: F401
    import torch
    from importlib.metadata import version
    from safetensors.numpy import save_file

    tensors, meta = {}, {}
    for case in cases:
        if case.name in meta:
            raise ValueError(f"{method}: duplicate case {case.name!r}")
        arrays, out_dtype = run_case(method, case, dtype)
        for k, v in arrays.items():
            tensors[f"{case.name}/{k}"] = np.ascontiguousarray(v, np.float32)
        meta[case.name] = {"params": case.params, "shape": list(case.xs.shape[1:]), "n": int(case.xs.shape[0]),
                           "base": case.base is not None, "note": case.note, "torch_seed": case.seed}
        if dtype != "float32":
            meta[case.name]["out_dtype"] = out_dtype
    if dtype != "float32":
        out_dir = os.path.join(out_dir, dtype)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{method}.safetensors")
    save_file(tensors, path)
    with open(os.path.join(out_dir, f"{method}.json"), "w") as f:
        head = {"mergekit": version("mergekit"), "torch": torch.__version__, "method": method, "cases": meta}
        if dtype != "float32":
            head["dtype"] = dtype
        json.dump(head, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# `slices:` configs, run through mergekit's full merge on tiny llama checkpoints
# ---------------------------------------------------------------------------------------------------------------

SLICE_MODEL_CONFIG = dict(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=4,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=False)

SLICE_CASES = {
    # SOLAR-style depth up-scaling of one model (4 -> 6 layers), passthrough with scale filters: o_proj/down_proj
    # of the duplicated layers zeroed (source level), layer norms scaled by a gradient (slice level, which also
    # reaches model.norm.weight at t = 0, merged from the last slice), embeddings scaled by the first slice.
    "solar_scale": """
slices:
  - sources:
      - model: {A}
        layer_range: [0, 3]
    parameters:
      scale: [{filter: embed_tokens, value: 0.5}]
  - sources:
      - model: {A}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: 0.0
    parameters:
      scale:
        - filter: norm
          value: [2.0, 0.5]
merge_method: passthrough
dtype: float32
""",
    # Goliath-style frankenmerge: interleaved layer ranges of two models (embeddings from A, final norm and
    # lm_head from B)
    "frankenmerge": """
slices:
  - sources: [{model: {A}, layer_range: [0, 2]}]
  - sources: [{model: {B}, layer_range: [1, 3]}]
  - sources: [{model: {A}, layer_range: [2, 4]}]
  - sources: [{model: {B}, layer_range: [3, 4]}]
merge_method: passthrough
dtype: float32
""",
    # the classic slerp config: one slice over all layers, t by filter with gradients
    "slerp_classic": """
slices:
  - sources:
      - model: {A}
        layer_range: [0, 4]
      - model: {B}
        layer_range: [0, 4]
merge_method: slerp
base_model: {A}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    # slerp over two slices: a slice-level gradient (t over the slice's own 2 layers) before the global setting
    "slerp_two_slices": """
slices:
  - sources:
      - {model: {A}, layer_range: [0, 2]}
      - {model: {B}, layer_range: [2, 4]}
    parameters:
      t: [{filter: mlp, value: [0.1, 0.9]}]
  - sources:
      - {model: {A}, layer_range: [2, 4]}
      - {model: {B}, layer_range: [0, 2]}
merge_method: slerp
base_model: {A}
parameters:
  t: [{filter: self_attn, value: [0.2, 0.6]}, {value: 0.3}]
dtype: float32
""",
    # linear: precedence source > slice > global, per-model filters on the input names, a one-layer slice
    # (t = 1), the source order changing between slices
    "linear_precedence": """
slices:
  - sources:
      - {model: {A}, layer_range: [0, 2], parameters: {weight: [1.0, 0.0]}}
      - {model: {B}, layer_range: [1, 3]}
    parameters: {weight: 0.5}
  - sources:
      - {model: {B}, layer_range: [3, 4]}
      - {model: {A}, layer_range: [2, 3], parameters: {weight: [{filter: layers.2.mlp, value: 2.0}]}}
merge_method: linear
parameters: {weight: 1.0, normalize: true}
dtype: float32
""",
    # mergekit merges the tensors after the layers from the last slice's sources cut to as many as the first
    # slice has (its zip with the first slice's weight list): here model.norm and lm_head come from A alone
    "linear_truncated_post": """
slices:
  - sources:
      - {model: {A}, layer_range: [0, 2]}
  - sources:
      - {model: {A}, layer_range: [2, 4]}
      - {model: {B}, layer_range: [2, 4], parameters: {weight: 3.0}}
merge_method: linear
parameters: {weight: 1.0}
dtype: float32
""",
    # task arithmetic with a slice-level base_model
    "task_arithmetic_slice_base": """
slices:
  - sources:
      - {model: {A}, layer_range: [0, 2]}
      - {model: {B}, layer_range: [0, 2], parameters: {weight: [0.5, 1.0]}}
  - sources:
      - {model: {A}, layer_range: [2, 4], parameters: {weight: 0.25}}
      - {model: {B}, layer_range: [2, 4]}
    base_model: {B}
merge_method: task_arithmetic
base_model: {A}
parameters: {weight: 0.7}
dtype: float32
""",
}


def _tiny_llama(path: str, seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SLICE_MODEL_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(path, safe_serialization=True)


def write_slices(out_dir: str) -> str:
    import tempfile
    from importlib.metadata import version

    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.numpy import load_file, save_file

    tensors, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"A": os.path.join(tmp, "A"), "B": os.path.join(tmp, "B")}
        for seed, (name, path) in enumerate(paths.items()):
            _tiny_llama(path, seed)
            for k, v in load_file(os.path.join(path, "model.safetensors")).items():
                tensors[f"inputs/{name}/{k}"] = v
        with open(os.path.join(paths["A"], "config.json")) as f:
            input_config = json.load(f)
        for case, text in SLICE_CASES.items():
            out = os.path.join(tmp, f"out_{case}")
            config = MergeConfiguration.model_validate(yaml.safe_load(text.replace("{A}", paths["A"])
                                                                      .replace("{B}", paths["B"])))
            run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
            result = load_file(os.path.join(out, "model.safetensors"))
            for k, v in result.items():
                tensors[f"{case}/{k}"] = np.ascontiguousarray(v, np.float32)
            with open(os.path.join(out, "config.json")) as f:
                layers = json.load(f)["num_hidden_layers"]
            meta[case] = {"yaml": text, "num_hidden_layers": layers, "tensors": sorted(result)}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "slices.safetensors")
    save_file(tensors, path)
    with open(os.path.join(out_dir, "slices.json"), "w") as f:
        json.dump({"mergekit": version("mergekit"), "torch": torch.__version__,
                   "transformers": version("transformers"), "input_config": input_config, "cases": meta}, f,
                  indent=1, sort_keys=True)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Whole YAML merges in a reduced dtype (mergekit's shipped examples, on tiny stand-ins), for the compute-dtype mode
# ---------------------------------------------------------------------------------------------------------------

# Inputs: A (the tiny llama of seed 0) and two "fine-tunes" B = A + 0.02·N(0, 1), C = A + 0.02·N(0, 1) (seeds 1, 2):
# task vectors small against the weights, as in a real merge, so rounding x − b in float16 matters.
YAML_DTYPE_CASES = {
    # examples/bio-merge.yml: ties, float16, normalize false, int8_mask
    "bio_merge_f16": """
models:
  - model: {B}
    parameters: {density: 0.5, weight: 0.5}
  - model: {C}
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: {A}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    # the README's ties example: density/weight gradients and filters, float16
    "ties_gradients_f16": """
models:
  - model: {A}
  - model: {B}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {C}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: {A}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    # examples/arcee_fusion.yml: bfloat16 (mergekit writes float32)
    "arcee_fusion_bf16": """
models:
  - model: {A}
  - model: {B}
merge_method: arcee_fusion
base_model: {A}
dtype: bfloat16
""",
    # task arithmetic with lambda in bfloat16, written as float32
    "task_arithmetic_bf16_out32": """
models:
  - model: {B}
    parameters: {weight: 0.7}
  - model: {C}
    parameters: {weight: 0.6}
merge_method: task_arithmetic
base_model: {A}
parameters: {lambda: 0.9}
dtype: bfloat16
out_dtype: float32
""",
    # examples/gradient-slerp.yml (on 4-layer stand-ins): SLICE_CASES' slerp_classic in float16 (added below)
    # examples/orcamini-platy-44layer.yml (on 4-layer stand-ins): a passthrough frankenmerge, float16, 6 layers
    "frankenmerge_f16": """
slices:
  - sources:
    - model: {A}
      layer_range: [0, 3]
  - sources:
    - model: {C}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    # breadcrumbs with ties, float16
    "breadcrumbs_ties_f16": """
models:
  - model: {B}
    parameters: {density: 0.6, gamma: 0.05, weight: 0.5}
  - model: {C}
    parameters: {density: 0.6, gamma: 0.05, weight: 0.5}
merge_method: breadcrumbs_ties
base_model: {A}
dtype: float16
""",
}


YAML_DTYPE_CASES["gradient_slerp_f16"] = SLICE_CASES["slerp_classic"].replace("dtype: float32", "dtype: float16")


def _tiny_llama_near(path: str, base_path: str, seed: int, scale: float = 0.02) -> None:
    """A copy of the tiny llama at base_path with every parameter moved by scale·N(0, 1) (torch seed `seed`)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def write_yaml_dtypes(out_dir: str) -> str:
    """tests/golden/mergekit_0.1.5/yaml_dtypes.{safetensors,json}: "inputs/{A,B,C}/<hf name>" and, per case of
    YAML_DTYPE_CASES, "<case>/<hf name>" (mergekit's output, as float32 values) with the json recording each output
    tensor's dtype as mergekit wrote it."""
    import tempfile
    from importlib.metadata import version

    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    tensors, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: os.path.join(tmp, n) for n in ("A", "B", "C")}
        _tiny_llama(paths["A"], 0)
        _tiny_llama_near(paths["B"], paths["A"], 1)
        _tiny_llama_near(paths["C"], paths["A"], 2)
        for name, path in paths.items():
            for k, v in load_file(os.path.join(path, "model.safetensors")).items():
                tensors[f"inputs/{name}/{k}"] = v
        with open(os.path.join(paths["A"], "config.json")) as f:
            input_config = json.load(f)
        for case, text in YAML_DTYPE_CASES.items():
            out = os.path.join(tmp, f"out_{case}")
            for n, path in paths.items():
                text_n = text.replace("{" + n + "}", path)
                text = text_n
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            run_merge(config, out, MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
            dtypes = {}
            with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    dtypes[k] = str(t.dtype).removeprefix("torch.")
                    tensors[f"{case}/{k}"] = t.to(torch.float32).numpy()
            with open(os.path.join(out, "config.json")) as f:
                layers = json.load(f)["num_hidden_layers"]
            meta[case] = {"yaml": YAML_DTYPE_CASES[case], "dtypes": dtypes, "num_hidden_layers": layers}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "yaml_dtypes.safetensors")
    save_file(tensors, path)
    with open(os.path.join(out_dir, "yaml_dtypes.json"), "w") as f:
        json.dump({"mergekit": version("mergekit"), "torch": torch.__version__,
                   "transformers": version("transformers"), "input_config": input_config, "cases": meta}, f,
                  indent=1, sort_keys=True)
        f.write("\n")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("methods", nargs="*",
                    help=f"methods to write (default: all of {sorted(METHOD_CASES)} and 'slices')")
    ap.add_argument("--out", default=OUT_DIR)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="cast the inputs to this dtype first (mergekit computes in it); not for 'slices'")
    args = ap.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHOD_CASES and m not in ("slices", "yaml_dtypes")]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(METHOD_CASES)}, 'slices' and 'yaml_dtypes'")
    if args.methods == ["yaml_dtypes"]:
        path = write_yaml_dtypes(args.out)
        print(f"yaml_dtypes: {os.path.getsize(path)} bytes -> {os.path.relpath(path)}")
        return
    for method in args.methods or list(METHOD_CASES) + ["slices"]:
        if method == "slices" and args.dtype != "float32":
            if args.methods:
                raise SystemExit("'slices' has float32 goldens only")
            continue
        path = (write_slices(args.out) if method == "slices"
                else write_method(method, METHOD_CASES[method](), args.out, args.dtype))
        print(f"{method}: {os.path.getsize(path)} bytes -> {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
