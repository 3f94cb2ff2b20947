"""TEAL's block-wise greedy allocation of sparsity levels (Liu et al. 2024, Sec. 4.2 and teal/greedyopt.py there):
within each block (decoder layer), the Linears that lose the least accuracy when sparsified get more sparsity.

    cal = calibrate(model, batches)
    alloc = greedy_allocation(model, cal, few_batches, levels=(0.4, 0.5))     # {level: {path: p}}
    sparse = sparsify_activations(model, cal.thresholds(alloc[0.5]))

For each block B (the `layers.<i>` / `h.<i>` holding the targeted Linears), with units l (its targeted Linears),
weights w_l = in_l out_l (the weights a sparse kernel skips) and y*(x) the dense block output on the dense block
input x (both captured once from the dense model over `batches`):
    start with p_l = 0 for every unit;
    repeat until the block's sparsity S_B = sum_l w_l p_l / sum_l w_l reaches the highest level:
        for every unit l with p_l + d_l <= max_sparsity: E_l = mean over tokens ||y_B(p + d_l e_l) - y*||^2,
            where y_B(p) is the block run on the dense input with thresholds t_{p_l} (the calibration quantiles);
        p_k += d_k for k = argmin_l E_l;
        the first time S_B >= a level, the allocation p is that level's.
The step d_l = step * mean_l(w) / w_l makes every step raise S_B by the same amount (step / number of units), as
TEAL's per-projection steps (base_step / relative weight) do. Differences from TEAL's code: the error is the mean
squared error over all scored tokens (TEAL: the norm over the positions of the last quarter of each sequence,
averaged over features); the units are the targeted Linears whatever the family (TEAL: q, k, v, o, gate, up, down);
each unit's level is capped at max_sparsity.

Every block sees the dense input (an intervention replaces `<block>.input` by the captured dense value), so the
blocks are independent: one forward evaluates candidate unit j of every block at once (the j-th targeted Linear of
each block, in tree order), and one greedy iteration costs (units per block) forwards over `batches`. The captured
block inputs and outputs are held in memory (2 x tokens x width floats per block): use a few thousand tokens.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import batch_inputs, token_mask
from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.interventions import replace
from configurable_fm.analysis.sparsity.calibration import Calibration, check_sparsity
from configurable_fm.analysis.sparsity.module import SparsityError, module_paths, sparsify_activations
from configurable_fm.checks import is_real

_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def blocks_of(paths: Sequence[str]) -> dict[str, list[str]]:
    """{block path: [its paths, in order]}: a path's block is its prefix up to the first list index
    ('layers.3.mlp.down_proj' -> 'layers.3'); SparsityError for a path in no block."""
    out: dict[str, list[str]] = {}
    for p in paths:
        m = _BLOCK.match(p)
        if m is None:
            raise SparsityError(f"greedy_allocation: {p} is in no block (a path under a list such as layers.<i>)")
        out.setdefault(m.group(1), []).append(p)
    return out


def _set_thresholds(model, thresholds: Mapping[str, Any]):
    modules = module_paths(model)
    for p, t in thresholds.items():
        modules[p].threshold.set_value(t)


def _forward(inputs, attention):
    """What capture runs: the ids, or model(ids, attention_mask=...) for a batch with an attention mask."""
    return inputs if attention is None else (lambda m: m(inputs, attention_mask=attention))


def _capture_step(graphdef, blocks: tuple, state, inputs, attention):
    model = nnx.merge(graphdef, state)
    points = [f"{b}.{k}" for b in blocks for k in ("input", "output")]
    _, values = capture(model, points, _forward(inputs, attention))
    return values


def _error_step(graphdef, blocks: tuple, state, thresholds, inputs, attention, dense, m_BxT):
    model = nnx.merge(graphdef, state)
    _set_thresholds(model, thresholds)
    patch = {f"{b}.input": replace(dense[f"{b}.input"]) for b in blocks}
    _, values = capture(model, [f"{b}.output" for b in blocks], _forward(inputs, attention), interventions=patch)
    out = []
    for b in blocks:
        d = values[f"{b}.output"].astype(jnp.float32) - dense[f"{b}.output"].astype(jnp.float32)
        out.append(jnp.sum(jnp.sum(d * d, axis=-1) * m_BxT))
    return jnp.stack(out)


_capture_jit = jax.jit(_capture_step, static_argnums=(0, 1))
_error_jit = jax.jit(_error_step, static_argnums=(0, 1))


def greedy_allocation(model, calibration: Calibration, batches: Iterable[Mapping[str, Any]], *,
                      levels: Sequence[float] = (0.25, 0.4, 0.5, 0.6), step: float = 0.05,
                      max_sparsity: float = 0.95, max_iterations: int = 10000,
                      log: Optional[Callable[[str], None]] = None) -> dict[float, dict[str, float]]:
    """{level: {path: p}}: the block-wise greedy allocation of each level (module docstring) over the Linears of
    `calibration`, measured on `batches` (pipeline dicts, held in memory with the captured block values).
    SparsityError for levels outside (0, max_sparsity], a non-positive step, or no batches."""
    levels = sorted({check_sparsity(lv, "greedy_allocation level") for lv in levels})
    max_sparsity = check_sparsity(max_sparsity, "greedy_allocation max_sparsity")
    if not levels or levels[0] <= 0 or levels[-1] > max_sparsity:
        raise SparsityError(f"greedy_allocation: levels must lie in (0, max_sparsity={max_sparsity}], got {levels}")
    if not is_real(step) or not 0 < step < 1:
        raise SparsityError(f"greedy_allocation: step must be a number in (0, 1), got {step!r}")
    batches = list(batches)
    if not batches:
        raise SparsityError("greedy_allocation: no batches")
    say = log or (lambda _: None)
    groups = blocks_of(calibration.paths)
    names = tuple(groups)
    units = max(len(v) for v in groups.values())
    weight = {p: float(np.prod(calibration.shapes[p])) for p in calibration.paths}
    delta = {}
    for ps in groups.values():
        mean_w = np.mean([weight[p] for p in ps])
        delta.update({p: step * mean_w / weight[p] for p in ps})

    sparse = sparsify_activations(model, {p: -1.0 for p in calibration.paths}, score=calibration.score,
                                  scales=calibration.scales)  # the thresholds are on the calibration's scale
    graphdef, state = nnx.split(sparse)
    data = []
    for i, batch in enumerate(batches):
        inputs = jnp.asarray(batch_inputs(batch, f"greedy_allocation: batch {i}"))
        mask = jnp.asarray(token_mask(batch, f"greedy_allocation: batch {i}"))  # checks attention_mask's shape too
        attention = jnp.asarray(batch["attention_mask"], jnp.int32) if "attention_mask" in batch else None
        data.append((inputs, attention, _capture_jit(graphdef, names, state, inputs, attention), mask))

    def block_errors(alloc: Mapping[str, float]) -> np.ndarray:
        th = calibration.thresholds(dict(alloc))
        t = {p: jnp.asarray(th[p] if alloc[p] > 0 else -1.0, jnp.float32) for p in th}  # -1: the dense Linear
        return sum(np.asarray(_error_jit(graphdef, names, state, t, x, a, d, m), np.float64) for x, a, d, m in data)

    alloc = {p: 0.0 for p in calibration.paths}
    found: dict[float, dict[str, float]] = {lv: {} for lv in levels}
    block_sparsity = {b: 0.0 for b in names}
    active = set(names)
    for it in range(max_iterations):
        if not active:
            break
        errors = np.full((units, len(names)), np.inf)
        for j in range(units):
            cand = dict(alloc)
            tried = []
            for bi, b in enumerate(names):
                if b in active and j < len(groups[b]):
                    p = groups[b][j]
                    if alloc[p] + delta[p] <= max_sparsity + 1e-12:
                        cand[p] = alloc[p] + delta[p]
                        tried.append(bi)
            if tried:
                e = block_errors(cand)
                errors[j, tried] = e[tried]
        for bi, b in enumerate(names):
            if b not in active:
                continue
            j = int(np.argmin(errors[:, bi]))
            if not np.isfinite(errors[j, bi]):
                raise SparsityError(f"greedy_allocation: {b} cannot reach sparsity {levels[-1]} with every Linear "
                                    f"at most {max_sparsity} (it has {block_sparsity[b]:.3f})")
            p = groups[b][j]
            alloc[p] += delta[p]
            ws = [weight[q] for q in groups[b]]
            block_sparsity[b] = float(np.dot(ws, [alloc[q] for q in groups[b]]) / np.sum(ws))
            for lv in levels:
                if block_sparsity[b] >= lv - 1e-9 and not any(q in found[lv] for q in groups[b]):
                    found[lv].update({q: alloc[q] for q in groups[b]})
            if block_sparsity[b] >= levels[-1] - 1e-9:
                active.discard(b)
        say(f"greedy_allocation: iteration {it + 1}, block sparsity "
            f"{min(block_sparsity.values()):.3f}..{max(block_sparsity.values()):.3f}")
    if active:
        raise SparsityError(f"greedy_allocation: {sorted(active)[:4]} did not reach {levels[-1]} in "
                            f"{max_iterations} iterations")
    return found
