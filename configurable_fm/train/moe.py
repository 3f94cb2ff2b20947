"""Mixture-of-experts training: router losses and router statistics, as a task around any other task.

    task = MoETask(aux_loss_coef=1e-2, z_loss_coef=1e-3)                  # around NextTokenTask
    task = MoETask(inner=AnchoredTask(strength=1e-3), z_loss_coef=1e-3)   # around any task
    task = MoETask.from_config(config.moe)                                # {'aux_loss_coef': .., 'z_loss_coef': ..}
    train(config, workdir, model=moe_model, task=task)

The objective of one micro-batch, with (L_inner, m) = inner.loss(model, batch, step, rng):

    L = L_inner + aux_loss_coef * L_aux + z_loss_coef * L_z

over the MoE layers l = 1..N of the model (every models/moe.py SparseMoE), their router logits r_l (B, T, E)
(the tap points `<path>.router_logits`, read from the inner task's own forward) and token weights m_t (the row
mask `batch['mask']` of padded evaluation batches broadcast over positions; 1 without one: every token is routed,
so every token counts, scored or not):

  L_aux (load balancing; Switch Transformer eqs. 4-6, with transformers' `load_balancing_loss_func` semantics:
         pooled over layers and tokens, k assignments per token):
         p_lt = softmax(r_lt);  f_e = sum_{l,t} m_t [e in top_k(p_lt)] / sum_{l,t} m_t;
         P_e = sum_{l,t} m_t p_lte / sum_{l,t} m_t;  L_aux = E * sum_e f_e P_e
         (= k when balanced). aux_loss_reduction='layer_mean' takes each layer's E sum_e f_le P_le and averages
         them instead (each layer balanced on its own, as Switch adds one loss per layer). f counts the top-k
         choices before any capacity (as Switch and GShard do); only P carries a gradient.
  L_z   (router z-loss, ST-MoE eq. 5): sum_{l,t} m_t logsumexp(r_lt)^2 / sum_{l,t} m_t.

Expert-choice layers are balanced by construction and have no top-k choices: aux_loss_coef > 0 with one is an error.
For noisy_topk layers the task draws the routing noise (models/moe.py `routing_noise`) with the key
fold_in(rng, NOISE_SALT); the logits it reads are the noisy ones the routing used, so f_e counts the actual choices.

Metrics (scalars; the trainer averages them over micro-batches and logs evaluation ones as val_<name>):
    base_loss           the inner task's loss (its own metrics are passed through)
    aux_loss, z_loss    L_aux and L_z, before their coefficients
    router_entropy      mean over layers of the token-mean routing entropy -sum_e p_te log p_te (nats)
    dropped_fraction    mean over the layers that can drop (a capacity factor, or expert choice) of `dropped`
  and with per_layer=True, for each MoE layer at <path> (e.g. layers.3.mlp):
    router/<path>/load_<e>   the fraction of the layer's tokens that expert e processes (after capacity; sums to k
                             without dropping; k/E when balanced)
    router/<path>/entropy    its routing entropy
    router/<path>/dropped    token choice with a capacity: the fraction of the T*k assignments dropped; expert
                             choice: the fraction of tokens no expert takes
Statistics come from the logits the forward used (`models.moe.routing` recomputes the routing from them, the same
function the layer runs) and carry no gradient.

Evaluation (eval_loss): the inner task's evaluation loss (so val_loss stays comparable with other tasks), no
routing noise, and the metrics above for the evaluation batch.

Cost: the router logits are read through a tap context (analysis/capture.py), and while one is active the llama
layers run without remat (models/llama.py): training with MoETask keeps every layer's activations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.analysis.capture import capture
from configurable_fm.checks import is_real
from configurable_fm.errors import ConfigError
from configurable_fm.models.moe import SparseMoE, routing, routing_noise
from configurable_fm.train.task import NextTokenTask, Task, eval_loss, set_up_task

REDUCTIONS = ("pooled", "layer_mean")
CONFIG_KEYS = ("aux_loss_coef", "z_loss_coef", "aux_loss_reduction", "per_layer")
NOISE_SALT = 0x6E6F6973  # fold_in(rng, NOISE_SALT): the routing-noise key, apart from the inner task's use of rng
Metrics = dict[str, jax.Array]


# ------------------------------------------------------------------------------------------ losses
def _token_weights(logits: jax.Array, mask) -> jax.Array:
    """Weights of the tokens of logits (..., E): `mask` (the leading shape) as float32, or ones."""
    shape = logits.shape[:-1]
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != shape:
        raise ValueError(f"token mask of shape {mask.shape} does not fit router logits of shape {logits.shape}")
    return mask


def _safe(total: jax.Array) -> jax.Array:
    return jnp.where(total > 0, total, 1.0)


def load_balancing_loss(router_logits: Sequence[jax.Array], k: int, mask=None, *,
                        reduction: str = "pooled") -> jax.Array:
    """L_aux (module docstring) of the layers' router logits, each (..., E) (e.g. (B, T, E) or (B*T, E)), with
    token weights `mask` (the logits' leading shape; None: all 1). reduction: 'pooled' (transformers'
    load_balancing_loss_func) or 'layer_mean'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {list(REDUCTIONS)}")
    if not router_logits:
        raise ValueError("load_balancing_loss: no router logits given")
    per_layer, counts, probs, totals = [], 0.0, 0.0, 0.0
    for logits in router_logits:
        num_experts = logits.shape[-1]
        w = _token_weights(logits, mask)
        p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, idx = jax.lax.top_k(p, k)
        chosen = jax.lax.stop_gradient(jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32), axis=-2))
        count_e = jnp.sum(chosen * w[..., None], axis=tuple(range(chosen.ndim - 1)))
        prob_e = jnp.sum(p * w[..., None], axis=tuple(range(p.ndim - 1)))
        total = jnp.sum(w)
        per_layer.append(num_experts * jnp.sum(count_e * prob_e) / _safe(total) ** 2)
        counts, probs, totals = counts + count_e, probs + prob_e, totals + total
    if reduction == "layer_mean":
        return sum(per_layer) / len(per_layer)
    num_experts = router_logits[0].shape[-1]
    return num_experts * jnp.sum((counts / _safe(totals)) * (probs / _safe(totals)))


