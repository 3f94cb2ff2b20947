"""Adapter training in the trainer: `config.adapter` attaches an adapter to the initial model, `config.trainable`
then selects its parameters, and the trained adapter is written at the end as a brick set and in PEFT's format.

    c.adapter = adapter_config("lora", targets=("layers.*.self_attn.[qv]_proj",), rank=16, alpha=32)
    c.trainable = ("AdapterParam:**",)     # only the adapter: differentiated, and alone in the optimizer state
    c.frozen_dtype = "bfloat16"            # the frozen base stored in bf16 (no float32 master copy)

The section (all keys always present, so `--config.adapter.KEY=VALUE` overrides work; `kind` '' = no adapter):
    kind      'lora' | 'dora' | 'ia3' | 'bottleneck'
    targets   module path globs (bricks.adapters.attach); bottleneck: 'houlsby' / 'pfeiffer' or sublayer globs
    target_parameters  stacked expert weight globs (PEFT's name; kind 'lora' only): a LoRA per expert with the
              same rank / alpha / rslora / init / seed (bricks.adapters.attach_experts), e.g.
              ('layers.*.mlp.*_proj',) on a MoEfied model; () for none. `targets` may then be () too. No dropout
              for them (dropout 0, as PEFT); save 'peft' only for a Mixtral model (PEFT's target_parameters:
              checked when the adapter is attached). lora.expert_rank: their rank per expert (0: lora.rank; an
              expert LoRA of rank r holds E times the factors of a Linear's).
    init      '' (the kind's default) or an initialisation of that kind (LORA_INITS, IA3_INITS, BOTTLENECK_INITS)
    seed      adapter initialisation seed (keys from (seed, module path): a resumed run re-attaches the same one)
    lora      rank, alpha, rslora, dropout (lora / dora); dropout p > 0 (PEFT's lora_dropout) drops the LoRA
              branch's input in every training step (bricks.adapters.lora_dropout, keys from the step's rng; no
              dropout in evaluation); LoRA only: DoRA, IA3 or bottleneck with dropout is a ConfigError
    bottleneck  size (0: d // reduction_factor), reduction_factor, non_linearity ('' = the preset's), scaling
    save      what `write_adapter` writes into the workdir at the end: 'brick' -> adapter/ (bricks.adapters
              .save_adapter; load with load_adapter(base, dir)), 'peft' -> adapter_peft/ (to_peft, which
              PeftModel.from_pretrained loads on the transformers base; not for bottleneck adapters)

The frozen base's dtype (`config.frozen_dtype`): '' keeps the trainer's float32 master copy of every parameter;
'keep' stores the frozen parameters in the dtype they were loaded in; a dtype name ('bfloat16', 'float16',
'float32') casts them. Trainable parameters are float32 masters in every case (adapters are float32 anyway), and
the modules compute in `config.compute_dtype`. The frozen parameters are constants of the step, so they come out
of training bit-identical (in the dtype chosen here).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from configurable_fm.errors import ConfigError
from configurable_fm.interop.hf import UnsupportedModel
from configurable_fm.interop.peft_experts import check_mixtral

ADAPTER_KINDS = ("lora", "dora", "ia3", "bottleneck")
SAVE_FORMATS = ("brick", "peft")
FROZEN_DTYPES = ("", "keep", "float32", "bfloat16", "float16")
BRICK_DIR, PEFT_DIR = "adapter", "adapter_peft"


def adapter_config(kind: str = "lora", *, targets=("layers.*.self_attn.[qv]_proj",), init: str = "", seed: int = 0,
                   rank: int = 8, alpha: float = 8.0, rslora: bool = False, dropout: float = 0.0,
                   size: int = 0, reduction_factor: float = 16.0, non_linearity: str = "", scaling: float = 1.0,
                   save=("brick", "peft"), target_parameters=(), expert_rank: int = 0) -> ml_collections.ConfigDict:
    """The `config.adapter` section (module docstring) with these values."""
    as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)  # noqa: E731
    return ml_collections.ConfigDict(dict(
        kind=kind, targets=as_tuple(targets), target_parameters=as_tuple(target_parameters), init=init, seed=seed,
        lora=dict(rank=rank, alpha=float(alpha), rslora=rslora, dropout=float(dropout), expert_rank=expert_rank),
        bottleneck=dict(size=size, reduction_factor=float(reduction_factor), non_linearity=non_linearity,
                        scaling=float(scaling)),
        save=tuple(save)))


def configured(cfg) -> ml_collections.ConfigDict | None:
    """The config's adapter section, or None when it has none (no `adapter` key, or kind '')."""
    section = cfg.get("adapter")
    return section if section and section.get("kind") else None


