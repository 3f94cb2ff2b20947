"""The training loop: pre-training from scratch and (brick-selective) fine-tuning from any checkpoint.

    result = train(config, workdir)        # config: see experiments/pretrain.py; workdir: runs/<name>

One step on a global batch of B sequences of L tokens, split into A micro-batches (gradient accumulation):
    loss = sum_{a,b,t} w_abt * nll_abt / sum w_abt,  nll = -log softmax(model(inputs))[targets]
(w = loss_mask when the data has one, else 1), so accumulation gives exactly the full-batch gradient;
then clip the global gradient norm, AdamW with a warmup + cosine / WSD schedule (train/optim.py).
Parameters are float32 master weights; the forward runs in `compute_dtype` (bfloat16 by default on GPU).
Only the parameters selected by `config.trainable` (globs over dotted paths; default all) are differentiated and
held in the optimizer state; the rest are frozen.

Workdir: config.json (resolved), run_info.json (git revision, devices, data manifest), metrics.jsonl,
tensorboard/, checkpoints/<step>/ (orbax: params, opt_state, data iterator, meta; async, keep last N),
best/ (the model with the best validation loss, an orbax model checkpoint), loss.png, report.md.
Re-running the same command resumes from the last complete checkpoint: the data iterator, parameters and
optimizer state are restored, so the following steps reproduce an uninterrupted run (bitwise on CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from configurable_fm import sharding as shd
from configurable_fm.bricks.paths import flat_params, flat_state, path_str, with_params
from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.evaluation import next_token_nll
from configurable_fm.models.factory import build_model, config_to_dict, load_model
from configurable_fm.train import flops as flops_lib
from configurable_fm.train.distributed import save_model_collective
from configurable_fm.train.metrics import MetricWriter, ProgressBar, plot_loss_curve, read_metrics
from configurable_fm.train.optim import make_optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    losses: dict[int, float]
    best_val_loss: float | None
    model: nnx.Module


# ------------------------------------------------------------------------------------------ the model
def with_compute_dtype(model: nnx.Module, dtype, **options) -> nnx.Module:
    """The same parameters (as float32 masters) in a model whose layers compute in `dtype` (and module
    `options`, e.g. remat='dots')."""
    abstract = nnx.eval_shape(lambda: build_model(model.cfg, param_dtype=jnp.float32, dtype=dtype, **options))
    return with_params(abstract, {k: jnp.asarray(v, jnp.float32) for k, v in flat_params(model).items()},
                       check_shapes=False)


def select_trainable(paths: list[str], globs) -> list[str]:
    """The parameter paths matched by any glob (segment-wise, `**` spans segments); each glob must match."""
    chosen = set()
    for glob in globs:
        hits = {p for p in paths if re.fullmatch(glob_to_regex(glob), p)}
        if not hits:
            raise ValueError(f"trainable glob {glob!r} matches no parameter; e.g. {paths[:4]}")
        chosen |= hits
    return [p for p in paths if p in chosen]


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model as (graphdef, path keys): `merge(flat dicts)` rebuilds it from {dotted path: array} dicts."""

    graphdef: Any
    keys: dict[str, tuple]

    @classmethod
    def of(cls, model):
        graphdef, state = nnx.split(model)
        return cls(graphdef, {path_str(p): p for p, _ in nnx.to_flat_state(state)})

    def merge(self, *flats: dict) -> nnx.Module:
        items = [(self.keys[k], v) for flat in flats for k, v in flat.items()]
        return nnx.merge(self.graphdef, nnx.from_flat_state(items))


