"""Knowledge distillation from a frozen teacher: the student learns the teacher's next-token distributions.

    task = DistillTask(teacher="smollm2-135m-instruct", alpha=1.0, temperature=1.0)
    train(config, workdir, model=student, task=task)
    task = task_from_config({'kind': 'distill', 'teacher': SOURCE, 'alpha': 1.0, 'temperature': 1.0})

For one micro-batch with student logits s and teacher logits t (B, T, V), token weights w (train/task.py
`token_weights`: loss_mask times the row mask), temperature tau and weight alpha in [0, 1]:

    nll_bt = -log softmax(s_bt)[target_bt]
    kd_bt  = tau^2 KL(softmax(t_bt / tau) || softmax(s_bt / tau))
           = tau^2 sum_v q_v (log q_v - log p_v),   q = softmax(t / tau),  p = softmax(s / tau)
    L      = (1 - alpha) sum_bt w nll / sum_bt w  +  alpha sum_bt w kd / sum_bt w

(Hinton et al. 2015; tau^2 keeps the gradient's scale independent of tau). Every position whose target is scored
is distilled; alpha = 1 (the default) is pure distillation, alpha = 0 the plain next-token loss. The teacher's
logits carry no gradient; everything is float32.

Why it is here: recovering a model that a surgery degraded (activation sparsity, MoEfication, pruning) towards the
model it came from. With the next-token loss alone the recovery also adapts the model to the training data's
domain, so it must be compared with the dense model given the same training (a control run); distilling from the
dense model teaches the student that model's function instead, which is what "within x% of the dense model" asks.

The teacher: any source interop.loader.load_model takes (registry name, HF directory, GGUF, orbax checkpoint),
loaded by `setup` and given the student's compute dtype (models.factory.with_compute_dtype); its arrays are the
task's pytree leaves, so the trainer passes them to the compiled step as arguments (replicated over the mesh) and
never trains them. It must have the student's vocabulary (checked by logit width at the first step's trace, and by
config.vocab_size in setup where both have one). Cost: one more forward per micro-batch (about a third of a
training step).

Evaluation (eval_loss): the plain next-token NLL, so val_loss / val_ppl stay comparable with any other task.
Metrics: weight, nll (the token-mean NLL) and kd (the token-mean tau^2 KL).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.checks import is_real
from configurable_fm.errors import ConfigError
from configurable_fm.models.scoring import next_token_kl, next_token_nll
from configurable_fm.train.task import Task, next_token_loss, token_weights

DISTILL_KEYS = ("kind", "teacher", "alpha", "temperature")


def compute_dtype(model) -> Optional[Any]:
    """The compute dtype of the first sub-module that has one (the families' layers carry `dtype`), else None."""
    for _, module in nnx.iter_modules(model):
        dtype = getattr(module, "dtype", None)
        if dtype is not None:
            return dtype
    return None


def distill_kl(student_BxTxV, teacher_BxTxV, temperature: float) -> jax.Array:
    """tau^2 KL(softmax(t / tau) || softmax(s / tau)) per position (B, T), float32 (module docstring)."""
    s = student_BxTxV.astype(jnp.float32) / temperature
    t = teacher_BxTxV.astype(jnp.float32) / temperature
    return temperature ** 2 * next_token_kl(s, t)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistillTask(Task):
    """(1 - alpha) NLL + alpha tau^2 KL(teacher || student) (module docstring). `teacher` is a source string;
    setup() loads it into teacher_graphdef (static) and teacher_state (the arrays, passed to the step)."""

    teacher: str = dataclasses.field(default="", metadata=dict(static=True))
    alpha: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    temperature: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    teacher_graphdef: Any = dataclasses.field(default=None, metadata=dict(static=True))
    teacher_state: Any = None

    def __post_init__(self):
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(f"DistillTask: teacher must name a model source (a registry name, HF directory, GGUF or "
                              f"orbax checkpoint), got {self.teacher!r}")
        alpha = self.alpha
        if not is_real(alpha) or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"DistillTask: alpha={alpha!r} must be a number in [0, 1] (the weight of the "
                              "distillation term; 1 - alpha weighs the next-token loss)")
        tau = self.temperature
        if not is_real(tau) or not tau > 0:
            raise ConfigError(f"DistillTask: temperature={tau!r} must be a number > 0")

    def setup(self, model, trainable: Sequence[str]) -> "DistillTask":
        from configurable_fm.interop.loader import load_model
        from configurable_fm.models.factory import with_compute_dtype

        teacher = load_model(self.teacher)
        dtype = compute_dtype(model)
        if dtype is not None:
            teacher = with_compute_dtype(teacher, dtype)
        mine, theirs = getattr(getattr(model, "cfg", None), "vocab_size", None), getattr(
            getattr(teacher, "cfg", None), "vocab_size", None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(f"DistillTask: the teacher {self.teacher!r} has a vocabulary of {theirs} tokens, the "
                              f"student {mine}: distillation compares their next-token distributions token by token")
        graphdef, state = nnx.split(teacher)
        return dataclasses.replace(self, teacher_graphdef=graphdef, teacher_state=state)

    def teacher_logits(self, inputs) -> jax.Array:
        if self.teacher_state is None:
            raise ConfigError("DistillTask.loss before setup(): the trainer calls setup with the initial model")
        return jax.lax.stop_gradient(nnx.merge(self.teacher_graphdef, self.teacher_state)(inputs))

    def loss(self, model, batch, step, rng):
        logits = model(batch["inputs"])
        teacher = self.teacher_logits(batch["inputs"])
        if teacher.shape != logits.shape:
            raise ConfigError(f"DistillTask: the teacher's logits are {teacher.shape}, the student's {logits.shape}")
        nll = next_token_nll(logits, batch["targets"])
        weights = token_weights(batch, nll)
        n = jnp.maximum(jnp.sum(weights), 1.0)
        nll_mean = jnp.sum(nll * weights) / n
        kd_mean = jnp.sum(distill_kl(logits, teacher, self.temperature) * weights) / n
        loss = (1.0 - self.alpha) * nll_mean + self.alpha * kd_mean
        return loss, {"weight": jnp.sum(weights), "nll": nll_mean, "kd": kd_mean}

    def eval_loss(self, model, batch, step):
        return next_token_loss(model, batch)

    @classmethod
    def from_config(cls, spec: Mapping[str, Any]) -> "DistillTask":
        """From a train config's task entry {'kind': 'distill', 'teacher': SOURCE, 'alpha'?, 'temperature'?}."""
        extra = sorted(set(spec) - set(DISTILL_KEYS))
        if extra:
            raise ConfigError(f"task: unknown key(s) {extra} for kind 'distill'; valid keys: {list(DISTILL_KEYS)}")
        if not spec.get("teacher"):
            raise ConfigError("task.kind='distill' needs task.teacher (the model to distil from: a registry name, HF "
                              "directory, GGUF or orbax checkpoint)")
        return cls(teacher=spec["teacher"], alpha=spec.get("alpha", 1.0), temperature=spec.get("temperature", 1.0))