def check_adapter_config(cfg) -> None:
    """ConfigError naming the key for a bad adapter section or frozen_dtype (before anything is written)."""
    frozen = cfg.get("frozen_dtype", "")
    if frozen not in FROZEN_DTYPES:
        raise ConfigError(f"frozen_dtype={frozen!r} is not one of {list(FROZEN_DTYPES)}")
    a = configured(cfg)
    if a is None:
        return
    if a.kind not in ADAPTER_KINDS:
        raise ConfigError(f"adapter.kind={a.kind!r} is not one of {list(ADAPTER_KINDS)} (or '' for no adapter)")
    save = (a.save,) if isinstance(a.save, str) else tuple(a.get("save", ()))
    bad = [s for s in save if s not in SAVE_FORMATS]
    if bad:
        raise ConfigError(f"adapter.save={save!r}: {bad} are not formats {list(SAVE_FORMATS)}")
    if a.kind == "bottleneck" and "peft" in save:
        raise ConfigError("adapter.save includes 'peft', but PEFT has no bottleneck adapter; use save=('brick',)")
    if a.kind in ("lora", "dora") and not 0.0 <= float(a.lora.dropout) < 1.0:
        raise ConfigError(f"adapter.lora.dropout={a.lora.dropout} must lie in [0, 1)")
    if a.kind == "dora" and float(a.lora.dropout) != 0.0:
        raise ConfigError(f"adapter.lora.dropout={a.lora.dropout}: dropout with DoRA is not implemented (PEFT "
                          "recomputes the base output on the dropped input); set it to 0.0 or use kind 'lora'")
    if a.kind in ("ia3", "bottleneck") and float(a.lora.dropout) != 0.0:
        raise ConfigError(f"adapter.lora.dropout={a.lora.dropout} drops a LoRA branch's input; kind {a.kind!r} has "
                          "no dropout here: set it to 0.0")
    targets = (a.targets,) if isinstance(a.targets, str) else tuple(a.targets)
    params = expert_targets(a)
    if not all(isinstance(t, str) and t for t in targets + params) or not (targets or params):
        raise ConfigError(f"adapter.targets={a.targets!r} must name module path globs"
                          + (" (or adapter.target_parameters stacked expert weights)" if a.kind == "lora" else ""))
    if params:
        if a.kind != "lora":
            raise ConfigError(f"adapter.target_parameters={params!r}: a LoRA on stacked expert weights is kind "
                              f"'lora', not {a.kind!r}")
        if float(a.lora.dropout) != 0.0:
            raise ConfigError(f"adapter.lora.dropout={a.lora.dropout}: no dropout with target_parameters (as PEFT: "
                              "the input of a materialised weight change cannot be dropped); set it to 0.0")


def expert_targets(section) -> tuple[str, ...]:
    """The section's `target_parameters` globs as a tuple (() when absent: configs written before the key)."""
    value = section.get("target_parameters", ())
    return (value,) if isinstance(value, str) else tuple(value or ())


def attach_configured(model: nnx.Module, cfg) -> nnx.Module:
    """`model` with the adapter of `config.adapter` attached (the model itself when there is none); AdapterError
    (a UserError naming the paths) for targets that do not fit the model."""
    from configurable_fm.bricks import adapters

    a = configured(cfg)
    if a is None:
        return model
    targets = (a.targets,) if isinstance(a.targets, str) else list(a.targets)
    init = a.init or None
    if a.kind == "bottleneck":
        b = a.bottleneck
        target = targets[0] if len(targets) == 1 and targets[0] in ("houlsby", "pfeiffer") else targets
        return adapters.attach_bottleneck(
            model, target, size=int(b.size) if b.size else None,
            reduction_factor=None if b.size else float(b.reduction_factor),
            non_linearity=b.non_linearity or None, scaling=float(b.scaling), init=init or "kaiming", seed=int(a.seed))
    if a.kind == "ia3":
        return adapters.attach(model, "ia3", targets, init=init, seed=int(a.seed))
    lora = dict(rank=int(a.lora.rank), alpha=float(a.lora.alpha), rslora=bool(a.lora.rslora), init=init,
                seed=int(a.seed))
    adapted = adapters.attach(model, a.kind, targets, **lora) if targets else model
    params = expert_targets(a)
    if not params:
        return adapted
    rank = int(a.lora.get("expert_rank", 0)) or lora["rank"]
    adapted = adapters.attach_experts(adapted, list(params), **{**lora, "rank": rank})
    save = (a.save,) if isinstance(a.save, str) else tuple(a.save)
    if "peft" in save:  # PEFT's form exists for a Mixtral model's experts only: say so now, not after training
        try:
            check_mixtral(adapted, adapters.expert_loras(adapted), "adapter.save 'peft'")
        except UnsupportedModel as e:
            raise ConfigError(f"{e}; or set adapter.save=('brick',)") from None
    return adapted


