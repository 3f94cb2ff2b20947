"""What the trainer minimises: a task gives the loss of a model on one (micro-)batch.

    class MyTask(Task):
        def loss(self, model, batch, step, rng):        # -> (scalar float32 loss, {name: scalar})
            total, weight = loss_sums(model, batch)
            return total / jnp.maximum(weight, 1.0) + ..., {"weight": weight, ...}

    train(config, workdir, task=MyTask())

The protocol (any object with a `loss` method; `Task` gives the optional hooks their defaults):

  loss(model, batch, step, rng) -> (loss, metrics)
      model: the model being trained (an nnx module merged from the trainer's partitions, inside `jax.jit`);
      batch: {'inputs', 'targets', and optionally 'loss_mask' (B, L) and 'mask' (B,)} for one micro-batch;
      step: int32 scalar (traced: one compilation for every step), the number of the step being taken, 1 for
            the first, as in metrics.jsonl;
      rng: a PRNG key, fold_in(fold_in(key(config.seed), step), micro_index) (micro_index = 0 .. A-1 within the
           step), the same on every device and on a resumed run;
      loss: a float32 scalar; metrics: {name: scalar}, logged under `name` (`weight` is not logged).
      metrics['weight'] (optional, default 1) is how much this micro-batch counts: a step over A micro-batches
      minimises, and logs,
          J = sum_a w_a L_a / sum_a w_a                 (w_a = stop_gradient(metrics_a['weight']))
      and every other metric is averaged with the same weights. For a token-mean loss L_a = S_a / N_a with
      w_a = N_a (the number of scored tokens) this is sum_a S_a / sum_a N_a, the loss of the whole batch, so
      gradient accumulation is exact. With A = 1, J = L_1 (the weight is not used).
      The task may assign non-trainable, non-parameter variables of `model` (the 'other' partition, e.g. a mask
      ramp set from `step`); the values they hold when `loss` returns are carried to the next micro-batch and
      step (and checkpointed). Assignments to parameters are discarded. Assign outside remat'ed layers.
  eval_loss(model, batch, step) -> (loss, metrics)   (optional; default: `loss` with rng key(0))
      The evaluation loss on one evaluation batch (rows with 'mask' 0 are padding and must not count);
      the trainer logs val_loss = sum_b w_b L_b / sum_b w_b and val_<name> for the other metrics; step: the
      number of steps done.
  setup(model, trainable) -> task                    (optional; default: the task itself)
      Called once with the initial model (before any checkpoint is restored: the same on a resumed run) and
      the dotted paths of the trainable variables; returns the task to train with (e.g. holding anchors).

A task that is a JAX pytree (a registered dataclass, an nnx.Module, ...) has its array leaves passed to the
compiled step as arguments (placed once, replicated over the mesh unless already on it), not baked in as
constants; any other object is captured as it is.

Tasks here: `NextTokenTask` (the default: token-mean next-token NLL) and `AnchoredTask` (NLL plus an L2 pull
towards the initial trainable parameters, for constrained fine-tuning); elsewhere in train/: MaskRampTask (ramp.py),
MoETask (moe.py), DistillTask (distill.py: knowledge distillation from a frozen teacher).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.train.state import variable_values

Metrics = dict[str, jax.Array]


def token_weights(batch, like) -> jax.Array:
    """How much each position's loss counts, float32 like `like` (B, T): `loss_mask` (1 when the batch has none)
    times the row mask `mask` of padded evaluation batches."""
    weights = batch["loss_mask"].astype(jnp.float32) if "loss_mask" in batch else jnp.ones_like(like, jnp.float32)
    if "mask" in batch:  # row mask of padded evaluation batches
        weights = weights * batch["mask"].astype(jnp.float32)[:, None]
    return weights


def loss_sums(model, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights) in float32 for one batch (`token_weights`)."""
    nll = next_token_nll(model(batch["inputs"]), batch["targets"])
    weights = token_weights(batch, nll)
    return jnp.sum(nll * weights), jnp.sum(weights)


def next_token_loss(model, batch) -> tuple[jax.Array, Metrics]:
    """(token-mean NLL = sum w*nll / max(sum w, 1), {'weight': sum w}) (`loss_sums`)."""
    total, weight = loss_sums(model, batch)
    return total / jnp.maximum(weight, 1.0), {"weight": weight}


class Task:
    """Base class of tasks: subclasses define `loss`; `eval_loss` and `setup` have defaults (module docstring)."""

    def loss(self, model, batch: dict, step: jax.Array, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch, step, rng)")

    def eval_loss(self, model, batch: dict, step: jax.Array) -> tuple[jax.Array, Metrics]:
        return self.loss(model, batch, step, jax.random.key(0))

    def setup(self, model, trainable: Sequence[str]) -> "Task":
        return self


class NextTokenTask(Task):
    """The default task: token-mean next-token NLL, weight = the number of scored tokens (`next_token_loss`)."""

    def loss(self, model, batch, step, rng):
        return next_token_loss(model, batch)

    def eval_loss(self, model, batch, step):
        return next_token_loss(model, batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AnchoredTask(Task):
    """Fine-tuning that stays near the start (an L2 form of constrained fine-tuning, cf. FT-L):

        L(theta) = NLL(theta) + strength * sum_{p in P} ||theta_p - theta0_p||^2

    theta0: the initial values of the trainable variables whose path matches a glob of `paths` (P; default
    all trainable ones), captured by `setup` as float32 arrays (passed to the step as arguments). Frozen
    parameters never move, so anchoring them would only add zeros. Metrics: weight (scored tokens), nll and
    sq_distance = sum ||theta_p - theta0_p||^2. Evaluation: the NLL alone (val_loss comparable across tasks).
    """

    strength: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    paths: tuple[str, ...] = dataclasses.field(default=("**",), metadata=dict(static=True))
    anchor: dict[str, jax.Array] | None = None

    def setup(self, model, trainable):
        chosen = [p for p in trainable if any(re.fullmatch(glob_to_regex(g), p) for g in self.paths)]
        if not chosen:
            raise ValueError(f"AnchoredTask: paths {list(self.paths)} match no trainable variable; "
                             f"trainable: {list(trainable)[:6]}")
        values = variable_values(model)
        return dataclasses.replace(self, anchor={p: jnp.array(values[p], jnp.float32, copy=True) for p in chosen})

    def loss(self, model, batch, step, rng):
        if self.anchor is None:
            raise ValueError("AnchoredTask.loss before setup(): the trainer calls setup with the initial model")
        nll, metrics = next_token_loss(model, batch)
        values = variable_values(model)
        sq = sum(jnp.sum(jnp.square(values[p].astype(jnp.float32) - a)) for p, a in self.anchor.items())
        return nll + self.strength * sq, {**metrics, "nll": nll, "sq_distance": sq}

    def eval_loss(self, model, batch, step):
        return next_token_loss(model, batch)


def set_up_task(task: Any, model, trainable: Sequence[str]) -> Any:
    """`task.setup(model, trainable)` when the task defines it; checks that it has a `loss` method."""
    if not callable(getattr(task, "loss", None)):
        raise TypeError(f"task {task!r} has no loss(model, batch, step, rng) method (see train/task.py)")
    setup = getattr(task, "setup", None)
    return setup(model, list(trainable)) if callable(setup) else task


def eval_loss(task: Any, model, batch: dict, step: jax.Array) -> tuple[jax.Array, Metrics]:
    """The task's `eval_loss`, or its `loss` with rng key(0) when it has none."""
    fn = getattr(task, "eval_loss", None)
    return fn(model, batch, step) if callable(fn) else task.loss(model, batch, step, jax.random.key(0))