def router_z_loss(router_logits: Sequence[jax.Array], mask=None) -> jax.Array:
    """L_z = sum_{l,t} m_t logsumexp(r_lt)^2 / sum_{l,t} m_t over the layers' router logits (..., E)."""
    if not router_logits:
        raise ValueError("router_z_loss: no router logits given")
    num, den = 0.0, 0.0
    for logits in router_logits:
        w = _token_weights(logits, mask)
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        num, den = num + jnp.sum(w * z ** 2), den + jnp.sum(w)
    return num / _safe(den)


def router_statistics(router_logits_BxTxE: jax.Array, k: int, rule: str, capacity_factor: float | None,
                      mask=None) -> dict[str, jax.Array]:
    """One layer's statistics (module docstring), without gradient: {'load' (E,), 'entropy', and 'dropped' when
    the layer can drop tokens (a capacity factor, or expert choice)}. mask: (B, T) token weights or None."""
    logits = jax.lax.stop_gradient(router_logits_BxTxE.astype(jnp.float32))
    w = _token_weights(logits, mask)
    total = _safe(jnp.sum(w))
    r = routing(logits, k, rule, capacity_factor)
    dispatch = r.dispatch_BxTxE.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    out = {"load": jnp.sum(dispatch * w[..., None], axis=(0, 1)) / total,
           "entropy": jnp.sum(w * -jnp.sum(jnp.exp(logp) * logp, axis=-1)) / total}
    if rule == "expert_choice":
        out["dropped"] = jnp.sum(w * (jnp.sum(dispatch, axis=-1) == 0)) / total
    elif capacity_factor is not None:
        chosen = jnp.sum(r.chosen_BxTxE.astype(jnp.float32), axis=-1)
        out["dropped"] = 1.0 - jnp.sum(w * jnp.sum(dispatch, axis=-1)) / _safe(jnp.sum(w * chosen))
    return out


# ------------------------------------------------------------------------------------------ the task
def moe_layers(model) -> dict[str, SparseMoE]:
    """{dotted path: SparseMoE module} of `model`, in model order (the tap point of each is <path>.router_logits)."""
    return {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model) if isinstance(m, SparseMoE)}


