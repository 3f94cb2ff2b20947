"""Keeping an activation-sparse model at its level while it trains: a task that moves each SparseLinear's threshold
(analysis/sparsity/module.py) towards a target sparsity from the fraction that each training forward zeroes.

    task = SparsityTrackingTask(inner=DistillTask(teacher="smollm2-135m-instruct"), level=0.75)
    train(config, workdir, model=sparse_model, task=task)
    task_from_config({'kind': 'distill', 'teacher': SOURCE, 'track_sparsity': 0.75, 'track_rate': 1.0})

Why: thresholds are calibrated on the model before recovery training (LoRA, distillation); training changes the
inputs of the sparse Linears, so the same thresholds zero a different fraction afterwards (the CPU recoveries of
results/moefication/README.md ended below 75% with their old thresholds; re-calibrating them moved the perplexity
by -0.9 to +1.2 points), and the recovered model was trained at a level it is then not used at. Re-calibrating
after training restores the level but not the training.

The rule. For each tracked SparseLinear l with threshold t_l > 0, one training micro-batch's forward gives its
scores a (B, T, F) (the module's `.score` tap: |x|, or |x| ||W_i|| for the weighted score) and with them

    z_l(s) = (1 / (B T F)) sum_{b,t,i} [a_bti <= s]     the fraction of the input entries a threshold s zeroes
    z_l    = z_l(t_l)                                   what this forward zeroed (every position of the micro-batch)
    g_l    = (z_l(t_l e^d) - z_l(t_l e^-d)) / (2 d)     the slope dz/dlog s, measured on the same scores (d = 0.1)

and after the loss the threshold becomes

    t_l <- t_l * exp(clip(rate * (level - z_l) / max(g_l, g_min), -max_step, max_step))

a damped Newton step on log t_l towards z_l = level, with the slope of this batch's own score distribution (so it
needs no knowledge of the scores' scale or spread: one step lands at the level when the distribution does not
move; g_min = 0.05, max_step = 1, i.e. at most a factor e per step). rate = 1 is the full step; smaller rates
average over batches. The loss of a micro-batch is computed with the thresholds it starts with; the new ones are
used from the next micro-batch on. The thresholds are SparsityThreshold variables (not parameters), so the
trainer carries them in its 'other' partition and checkpoints them (train/task.py): a resumed run continues from
the saved thresholds. Cost: three compare-and-mean passes over each tracked Linear's scores per micro-batch.

Evaluation (eval_loss) leaves the thresholds alone and reports the achieved sparsity of the scored rows.
Metrics: the inner task's, plus `sparsity` (the mean z_l over the tracked Linears) and `sparsity_spread`
(max_l |z_l - level|); at evaluation val_sparsity, val_sparsity_spread.

Limits: the task runs the forward under a tap session (analysis/taps.py), so the llama layers run without remat
(more activation memory), and it cannot wrap a task that opens a session of its own (MoETask: ConfigError).
Thresholds <= 0 (a dense Linear, or one zeroing only exact zeros) cannot be scaled: setup() refuses them.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.sparsity import sparse_linears
from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.checks import is_finite_real
from configurable_fm.errors import ConfigError
from configurable_fm.train.moe import MoETask
from configurable_fm.train.task import NextTokenTask, Task, eval_loss, set_up_task

METRICS = ("sparsity", "sparsity_spread")
SLOPE_STEP, MIN_SLOPE, MAX_STEP = 0.1, 0.05, 1.0  # d, g_min and max_step of the update (module docstring)


def fraction_below(scores, t, row_mask=None) -> jax.Array:
    """The float32 fraction of entries of `scores` (B, T, ..., F) that are <= t (what a threshold t zeroes; NaN
    scores are kept, as SparseLinear keeps them) over the rows whose `row_mask` (B,) is 1 (all when None); no
    gradient."""
    zeroed = jax.lax.stop_gradient(scores <= t).astype(jnp.float32)
    if row_mask is None:
        return jnp.mean(zeroed)
    w = jnp.asarray(row_mask, jnp.float32).reshape((-1,) + (1,) * (zeroed.ndim - 1))
    per_row = zeroed.size // zeroed.shape[0]
    return jnp.sum(zeroed * w) / jnp.maximum(jnp.sum(w) * per_row, 1.0)


def tracked_threshold(t, scores, level: float, rate: float, row_mask=None) -> tuple[jax.Array, jax.Array]:
    """(the new threshold, z = the fraction that t zeroes in `scores`): t * exp(clip(rate (level - z) / max(g,
    g_min), -max_step, max_step)) with g the measured slope dz/dlog t (module docstring), float32, no gradient."""
    scores = jax.lax.stop_gradient(scores)
    t = jnp.asarray(t, jnp.float32)
    z = fraction_below(scores, t, row_mask)
    slope = (fraction_below(scores, t * math.exp(SLOPE_STEP), row_mask)
             - fraction_below(scores, t * math.exp(-SLOPE_STEP), row_mask)) / (2 * SLOPE_STEP)
    step = jnp.clip(rate * (level - z) / jnp.maximum(slope, MIN_SLOPE), -MAX_STEP, MAX_STEP)
    return (t * jnp.exp(step)).astype(jnp.float32), z


def _number(name: str, value, low: float, high: float | None = None) -> float:
    ok = is_finite_real(value) and value > low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bounds = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ConfigError(f"SparsityTrackingTask: {name}={value!r} must be a number {bounds}")
    return float(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparsityTrackingTask(Task):
    """`inner`'s loss; after it, every tracked SparseLinear's threshold moves towards `level` (module docstring).
    paths: globs over the SparseLinear paths to track (all of them by default). A pytree whose array leaves are the
    inner task's, so they reach the compiled step as arguments."""

    inner: Any = dataclasses.field(default_factory=NextTokenTask)
    level: float = dataclasses.field(default=0.5, metadata=dict(static=True))
    rate: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    paths: tuple[str, ...] = dataclasses.field(default=("**",), metadata=dict(static=True))

    def __post_init__(self):
        _number("level", self.level, 0.0, 1.0)
        _number("rate", self.rate, 0.0)
        if isinstance(self.inner, MoETask):
            raise ConfigError("SparsityTrackingTask cannot wrap a MoETask: both run the forward under a tap session, "
                              "and sessions do not nest")
        if isinstance(self.paths, str) or not self.paths or not all(isinstance(p, str) and p for p in self.paths):
            raise ConfigError(f"SparsityTrackingTask: paths are a non-empty tuple of globs, got {self.paths!r}")

    def tracked(self, model) -> dict:
        """{path: SparseLinear} of the modules of `model` that `paths` selects (tree order); ConfigError when none."""
        found = sparse_linears(model)
        if not found:
            raise ConfigError("SparsityTrackingTask: the model has no activation-sparsity modules (SparseLinear) "
                              "whose thresholds could be tracked; sparsify it first (scripts/sparsify.py)")
        rx = [re.compile(glob_to_regex(p)) for p in self.paths]
        chosen = {p: m for p, m in found.items() if any(r.fullmatch(p) for r in rx)}
        if not chosen:
            names = list(found)
            raise ConfigError(f"SparsityTrackingTask: paths {list(self.paths)} select none of the model's "
                              f"SparseLinears ({names[:4]}{' ...' if len(names) > 4 else ''})")
        return chosen

    def setup(self, model, trainable: Sequence[str]) -> "SparsityTrackingTask":
        chosen = self.tracked(model)
        bad = [p for p, m in chosen.items() if not float(m.threshold.get_value()) > 0]
        if bad:
            raise ConfigError(f"SparsityTrackingTask: the thresholds of {bad[:4]}{' ...' if len(bad) > 4 else ''} "
                              "are <= 0 and cannot be scaled towards a level; calibrate them first")
        selected = sorted(p for p in trainable if any(p == f"{q}.threshold" for q in chosen))
        if selected:
            raise ConfigError(f"SparsityTrackingTask: config.trainable selects thresholds ({selected[:4]}); the "
                              "task sets them from the achieved sparsity, so they must stay untrained")
        return dataclasses.replace(self, inner=set_up_task(self.inner, model, trainable))

    def _run(self, model, call):
        """(inner loss, inner metrics, {path: (its threshold variable, its scores)}) of `call(model)`, every
        tracked `.score` point captured."""
        chosen = self.tracked(model)
        (loss, metrics), scores = capture(model, [f"{p}.score" for p in chosen], call)
        clash = sorted(set(METRICS) & set(metrics))
        if clash:
            raise ConfigError(f"SparsityTrackingTask: the inner task returns metric(s) {clash}, names this task logs")
        return loss, metrics, {p: (m.threshold, scores[f"{p}.score"]) for p, m in chosen.items()}

    def _with_metrics(self, metrics, zeroed) -> dict:
        z = jnp.stack(list(zeroed.values()))
        return {**metrics, "sparsity": jnp.mean(z), "sparsity_spread": jnp.max(jnp.abs(z - self.level))}

    def loss(self, model, batch, step, rng):
        loss, metrics, tracked = self._run(model, lambda m: self.inner.loss(m, batch, step, rng))
        zeroed = {}
        for path, (var, a) in tracked.items():
            new, zeroed[path] = tracked_threshold(var.get_value(), a, self.level, self.rate)
            var.set_value(new)
        return loss, self._with_metrics(metrics, zeroed)

    def eval_loss(self, model, batch, step):
        loss, metrics, tracked = self._run(model, lambda m: eval_loss(self.inner, m, batch, step))
        zeroed = {p: fraction_below(a, var.get_value(), batch.get("mask")) for p, (var, a) in tracked.items()}
        return loss, self._with_metrics(metrics, zeroed)
