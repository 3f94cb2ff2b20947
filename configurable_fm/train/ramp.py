"""Fading grown structure in during training (MSG): a task that sets every growth mask's ramp from the step.

    grown = grow_masked(model, intermediate_size=3072, num_layers=40, key=jax.random.key(0))   # ops/grow/masked.py
    train(config, workdir, model=grown, task=MaskRampTask(start=0, steps=5000))
    task = task_from_config(config.get("task"))     # {'kind': 'mask_ramp', 'start': 0, 'steps': 5000}

At step s (1 for the first step, as the trainer numbers them) every GrowthRamp variable of the model is set to

    r(s) = clip((s - start) / steps, 0, 1)

before the inner task's loss is computed: r = 0 up to step `start` (the source model's function), then linear to
1 at step start + steps, then 1 (MSG's linear mask schedule; its grow_time is `steps`). The ramps are GrowthRamp
variables (not parameters), so the trainer carries them in its 'other' partition: the values the task assigns
inside `loss` are carried to the next micro-batch and step and checkpointed (train/task.py, train/step.py), and
since r is a function of the step alone a resumed run reproduces it. r is logged as the metric `ramp`. Once the
run has passed start + steps, ops.grow.unmask folds the masks away.

Evaluation (eval_loss at the number of steps done) uses r of that step too. The ramps must not be trainable:
setup() refuses a config.trainable that selects them, and a model without any (nothing to ramp).

`task_from_config(spec)` builds the task a train config names: None / {} / kind '' or 'next_token' gives the
default NextTokenTask; kind 'mask_ramp' a MaskRampTask(start, steps) around it; kind 'moe' a train.moe.MoETask
(router load-balancing and z-losses, router statistics) with the entry's other keys (MoETask.from_config); kind
'distill' a train.distill.DistillTask (teacher, alpha, temperature: distillation from a frozen teacher). Any kind
but 'moe' also takes `track_sparsity` (a level in (0, 1)) and optionally `track_rate`: the task is then wrapped in a
train.sparsity_tracking.SparsityTrackingTask, which keeps the thresholds of an activation-sparse model at that level
while it trains.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError
from configurable_fm.models.masked import GrowthRamp
from configurable_fm.models.structure import variables_of
from configurable_fm.train.moe import MoETask
from configurable_fm.train.task import NextTokenTask, Task, eval_loss, set_up_task

TASK_KINDS = ("next_token", "mask_ramp", "moe", "distill")
MASK_RAMP_KEYS = ("kind", "start", "steps")


def ramp_value(step, *, start: int, steps: int) -> jax.Array:
    """r(step) = clip((step - start) / steps, 0, 1) as a float32 scalar (step may be traced)."""
    s = jnp.asarray(step).astype(jnp.float32)
    return jnp.clip((s - start) / steps, 0.0, 1.0)


def assign_ramps(model, value) -> int:
    """Sets every GrowthRamp variable of `model` to `value`, IN PLACE (for tasks, on the model the trainer merged
    for this step); returns how many there are."""
    n = 0
    for var in variables_of(model).values():
        if isinstance(var, GrowthRamp):
            old = var.get_value()
            var.set_value(jnp.broadcast_to(jnp.asarray(value, old.dtype), old.shape))
            n += 1
    return n


def _int(name: str, value, low: int) -> int:
    if not is_int(value) or value < low:
        raise ConfigError(f"MaskRampTask: {name}={value!r} must be an int >= {low}")
    return value


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskRampTask(Task):
    """`inner`'s loss with every GrowthRamp set to r(step) = clip((step - start) / steps, 0, 1) first (module
    docstring); metrics: the inner task's plus `ramp`. A pytree whose array leaves are the inner task's (e.g.
    AnchoredTask's anchors), so they reach the compiled step as arguments."""

    inner: Any = dataclasses.field(default_factory=NextTokenTask)
    start: int = dataclasses.field(default=0, metadata=dict(static=True))
    steps: int = dataclasses.field(default=1000, metadata=dict(static=True))

    def __post_init__(self):
        _int("start", self.start, 0)
        _int("steps", self.steps, 1)

    def ramp(self, step) -> jax.Array:
        return ramp_value(step, start=self.start, steps=self.steps)

    def setup(self, model, trainable: Sequence[str]) -> "MaskRampTask":
        ramps = [p for p, v in variables_of(model).items() if isinstance(v, GrowthRamp)]
        if not ramps:
            raise ConfigError("MaskRampTask: the model has no GrowthRamp variables, so there is nothing to ramp; "
                              "grow it with ops.grow.grow_masked (or use the default task)")
        chosen = sorted(set(ramps) & set(trainable))
        if chosen:
            raise ConfigError(f"MaskRampTask: config.trainable selects growth ramps ({chosen[:4]}"
                              f"{' ...' if len(chosen) > 4 else ''}); the task sets them from the step, so they must "
                              "stay in the 'other' partition (drop the 'GrowthRamp:' / 'Variable:' selector)")
        return dataclasses.replace(self, inner=set_up_task(self.inner, model, trainable))

    def loss(self, model, batch, step, rng):
        r = self.ramp(step)
        assign_ramps(model, r)
        loss, metrics = self.inner.loss(model, batch, step, rng)
        if "ramp" in metrics:
            raise ConfigError("MaskRampTask: the inner task returns a metric named 'ramp', which this task logs")
        return loss, {**metrics, "ramp": r}

    def eval_loss(self, model, batch, step):
        assign_ramps(model, self.ramp(step))
        return eval_loss(self.inner, model, batch, step)


def task_from_config(spec: Mapping[str, Any] | None) -> Task:
    """The task a train config's `task` entry names (module docstring); ConfigError naming a bad kind or key."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec or {})
    if "track_sparsity" in spec or "track_rate" in spec:
        from configurable_fm.train.sparsity_tracking import SparsityTrackingTask

        level, rate = spec.pop("track_sparsity", None), spec.pop("track_rate", 1.0)
        if level is None:
            raise ConfigError("task.track_rate needs task.track_sparsity (the level to keep the thresholds at)")
        if spec.get("kind") == "moe":
            raise ConfigError("task.track_sparsity cannot be combined with kind 'moe' (both capture the forward)")
        return SparsityTrackingTask(inner=task_from_config(spec), level=level, rate=rate)
    kind = spec.get("kind") or "next_token"
    if kind not in TASK_KINDS:
        raise ConfigError(f"task.kind={kind!r} is not one of {list(TASK_KINDS)}")
    if kind == "next_token":
        extra = sorted(set(spec) - {"kind"})
        if extra:
            raise ConfigError(f"task.kind='next_token' takes no settings; got {extra}")
        return NextTokenTask()
    if kind == "moe":
        return MoETask.from_config({k: v for k, v in spec.items() if k != "kind"})
    if kind == "distill":
        from configurable_fm.train.distill import DistillTask

        return DistillTask.from_config(spec)
    extra = sorted(set(spec) - set(MASK_RAMP_KEYS))
    if extra:
        raise ConfigError(f"task: unknown key(s) {extra} for kind 'mask_ramp'; valid keys: {list(MASK_RAMP_KEYS)}")
    if "steps" not in spec:
        raise ConfigError("task.kind='mask_ramp' needs task.steps (the length of the 0 -> 1 ramp)")
    return MaskRampTask(start=spec.get("start", 0), steps=spec["steps"])