# ------------------------------------------------------------------------------------------ the step
def loss_sums(model, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights) in float32 for one batch."""
    nll = next_token_nll(model(batch["inputs"]), batch["targets"])
    weights = batch["loss_mask"].astype(jnp.float32) if "loss_mask" in batch else jnp.ones_like(nll)
    if "mask" in batch:  # row mask of padded evaluation batches
        weights = weights * batch["mask"].astype(jnp.float32)[:, None]
    return jnp.sum(nll * weights), jnp.sum(weights)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, accum_steps: int):
    """step(params, opt_state, frozen, batch) -> (params, opt_state, metrics); batch rows are split into
    `accum_steps` micro-batches whose gradient sums are accumulated before the single update."""

    def grads_of(params, frozen, micro):
        def total(p):
            return loss_sums(parts.merge(p, frozen), micro)

        (nll, count), grads = jax.value_and_grad(total, has_aux=True)(params)
        return nll, count, grads

    def step(params, opt_state, frozen, batch):
        if accum_steps == 1:
            nll, count, grads = grads_of(params, frozen, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

            def body(carry, mb):
                nll, count, grads = grads_of(params, frozen, mb)
                return jax.tree.map(jnp.add, carry, (nll, count, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (nll, count, grads), _ = jax.lax.scan(body, zeros, micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": nll / count, "grad_norm": global_norm(grads), "tokens": count}

    return step


def make_eval_step(parts: ModelParts):
    def step(params, frozen, batch):
        return loss_sums(parts.merge(params, frozen), batch)

    return step


# ------------------------------------------------------------------------------------------ run info
def git_revision() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ training
def _to_global(batch: dict, mesh, rules) -> dict:
    """Local (per-process) rows -> global arrays sharded over the batch mesh axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        spec = shd.partition_spec(("batch",) + (None,) * (v.ndim - 1),
                                  (v.shape[0] * jax.process_count(),) + v.shape[1:], mesh, rules)
        out[k] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), v)
    return out


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, data=None,
          task_metrics: dict[str, Callable] | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Runs (or resumes) the training described by `config` in `workdir`.

    data: an object with `train_batches(process_index, process_count)` -> the training iterator (with
    get_state/set_state), `eval_batches(process_index, process_count)` -> this process's rows of the evaluation
    batches, and `manifest` (dict or None); by default built from `config.data` (train/data.py). task_metrics: {name: fn(model) -> {metric: value}}
    evaluated with the validation loss, added to those of `config.task_metrics` (synthetic task names: exact
    match of greedy generations, logged as '<task>/exact_match'; see train/data.py make_task_metrics).
    """
    from configurable_fm.train.data import make_data, make_task_metrics

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config
    if cfg.batch_size % (cfg.grad_accum_steps * jax.process_count()):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps={cfg.grad_accum_steps}"
                         f" x processes={jax.process_count()}")
    compute_dtype = DTYPES[cfg.compute_dtype]
    mesh = shd.make_mesh(tuple(cfg.mesh.shape), tuple(cfg.mesh.axes))
    rules = {**shd.DEFAULT_RULES, **dict(cfg.mesh.get("rules", {}) or {})}

    # Model: from scratch (seeded) or from a checkpoint; float32 masters computing in `compute_dtype`.
    model = load_model(cfg.init_from) if cfg.init_from else build_model(cfg.model.to_dict(), seed=cfg.seed)
    options = {"remat": cfg.remat} if cfg.get("remat", "none") != "none" else {}  # llama only
    model = with_compute_dtype(model, compute_dtype, **options)
    parts = ModelParts.of(model)
    everything = flat_params(model)
    trainable_paths = select_trainable(list(everything), cfg.trainable)
    shardings = {k: v.get_value() for k, v in flat_state(shd.param_shardings(model, mesh, rules)).items()}
    place = lambda flat: {k: jax.device_put(v, shardings[k]) for k, v in flat.items()}
    params = place({k: everything[k] for k in trainable_paths})
    frozen = place({k: v for k, v in everything.items() if k not in params})
    del everything

    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps)
    # Pin the optimizer state's shardings (replicated where the init left them unset), and below make the step
    # return exactly the shardings it was given, so its first call is the only compilation.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.jit(tx.init)(params)
    opt_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
        else replicated, opt_state)
    opt_state = jax.device_put(opt_state, opt_shardings)
    param_shardings = {k: shardings[k] for k in params}
    data = data or make_data(cfg)
    # config.task_metrics (task names) plus the callables passed in; the task data's tokenizer is reused.
    task_metrics = {**make_task_metrics(cfg, getattr(data, "tokenizer", None)), **(task_metrics or {})}
    train_iter = data.train_batches(jax.process_index(), jax.process_count())

    # Resume from the last complete checkpoint, if any (orbax only exposes finalized steps).
    ckpt_dir = (workdir / "checkpoints").absolute()
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=cfg.checkpoint.get("async", True),
        create=True))
    start_step, best_val = 0, None
    if manager.latest_step() is not None:
        start_step = manager.latest_step()
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        restored = manager.restore(start_step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)), opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        params, opt_state = restored.params, restored.opt_state
        train_iter.set_state(restored.data)
        best_val = restored.meta.get("best_val_loss")
        log(f"resumed from {ckpt_dir / str(start_step)} (step {start_step})")
    elif jax.process_index() == 0:
        write_json_atomic(workdir / "config.json", cfg.to_dict())
        write_json_atomic(workdir / "run_info.json", {
            "git": git_revision(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "process_count": jax.process_count(), "model": config_to_dict(model.cfg),
            "trainable": trainable_paths if len(trainable_paths) < len(parts.keys) else "all",
            "data_manifest": data.manifest})

    train_step = jax.jit(make_train_step(parts, tx, cfg.grad_accum_steps), donate_argnums=(0, 1),
                         out_shardings=(param_shardings, opt_shardings, replicated))
    eval_step = jax.jit(make_eval_step(parts))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flop_count = flops_lib.flops_per_token(model.cfg, cfg.seq_len)
    peak = flops_lib.peak_flops_per_device()
    writer = MetricWriter(workdir, resume_step=start_step) if jax.process_index() == 0 else None
    bar = ProgressBar(cfg.steps, initial=start_step,
                      disable=None if jax.process_index() == 0 and cfg.get("progress", True) else True)

    def evaluate(step):
        nll = count = 0.0
        for batch in data.eval_batches(jax.process_index(), jax.process_count()):
            s, c = eval_step(params, frozen, _to_global(batch, mesh, rules))
            nll, count = nll + float(s), count + float(c)
        metrics = {"val_loss": nll / max(count, 1.0)}
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        if task_metrics:
            current = parts.merge(params, frozen)
            for fn in task_metrics.values():
                metrics.update(fn(current))
        return metrics

    def save(step, val_loss):
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(train_iter.get_state()),
            meta=ocp.args.JsonSave({"step": step, "best_val_loss": best_val, "val_loss": val_loss})))

    losses: dict[int, float] = {}
    pending = None  # (step, metrics) of the last dispatched step, checked one step late (no host sync per step)
    t_last, step_last = time.perf_counter(), start_step

    def check(entry):
        step, m = entry
        loss = float(m["loss"])
        if not math.isfinite(loss):
            manager.wait_until_finished()
            raise NonFiniteLoss(f"loss is {loss} at step {step}; stopping. The last good checkpoint is "
                                f"{manager.latest_step()} in {ckpt_dir}")
        losses[step] = loss
        return loss

    try:
        for step in range(start_step + 1, cfg.steps + 1):
            batch = _to_global(next(train_iter), mesh, rules)
            params, opt_state, metrics = train_step(params, opt_state, frozen, batch)
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            is_log = step % cfg.log_every == 0 or step == cfg.steps
            is_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if not (is_log or is_eval or is_ckpt):
                continue
            loss = check(pending)
            pending = None
            record = {"loss": loss, "tokens": step * tokens_per_step, "lr": float(schedule(step - 1)),
                      "grad_norm": float(metrics["grad_norm"])}
            now = time.perf_counter()
            tps = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            record["tokens_per_s"] = tps
            if flop_count and peak:
                record["mfu"] = flops_lib.mfu(tps, flop_count, jax.device_count(), peak)
            val_loss = None
            if is_eval:
                ev = evaluate(step)
                record.update(ev)
                val_loss = ev["val_loss"]
                if best_val is None or val_loss < best_val:
                    best_val = val_loss
                    # every process takes part: the arrays may be sharded over all processes' devices
                    save_model_collective(parts.merge(params, frozen), workdir / "best", overwrite=True)
            if writer:
                writer.write(step, **record)
            bar.update(step, loss=loss, tokens_per_s=tps, mfu=record.get("mfu"))
            if is_ckpt:
                save(step, val_loss)
        if pending is not None:
            check(pending)
    finally:
        manager.wait_until_finished()
        bar.close()
        if writer:
            writer.close()
    manager.close()
    if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists():
        plot_loss_curve(read_metrics(workdir / "metrics.jsonl"), workdir / "loss.png")
    return TrainResult(workdir, cfg.steps, losses, best_val, parts.merge(params, frozen))
