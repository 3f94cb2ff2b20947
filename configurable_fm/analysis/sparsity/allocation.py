"""Sparsity levels allocated across Linears by measured sensitivity: each targeted Linear is sparsified alone at each
level of a grid and the loss increase measured; the levels then minimise the summed increase under a target mean
sparsity (an exact multiple-choice knapsack, solved by dynamic programming). Where TEAL's greedy search
(greedy.py) shares sparsity among the Linears of one block, this shares it among blocks: with the FFN down
projections as the targets, sensitive layers keep more of their neurons and robust ones fewer, at the same mean.

    sens = sensitivity(model, cal, batches, paths=down_projs, levels=(0.3, 0.35, ..., 0.8), metric="kl")
    alloc = allocate_levels(sens.increase, target=0.5)            # {path: level}, mean level >= 0.5
    sparse = sparsify_activations(model, {**dense, **cal.thresholds(alloc)})

Sensitivity (one jitted forward per (Linear, level), on a model whose other targets are dense), by `metric`:
    'nll': D_l(p) = NLL(model with only l sparse at its calibrated threshold t_p) - NLL(dense model),
    'kl':  D_l(p) = mean_t KL(dense_t || model with only l sparse at t_p)   (measure.mean_kl),
NLL the mean next-token loss over `batches` (float64 sums). Both estimate the same rise of the loss (for a dense
model that predicts the data well, the expected NLL rise is the KL), but the NLL difference carries the sampling
noise of the observed targets: on SmolLM2-135M with 2,048 tokens the single-layer rises at 50% (~1e-3 nats) were
the size of that noise, several negative, and the knapsack fitted noise (results/sparsity/README.md). The KL is
non-negative and far less noisy (it averages over the whole next-token distribution at every position); it costs
the dense logits of `batches` held in memory (B T V float32 per batch).
Allocation, with integer weights r_l (w_l over their gcd, e.g. w_l = in_l out_l, or 1 for equal weights) and levels
on a grid p = k s:
    minimise sum_l D_l(p_l)   subject to   sum_l r_l k_l >= ceil(target sum_l r_l / s - 1e-9),
by F_l(B) = min_k [F_{l-1}(B - r_l k) + D_l(k s)] over the budget B, exact for the measured D. Level 0 (dense,
D = 0) is always a choice. That the increases add is an assumption (first order, as in layer-wise sparsity
allocation for pruning); evaluating the allocated model on held-out data is the check.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from configurable_fm.analysis.sparsity.calibration import Calibration, check_sparsity
from configurable_fm.analysis.sparsity.measure import evaluate, mean_kl, next_token_logits
from configurable_fm.analysis.sparsity.module import SparsityError, sparsify_activations


@dataclasses.dataclass
class Sensitivity:
    """increase {path: {level: D_l(level)}} (module docstring); dense_nll the dense model's mean NLL; tokens scored;
    metric 'nll' or 'kl'."""

    increase: dict[str, dict[float, float]]
    dense_nll: float
    tokens: int
    metric: str = "nll"


METRICS = ("nll", "kl")


def sensitivity(model, calibration: Calibration, batches: Iterable[Mapping[str, Any]], *, paths: Sequence[str],
                levels: Sequence[float], metric: str = "nll",
                log: Optional[Callable[[str], None]] = None) -> Sensitivity:
    """D_l(p) for every path in `paths` and level in `levels` by `metric` ('nll' or 'kl', module docstring), on
    `batches` (held in a list: every configuration reads them again). All calibrated Linears become SparseLinears,
    dense (threshold -1) except the one measured, so one compiled forward serves every configuration. `model` is
    not modified."""
    if metric not in METRICS:
        raise SparsityError(f"sensitivity: metric {metric!r} is not one of {METRICS}")
    batches = list(batches)
    levels = [check_sparsity(p, "sensitivity") for p in levels]
    unknown = [p for p in paths if p not in calibration.counts]
    if unknown or not paths:
        raise SparsityError(f"sensitivity: paths {unknown[:4] or '(none)'} not calibrated; calibrated paths are "
                            f"e.g. {calibration.paths[:4]}")
    dense = {p: -1.0 for p in calibration.paths}
    as_scored = dict(score=calibration.score, scales=calibration.scales)  # thresholds are on the calibration's scale
    dense_model = sparsify_activations(model, dense, **as_scored)
    base = evaluate(dense_model, batches)
    dense_nll = base.mean_nll()
    reference = next_token_logits(dense_model, batches) if metric == "kl" else None
    increase: dict[str, dict[float, float]] = {}
    for i, path in enumerate(paths):
        increase[path] = {}
        for p in levels:
            sparse = sparsify_activations(model, {**dense, **calibration.thresholds({path: p})}, **as_scored)
            if metric == "kl":
                increase[path][p] = mean_kl(sparse, batches, reference)
            else:
                increase[path][p] = evaluate(sparse, batches).mean_nll() - dense_nll
        if log is not None:
            log(f"sensitivity {i + 1}/{len(paths)} {path}: " + ", ".join(
                f"{p:.2f}: {d:+.4f}" for p, d in increase[path].items()))
    return Sensitivity(increase=increase, dense_nll=dense_nll, tokens=base.scored_tokens(), metric=metric)


def grid_index(level: float, step: float, where: str) -> int:
    """k with level = k * step (to 1e-6 of a step); SparsityError otherwise."""
    k = round(level / step)
    if abs(k * step - level) > 1e-6 * step:
        raise SparsityError(f"{where}: level {level} is not a multiple of the grid step {step}")
    return int(k)


def integer_weights(weights: Mapping[str, float]) -> dict[str, int]:
    """{path: w / g}: g the gcd of the weights when they are all integers (in x out products), else the smallest
    weight, whose ratios must then be integers (to 1e-6); SparsityError otherwise or for a weight <= 0."""
    smallest = min(weights.values())
    if smallest <= 0:
        raise SparsityError(f"allocate_levels: weights must be positive, got {smallest}")
    if all(float(w) == int(w) for w in weights.values()):
        g = math.gcd(*(int(w) for w in weights.values()))
        return {path: int(w) // g for path, w in weights.items()}
    out = {}
    for path, w in weights.items():
        r = w / smallest
        if abs(r - round(r)) > 1e-6 * r:
            raise SparsityError(f"allocate_levels: the weight of {path} is {r:.6g} x the smallest, not an integer "
                                "multiple; pass equal weights (weights=None) or integer-ratio weights")
        out[path] = int(round(r))
    return out


def allocate_levels(increase: Mapping[str, Mapping[float, float]], target: float, *,
                    weights: Optional[Mapping[str, float]] = None, step: Optional[float] = None) -> dict[str, float]:
    """The levels {path: p} minimising sum D_l(p_l) with weighted mean sparsity >= target (module docstring).
    `increase` as Sensitivity.increase; `weights` {path: w} (None: equal); `step` the grid of the levels (None:
    the largest step dividing them all, found from the levels to 1e-6). SparsityError for a target no allocation
    reaches (above the highest level), weights or levels off the integer grid."""
    target = check_sparsity(target, "allocate_levels")
    paths = list(increase)
    if not paths:
        raise SparsityError("allocate_levels: no Linears")
    levels = sorted({float(p) for d in increase.values() for p in d})
    if step is None:
        step = _grid_step(levels)
    r = integer_weights(weights) if weights is not None else {p: 1 for p in paths}
    missing = [p for p in paths if p not in r]
    if missing:
        raise SparsityError(f"allocate_levels: no weight for {missing[:4]}")
    choices = []  # per path: [(k, D)] including level 0
    for path in paths:
        opts = {0: 0.0}
        for p, d in increase[path].items():
            opts[grid_index(float(p), step, f"allocate_levels ({path})")] = float(d)
        choices.append(sorted(opts.items()))
    total_r = sum(r[p] for p in paths)
    need = math.ceil(target * total_r / step - 1e-9)
    top = sum(r[p] * choices[i][-1][0] for i, p in enumerate(paths))
    if need > top:
        raise SparsityError(f"allocate_levels: target {target} is above what the levels reach "
                            f"({top * step / total_r:.3f} with every Linear at its highest level)")
    # F[B] = least summed increase with budget exactly B; argk[i][B] = the k chosen for path i
    F = np.full(top + 1, np.inf)
    F[0] = 0.0
    picks = []
    for i, path in enumerate(paths):
        G = np.full(top + 1, np.inf)
        arg = np.zeros(top + 1, np.int64)
        for k, d in choices[i]:
            shift = r[path] * k
            cand = np.full(top + 1, np.inf)
            cand[shift:] = F[:top + 1 - shift] + d
            better = cand < G
            G[better], arg[better] = cand[better], k
        F = G
        picks.append(arg)
    B = need + int(np.argmin(F[need:]))
    alloc = {}
    for i in range(len(paths) - 1, -1, -1):
        k = int(picks[i][B])
        alloc[paths[i]] = round(k * step, 10)
        B -= r[paths[i]] * k
    assert B == 0, B
    return {p: alloc[p] for p in paths}


def _grid_step(levels: Sequence[float]) -> float:
    """The largest s (a multiple of 1e-6) with every level an integer multiple of s."""
    micro = [round(p * 1_000_000) for p in levels if p > 0]
    if not micro:
        raise SparsityError("allocate_levels: no positive level")
    return math.gcd(*micro) / 1_000_000
