"""LoRA on stacked expert weights (PEFT's `target_parameters`): one low-rank change per expert of an MoE layer.

A mixture-of-experts FFN keeps its experts' weights stacked along a leading axis, not as Linear modules:
`models.moe.Experts` (a MoE model's `layers.<i>.mlp.experts.{gate,up,down}_proj`) and the MoEfied FFN
(`analysis.moefication.MoefiedMLP`, `layers.<i>.mlp.{gate,up,down}_proj`). Such a parameter W (E, D_in, D_out) takes
an `ExpertLoRA` brick, a child module of the parameter's owner named `<parameter>_lora`
(`layers.0.mlp.experts.gate_proj_lora`), with

    lora_a A (E, D_in, r), lora_b B (E, r, D_out):   W_e' = W_e + s · A_e B_e   for every expert e,
    s = alpha / r, or alpha / sqrt(r) with rsLoRA,

the stacked form of `bricks.deltas.LowRank` (which takes leading stack axes), initialised as PEFT initialises a LoRA
(A_e ~ U(±1/sqrt(D_in)), B = 0: the model is unchanged until B trains). The owner's forward reads the weight through
`models.moe.expert_weight(owner, name)`, which adds the change while the adapter is unmerged: the change is
materialised, W + s A B (E, D_in, D_out) in float32, once per forward, as PEFT's ParamWrapper does (its
parametrisation adds the delta weight). That costs one extra pass over the expert weights per forward, not per
token: for a training batch of many tokens it is far cheaper than the per-token low-rank path of LoRALinear.

Merged (`merge(model, keep=True)`): W holds W + s A B and the adapter stays, flagged merged, so `unmerge` restores
W (one float rounding each way, as LoRA's). `merge(model)` drops the adapter; `detach` gives W back.
The adapter parameters are `LoRAParam`s, so 'AdapterParam:**' trains them and `adapter_state` lists them; the
module describes itself (`structure_spec`, kind 'expert_lora', registered here), so check_consistent and orbax
checkpoints accept it; `to_hf` refuses it by name (merge or detach first).

PEFT: `to_peft` / `from_peft` map a Mixtral model's expert LoRAs onto PEFT's `target_parameters` of transformers'
fused experts (interop/peft_experts.py: gate and up share PEFT's A, which ours represents exactly at rank
r_gate + r_up). Not supported (each an error naming the paths): DoRA / IA3 on expert weights, PEFT's form for other
MoE layouts (a MoEfied model), mixed-adapter batches and adapter combinations.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.adapters.modules import AdapterError, LoRAParam, checked_options, make_variable
from configurable_fm.bricks.deltas import LowRank
from configurable_fm.bricks.select import module_index
from configurable_fm.models.moe import EXPERT_LORA_KIND, EXPERT_LORA_SUFFIX
from configurable_fm.models.structure import register_extension

KIND = EXPERT_LORA_KIND


class ExpertLoRA(nnx.Module):
    """LoRA factors of one stacked expert weight W (E, D_in, D_out): lora_a (E, D_in, r), lora_b (E, r, D_out);
    its change s · A_e B_e per expert (module docstring). `shape` is W's, `axes` W's logical axis names (None:
    unsharded); the factors are float32."""

    kind = KIND
    OPTIONS = {"shape": ((list, tuple), None), "rank": (int, None), "alpha": ((int, float), None),
               "rslora": (bool, False), "merged": (bool, False)}  # and "axes": 3 names (or None) or None

    def __init__(self, *, shape, rank: int, alpha: float, rslora: bool = False, merged: bool = False, axes=None):
        if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise AdapterError(f"expert_lora: a stacked expert weight is (E, D_in, D_out), got shape {shape!r}")
        if rank < 1:
            raise AdapterError(f"expert_lora: rank must be >= 1, got {rank}")
        if not math.isfinite(float(alpha)):
            raise AdapterError(f"expert_lora: alpha must be a finite number, got {alpha!r}")
        e, d_in, d_out = (int(n) for n in shape)
        self.rank, self.alpha, self.rslora, self.merged = int(rank), float(alpha), bool(rslora), bool(merged)
        self.axes = None if axes is None else [None if a is None else str(a) for a in axes]
        ax = self.axes
        self.lora_a = make_variable(LoRAParam, jnp.zeros((e, d_in, self.rank), jnp.float32),
                                    None if ax is None else (ax[0], ax[1], None))
        self.lora_b = make_variable(LoRAParam, jnp.zeros((e, self.rank, d_out), jnp.float32),
                                    None if ax is None else (ax[0], None, ax[2]))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "ExpertLoRA":
        options = dict(options)
        axes = options.pop("axes", None)
        if axes is not None and (not isinstance(axes, (list, tuple)) or len(axes) != 3):
            raise AdapterError(f"expert_lora: option axes must be 3 axis names (or null), got {axes!r}")
        return cls(**checked_options(KIND, options, cls.OPTIONS), axes=axes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """W's shape (E, D_in, D_out)."""
        e, d_in, _ = self.lora_a.get_value().shape
        return int(e), int(d_in), int(self.lora_b.get_value().shape[-1])

    def options(self) -> dict:
        return {"shape": list(self.shape), "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
                "merged": self.merged, "axes": self.axes}

    def structure_spec(self):
        return {"kind": KIND, "options": self.options()}

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def low_rank(self) -> LowRank:
        """The change s · A B as a stacked bricks.deltas.LowRank, W-shaped (E, D_in, D_out)."""
        return LowRank(self.lora_a[...], self.lora_b[...], self.scale)

    def weight_delta(self):
        """What the owner's forward adds to W (models.moe.expert_weight): s · A B (E, D_in, D_out) float32 while
        unmerged, None once merged (W holds it)."""
        return None if self.merged else self.low_rank().materialize(jnp.float32)

    def with_merged(self, merged: bool) -> "ExpertLoRA":
        """The same factors (the same Variables) with the `merged` flag set."""
        new = ExpertLoRA(**{**self.options(), "merged": merged})
        new.lora_a, new.lora_b = self.lora_a, self.lora_b
        return new