def _number(name: str, value, low: float = 0.0) -> float:
    if not is_real(value) or not value >= low:
        raise ConfigError(f"MoETask: {name}={value!r} must be a number >= {low}")
    return float(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoETask(Task):
    """`inner`'s loss plus aux_loss_coef * L_aux + z_loss_coef * L_z, with router statistics (module docstring).
    A pytree whose array leaves are the inner task's, so they reach the compiled step as arguments."""

    inner: Any = dataclasses.field(default_factory=NextTokenTask)
    aux_loss_coef: float = dataclasses.field(default=1e-2, metadata=dict(static=True))  # Switch Transformer
    z_loss_coef: float = dataclasses.field(default=1e-3, metadata=dict(static=True))  # ST-MoE
    aux_loss_reduction: str = dataclasses.field(default="pooled", metadata=dict(static=True))
    per_layer: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def __post_init__(self):
        _number("aux_loss_coef", self.aux_loss_coef)
        _number("z_loss_coef", self.z_loss_coef)
        if self.aux_loss_reduction not in REDUCTIONS:
            raise ConfigError(f"MoETask: aux_loss_reduction={self.aux_loss_reduction!r} is not one of "
                              f"{list(REDUCTIONS)}")

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None, inner: Any = None) -> "MoETask":
        """The task of a config entry {aux_loss_coef, z_loss_coef, aux_loss_reduction, per_layer} (any subset);
        unknown keys are a ConfigError naming them."""
        spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec or {})
        unknown = sorted(set(spec) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"MoETask: unknown key(s) {unknown}; valid keys: {list(CONFIG_KEYS)}")
        return cls(inner=inner if inner is not None else NextTokenTask(), **spec)

    def _layers(self, model) -> dict[str, SparseMoE]:
        layers = moe_layers(model)
        if not layers:
            raise ConfigError("MoETask: the model has no SparseMoE layers (num_experts=0?): nothing to route")
        if self.aux_loss_coef > 0:
            choice = [p for p, m in layers.items() if m.rule == "expert_choice"]
            if choice:
                raise ConfigError(f"MoETask: aux_loss_coef={self.aux_loss_coef} but {choice[0]} uses expert-choice "
                                  "routing, which is balanced by construction and has no top-k choices to "
                                  "balance; set aux_loss_coef=0")
        return layers

    def setup(self, model, trainable: Sequence[str]) -> "MoETask":
        self._layers(model)
        return dataclasses.replace(self, inner=set_up_task(self.inner, model, trainable))

    def _run(self, model, batch, call, noise_key):
        """(inner loss, inner metrics, total loss, metrics) of `call(model)` = the inner task's (loss, metrics)."""
        layers = self._layers(model)
        points = [f"{p}.router_logits" for p in layers]
        if noise_key is not None and any(m.rule == "noisy_topk" for m in layers.values()):
            with routing_noise(noise_key):
                (inner_loss, metrics), values = capture(model, points, call)
        else:
            (inner_loss, metrics), values = capture(model, points, call)
        logits = [values[p] for p in points]
        mask = None
        if "mask" in batch:  # row mask of padded evaluation batches
            mask = jnp.broadcast_to(jnp.asarray(batch["mask"], jnp.float32)[:, None], logits[0].shape[:2])
        ours: Metrics = {"base_loss": inner_loss, "z_loss": router_z_loss(logits, mask)}
        token_choice = {p: v for (p, m), v in zip(layers.items(), logits) if m.rule != "expert_choice"}
        if token_choice:
            ks = {layers[p].k for p in token_choice}
            if len(ks) > 1 and self.aux_loss_reduction == "pooled":
                raise ConfigError(f"MoETask: the MoE layers choose different numbers of experts {sorted(ks)}; the "
                                  "pooled load-balancing loss needs one k (use aux_loss_reduction='layer_mean')")
            if self.aux_loss_reduction == "pooled":
                ours["aux_loss"] = load_balancing_loss(list(token_choice.values()), ks.pop(), mask)
            else:
                ours["aux_loss"] = sum(load_balancing_loss([v], layers[p].k, mask, reduction="layer_mean")
                                       for p, v in token_choice.items()) / len(token_choice)
        else:
            ours["aux_loss"] = jnp.zeros((), jnp.float32)
        entropies, dropped = [], []
        for (path, m), v in zip(layers.items(), logits):
            stats = router_statistics(v, m.k, m.rule, m.capacity_factor, mask)
            entropies.append(stats["entropy"])
            if "dropped" in stats:
                dropped.append(stats["dropped"])
            if self.per_layer:
                ours.update({f"router/{path}/load_{e}": x for e, x in enumerate(stats["load"])})
                ours.update({f"router/{path}/{name}": stats[name] for name in ("entropy", "dropped") if name in stats})
        ours["router_entropy"] = sum(entropies) / len(entropies)
        if dropped:
            ours["dropped_fraction"] = sum(dropped) / len(dropped)
        clash = sorted(set(ours) & set(metrics))
        if clash:
            raise ConfigError(f"MoETask: the inner task returns metric(s) {clash}, names this task logs")
        total = inner_loss + self.aux_loss_coef * ours["aux_loss"] + self.z_loss_coef * ours["z_loss"]
        return total, {**metrics, **ours}

    def loss(self, model, batch, step, rng):
        return self._run(model, batch, lambda m: self.inner.loss(m, batch, step, rng),
                         jax.random.fold_in(rng, NOISE_SALT))

    def eval_loss(self, model, batch, step):
        total, metrics = self._run(model, batch, lambda m: eval_loss(self.inner, m, batch, step), None)
        return metrics["base_loss"], metrics
