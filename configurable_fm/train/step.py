"""The compiled training and evaluation steps (pure functions of the TrainState; jitted by the trainer).

One step on a batch of B rows split into A micro-batches of B/A rows (gradient accumulation), at step number
s (1 for the first step):
    rng_a        = fold_in(fold_in(key(seed), s), a)
    L_a, m_a     = task.loss(model(trainable, frozen, other_a), micro-batch a, s, rng_a)
    w_a          = stop_gradient(m_a['weight']) (1 when the task gives none)
    J            = sum_a w_a L_a / sum_a w_a          (J = L_1 when A = 1)
    g            = dJ/d trainable = sum_a w_a dL_a / sum_a w_a
    trainable'   = trainable + optimizer update(g)   (train/optim.py: clipping, AdamW, schedule)
    other_{a+1}  = the 'other' variables after task.loss of micro-batch a (other_0 from the state)
Metrics: loss = J, grad_norm = ||g||, weight = sum_a w_a, and every task metric averaged with the weights w_a.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from configurable_fm.train.state import ModelParts, TrainState
from configurable_fm.train.task import eval_loss as task_eval_loss


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def split_arrays(tree) -> tuple[list, Callable[[list], Any]]:
    """(the array leaves of `tree`, rebuild(arrays) -> tree): the arrays can be passed to a jitted function
    as arguments while everything else (a non-pytree object, static fields) stays captured as it is."""
    leaves, treedef = jax.tree.flatten(tree)
    is_array = [isinstance(x, jax.Array) or hasattr(x, "__array__") and hasattr(x, "dtype") for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array) if a]

    def rebuild(values: list):
        it = iter(values)
        return jax.tree.unflatten(treedef, [next(it) if a else x for x, a in zip(leaves, is_array)])

    return arrays, rebuild


def _scalars(loss, metrics: dict, where: str) -> tuple[jax.Array, dict]:
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(f"{where} returned a loss of shape {loss.shape}; it must be a scalar")
    out = {}
    for k, v in dict(metrics).items():
        v = jnp.asarray(v, jnp.float32)
        if v.shape != ():
            raise ValueError(f"{where} returned metric {k!r} of shape {v.shape}; metrics must be scalars")
        if k in ("loss", "grad_norm"):
            raise ValueError(f"{where} returned metric {k!r}: the trainer reserves it")
        out[k] = v
    out.setdefault("weight", jnp.ones((), jnp.float32))
    return loss.astype(jnp.float32), out


def make_step(parts: ModelParts, tx: optax.GradientTransformation, task: Any, accum_steps: int, seed: int,
              rebuild_task: Callable[[list], Any] | None = None):
    """train_step(state, frozen, task_arrays, batch) -> (state, metrics) (module docstring).

    `task_arrays` are the array leaves of the task (`split_arrays`; `rebuild_task` puts them back), `frozen` the
    frozen partition; batch rows are split into `accum_steps` micro-batches. The state is what it maps to the next
    step; pass it with donation."""
    rebuild = rebuild_task or (lambda arrays: task)

    def micro_step(trainable, other, frozen, task_now, batch, step, rng, weighted: bool):
        def objective(tr):
            model = parts.merge(tr, frozen, other)
            loss, metrics = _scalars(*task_now.loss(model, batch, step, rng), "task.loss")
            new_other = parts.read_other(model, other)
            value = jax.lax.stop_gradient(metrics["weight"]) * loss if weighted else loss
            return value, (loss, metrics, new_other)

        (_, (loss, metrics, new_other)), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        return loss, metrics, new_other, grads

    def train_step(state: TrainState, frozen: dict, task_arrays: list, batch: dict):
        task_now = rebuild(task_arrays)
        step = state.step + 1
        key = jax.random.fold_in(jax.random.key(seed), step)
        if accum_steps == 1:
            loss, metrics, other, grads = micro_step(state.trainable, state.other, frozen, task_now, batch, step,
                                                     jax.random.fold_in(key, 0), weighted=False)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)
            # Shapes of the carry: one abstract evaluation of the micro-step (traced, not run).
            shapes = jax.eval_shape(lambda: micro_step(state.trainable, state.other, frozen, task_now,
                                                       jax.tree.map(lambda x: x[0], micro), step,
                                                       jax.random.fold_in(key, 0), weighted=True))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1], shapes[3]))

            def body(carry, xs):
                (wloss, wmetrics, grads), other = carry
                index, mb = xs
                loss, m, other, g = micro_step(state.trainable, other, frozen, task_now, mb, step,
                                               jax.random.fold_in(key, index), weighted=True)
                w = m["weight"]
                wm = {k: v + (m[k] if k == "weight" else w * m[k]) for k, v in wmetrics.items()}
                return ((wloss + w * loss, wm, jax.tree.map(jnp.add, grads, g)), other), None

            ((wloss, wmetrics, grads), other), _ = jax.lax.scan(
                body, (zeros, state.other), (jnp.arange(accum_steps, dtype=jnp.int32), micro))
            total = wmetrics["weight"]
            denom = jnp.where(total > 0, total, 1.0)
            loss = wloss / denom
            metrics = {k: v if k == "weight" else v / denom for k, v in wmetrics.items()}
            grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads)}
        return TrainState(step, trainable, opt_state, other), metrics

    return train_step


def make_eval_step(parts: ModelParts, task: Any, rebuild_task: Callable[[list], Any] | None = None):
    """eval_step(state, frozen, task_arrays, batch) -> {'loss', 'weight', task metrics} for one evaluation batch
    (the task's eval_loss at step = state.step; variables it assigns are not kept)."""
    rebuild = rebuild_task or (lambda arrays: task)

    def eval_step(state: TrainState, frozen: dict, task_arrays: list, batch: dict):
        model = parts.merge(state.trainable, frozen, state.other)
        loss, metrics = _scalars(*task_eval_loss(rebuild(task_arrays), model, batch, state.step), "task.eval_loss")
        return {**metrics, "loss": loss}

    return eval_step


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, accum_steps: int, task: Any = None,
                    seed: int = 0):
    """step(params, opt_state, frozen, batch) -> (params, opt_state, metrics): the trainer's step for a model
    without 'other' variables, at step number 1 (what scripts/bench_train.py times; `task` default: next-token
    NLL)."""
    from configurable_fm.train.task import NextTokenTask

    core = make_step(parts, tx, task if task is not None else NextTokenTask(), accum_steps, seed)

    def step(params, opt_state, frozen, batch):
        state, metrics = core(TrainState(jnp.zeros((), jnp.int32), params, opt_state, {}), frozen, [], batch)
        return state.trainable, state.opt_state, metrics

    return step