register_extension(KIND, lambda base, options, *, rngs: ExpertLoRA.from_options(options))


def expert_weight_names(owner) -> tuple[str, ...]:
    """The stacked expert weights an owner module declares (`EXPERT_WEIGHTS`, e.g. Experts, MoefiedMLP) and has."""
    return tuple(n for n in getattr(type(owner), "EXPERT_WEIGHTS", ()) if getattr(owner, n, None) is not None)


def expert_loras(model) -> dict[str, ExpertLoRA]:
    """{parameter path: its ExpertLoRA} for every adapted stacked expert weight of `model`, in model order
    (`layers.0.mlp.experts.gate_proj` -> the module at `layers.0.mlp.experts.gate_proj_lora`; views)."""
    out = {}
    for path, (_, node) in module_index(model).items():
        if isinstance(node, ExpertLoRA) and path.endswith(EXPERT_LORA_SUFFIX):
            out[path[: -len(EXPERT_LORA_SUFFIX)]] = node
    return out


def refuse_expert_loras(model, what: str) -> None:
    """AdapterError naming the expert LoRAs of `model`, for operations that do not serve them (`what`)."""
    found = list(expert_loras(model))
    if found:
        raise AdapterError(f"{what}: LoRA on stacked expert weights ({found[:4]}{' ...' if len(found) > 4 else ''}) "
                           "is not supported here; merge it into the experts first (bricks.adapters.merge)")


def replace_expert_loras(model, change) -> nnx.Module:
    """A new model in which each expert LoRA's owner is rebuilt by change(owner clone, name, adapter) -> None (it
    sets the owner's attributes: the weight Variable and/or `<name>_lora`); `model` is not modified."""
    new = nnx.clone(model)
    index = module_index(new)
    for path, adapter in expert_loras(new).items():
        owner_path, _, name = path.rpartition(".")
        change(index[owner_path][1], name, adapter)
    return new