DROPOUT_SALT = 0x10AD  # the dropout keys: fold_in(the step's rng, DROPOUT_SALT), apart from the task's own draws


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRADropoutTask:
    """`inner` (a trainer task, train/task.py) with LoRA dropout at `rate` in its training loss: loss(model, batch,
    step, rng) runs the inner loss inside bricks.adapters.lora_dropout(fold_in(rng, DROPOUT_SALT), rate);
    evaluation is the inner task's, without dropout."""

    inner: Any
    rate: float = dataclasses.field(metadata=dict(static=True))

    def loss(self, model, batch, step, rng):
        from configurable_fm.bricks.adapters import lora_dropout

        with lora_dropout(jax.random.fold_in(rng, DROPOUT_SALT), self.rate):
            return self.inner.loss(model, batch, step, rng)

    def eval_loss(self, model, batch, step):
        from configurable_fm.train.task import eval_loss

        return eval_loss(self.inner, model, batch, step)

    def setup(self, model, trainable):
        from configurable_fm.train.task import set_up_task

        return dataclasses.replace(self, inner=set_up_task(self.inner, model, trainable))


def with_dropout(task, cfg):
    """`task` wrapped in LoRADropoutTask when config.adapter is a LoRA with dropout > 0; `task` itself otherwise."""
    a = configured(cfg)
    rate = float(a.lora.dropout) if a is not None and a.kind == "lora" else 0.0
    return LoRADropoutTask(task, rate) if rate > 0 else task


def stored_dtypes(model: nnx.Module) -> dict[str, jnp.dtype]:
    """{path: dtype} of every variable of `model` (read before the trainer makes float32 master copies)."""
    from configurable_fm.train.state import variable_values

    return {k: jnp.result_type(v) for k, v in variable_values(model).items()}


def frozen_in_dtype(frozen: dict, cfg, dtypes: dict[str, jnp.dtype]) -> dict:
    """The frozen partition {path: array} in the dtype `config.frozen_dtype` asks for (module docstring): as given
    for '', the loaded dtype (`dtypes`) for 'keep', else that dtype; only floating arrays are cast."""
    from configurable_fm.models.factory import DTYPES

    mode = cfg.get("frozen_dtype", "")
    if not mode:
        return frozen
    floating = lambda v: jnp.issubdtype(jnp.result_type(v), jnp.floating)
    target = (lambda k: dtypes[k]) if mode == "keep" else (lambda k: DTYPES[mode])
    return {k: v.astype(target(k)) if floating(v) else v for k, v in frozen.items()}


def write_adapter(model: nnx.Module, cfg, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Writes the trained adapter of `model` as `config.adapter.save` asks (module docstring), replacing earlier
    outputs of this run; returns {format: directory}. Process 0 only; a multi-process run whose adapter arrays are
    not all on this process writes nothing here (the best/ and final checkpoints hold the adapter)."""
    from configurable_fm.bricks import adapters

    a = configured(cfg)
    if a is None or jax.process_index() != 0:
        return {}
    state = adapters.adapter_state(model)
    if not all(getattr(v, "is_fully_addressable", True) for v in state.values()):
        log("adapter: its arrays are spread over several processes; not written (load the best/ checkpoint and "
            "call bricks.adapters.save_adapter / to_peft)")
        return {}
    save = (a.save,) if isinstance(a.save, str) else tuple(a.save)
    out = {}
    if "brick" in save:
        out["brick"] = adapters.save_adapter(model, Path(workdir) / BRICK_DIR, source=str(cfg.get("name", "")),
                                             overwrite=True)
    if "peft" in save:
        out["peft"] = adapters.to_peft(model, Path(workdir) / PEFT_DIR,
                                       base_model_name_or_path=cfg.get("init_from") or None, overwrite=True,
                                       lora_dropout=float(a.lora.dropout) if a.kind == "lora" else 0.0)
    for fmt, path in out.items():
        log(f"adapter ({a.kind}, {fmt}) written to {path}")
    return out
