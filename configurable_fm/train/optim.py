"""Optimizers and learning-rate schedules.

Schedules (step s, peak lr eta, warmup W, total S, floor eta_min = min_lr_ratio * eta):
  cosine:   linear warmup 0 -> eta over W steps, then eta_min + (eta - eta_min) * (1 + cos(pi * t)) / 2, t = (s-W)/(S-W)
  wsd:      warmup-stable-decay: linear warmup, constant eta, then linear decay to eta_min over the last
            `decay_fraction` of the steps, or over all the steps after the warmup if fewer (Hu et al., MiniCPM,
            2024)
  constant: linear warmup then eta
Re-warming (after growth, train/growth.py; optional keys, absent or 0 = off): with optimizer.rewarm_at = g > 0 the
schedule is the one above for s < g, and from g the same kind of schedule restarted over the remaining S - g
steps with warmup optimizer.rewarm_steps = R (0 -> eta right away, MSG's rewind to the peak):
  lr(s) = sched_{W, S}(s)              for s < g
  lr(s) = sched_{R, S - g}(s - g)      for s >= g   (linear 0 -> eta over R steps, then the decay to eta_min by S)
Steps count from the start of the run, so a grown run that keeps its step counter re-warms at its growth step.
Optimizer: AdamW (decoupled weight decay on matrices only: parameters with ndim >= 2), after clipping the
global gradient norm to `grad_clip` (0 disables).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from configurable_fm.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The schedule of the module docstring (with the re-warm at optimizer.rewarm_at when set)."""
    at, rewarm = int(opt.get("rewarm_at", 0) or 0), int(opt.get("rewarm_steps", 0) or 0)
    if at or rewarm:
        if not 0 < at < total_steps:
            raise ConfigError(f"optimizer.rewarm_at={at} must lie in 1..steps-1={total_steps - 1} "
                             f"(optimizer.rewarm_steps={rewarm} needs it)")
        if not 0 <= rewarm < total_steps - at:
            raise ConfigError(f"optimizer.rewarm_steps={rewarm} must lie in 0..{total_steps - at - 1} (the steps "
                             f"left after optimizer.rewarm_at={at})")
        return optax.join_schedules([_schedule(opt, int(opt.warmup_steps), total_steps),
                                     _schedule(opt, rewarm, total_steps - at)], [at])
    return _schedule(opt, int(opt.warmup_steps), total_steps)


def _schedule(opt: ml_collections.ConfigDict, warmup: int, total_steps: int) -> optax.Schedule:
    peak = opt.lr
    floor = peak * opt.get("min_lr_ratio", 0.1)
    if warmup >= total_steps and total_steps > 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} must be smaller than steps={total_steps}")
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if opt.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), alpha=floor / peak if peak else 0.0)
    elif opt.schedule == "wsd":
        # the decay ends at S: shortened to the steps after the warmup when those are fewer
        decay = max(min(int(round(opt.get("decay_fraction", 0.2) * total_steps)), total_steps - warmup), 1)
        stable = total_steps - warmup - decay
        rest = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [stable])
    elif opt.schedule == "constant":
        rest = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"optimizer.schedule={opt.schedule!r} is unknown; choose one of {SCHEDULES}")
    return optax.join_schedules([warm, rest], [warmup]) if warmup else rest


def decay_mask(params):
    """True for parameters that get weight decay (matrices and embeddings; not norms or biases)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    if opt.name != "adamw":
        raise ConfigError(f"optimizer.name={opt.name!r} is unknown; supported: ['adamw']")
    schedule = learning_rate_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
