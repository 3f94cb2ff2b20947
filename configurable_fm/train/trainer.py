"""The training loop: pre-training from scratch and (brick-selective, LoRA, constrained, ...) fine-tuning.

    result = train(config, workdir)                        # config: experiments/pretrain.py; workdir: runs/<name>
    result = train(config, workdir, model=m, task=AnchoredTask(strength=1e-3))   # any nnx model, any task

The model: `model=` (any nnx model, e.g. the output of a surgery), else `config.init_from` (a registry name,
.gguf file, HF dir or orbax checkpoint), else `config.model` built from `config.seed`. The trainer copies it with
float32 master parameters and modules computing in `config.compute_dtype` (models.factory.with_compute_dtype); the caller's model
is never modified. `config.remat` (none | dots | full) and `config.scan_layers` (bool, default False: llama's identical
consecutive layers run as one jax.lax.scan, same parameters, paths and results; models/llama.py) are set on that copy.

The objective. A step on a global batch of B rows split into A micro-batches (gradient accumulation) minimises
    J = sum_a w_a L_a / sum_a w_a,       (L_a, m_a) = task.loss(model, micro-batch a, step, rng_a),  w_a = m_a['weight']
(J = L_1 when A = 1). The default task (task.NextTokenTask) is the token-mean next-token NLL with w_a the number
of scored tokens,
    L_a = sum_{b,t} w_bt nll_bt / sum_{b,t} w_bt,   nll = -log softmax(model(inputs))[targets]
(w_bt = loss_mask, 1 without one), so J = the NLL of the full batch and accumulation is exact. Then the global
gradient norm is clipped and AdamW with a warmup + cosine / WSD schedule applied (train/optim.py).

The step number s (1 for the first step, as in metrics.jsonl) reaches the task as a traced int32 (one
compilation for all steps), and its key is rng_a = fold_in(fold_in(key(config.seed), s), a), a = 0..A-1:
the same on every device and process, and on a resumed run. The task protocol (loss, eval_loss, setup) is in
train/task.py; the partitions in train/state.py:
    trainable : the variables selected by `config.trainable` (('**',): every parameter; 'TYPE:GLOB' entries
                select other variable types, e.g. 'LoRAParam:**'): differentiated, in the optimizer state;
    frozen    : the other parameters: step constants, no gradients, no optimizer state;
    other     : the other variables (non-Param): carried through the steps, assigned by the task if it wants.

Adapters (train/adapters.py): `config.adapter` attaches an adapter (LoRA, DoRA, IA3, bottleneck) to the initial
model, `config.trainable = ('AdapterParam:**',)` trains it alone (only it has optimizer state), `config.frozen_dtype`
keeps the frozen base in bf16 (or its loaded dtype) instead of float32 masters, and at the end the adapter is
written to WORKDIR/adapter/ (brick set) and WORKDIR/adapter_peft/ (PEFT) as `config.adapter.save` asks.

Evaluation (every `eval_every` steps and at the end): val_loss = sum_b w_b L_b / sum_b w_b over the evaluation
batches with the task's eval_loss (default: the same NLL), val_ppl = exp(val_loss), val_<m> for other task
metrics, and the `task_metrics` callables (e.g. exact match of greedy generations).

The parts: `set_up` (validate the config, build and partition the model, shard, optimizer, task, data, jit; writes
nothing), `Run(setup, workdir)` (restore the last checkpoint, or write config.json and run_info.json), `Run.loop`
(steps, logging, evaluation, best/, checkpoints), `Run.close` and `Run.result` (wait for writes, plot, TrainResult).

Workdir: config.json (the resolved config in force), resumes.jsonl (one line per resume: step, changed keys),
run_info.json (git revision, devices, partitions, data manifest), metrics.jsonl
(one line per logged step: loss, tokens, lr, grad_norm, tokens_per_s, mfu, task metrics, val_*), tensorboard/,
checkpoints/<step>/ (orbax: params = the trainable partition, opt_state, other (when the model has such
variables), data = the data iterator, meta (step, best val_loss, the partitions' paths); async, keep last N),
best/ (the model with the best validation loss: an orbax model checkpoint, interop/orbax_io.py), loss.png.
Re-running the same command (and, with `model=`, the same initial model) resumes from the last complete
checkpoint; a config that differs from config.json is refused unless the changed keys are in `allow_changes`
(train/resume.py). On resume the data iterator, trainable and other variables and the optimizer state are restored, so the
following steps reproduce an uninterrupted run (bitwise on CPU). A non-finite loss or gradient norm stops the run
(NonFiniteLoss) and leaves the last good checkpoint. Every enumerated option is checked before anything is
written (ConfigError).
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configurable_fm import sharding as shd
from configurable_fm.bricks.paths import flat_state
from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError, UserError
from configurable_fm.models.structure import check_consistent, is_family_model
from configurable_fm.interop.atomic import make_directory, write_json_atomic
from configurable_fm.interop.loader import load_model
from configurable_fm.models.factory import DTYPES, build_model, config_to_dict, with_compute_dtype
from configurable_fm.models.gpt2 import GPT2Config
from configurable_fm.models.llama import REMAT_POLICIES, LlamaConfig
from configurable_fm.train import flops as flops_lib
from configurable_fm.train.adapters import (attach_configured, check_adapter_config, configured, frozen_in_dtype,
                                            stored_dtypes, with_dropout, write_adapter)
from configurable_fm.train.distributed import save_model_collective
from configurable_fm.train.metrics import MetricWriter, ProgressBar, plot_loss_curve, read_metrics
from configurable_fm.train.optim import SCHEDULES, make_optimizer
from configurable_fm.train.resume import check_resume, describe_changes, record_resume
from configurable_fm.train.state import ModelParts, TrainState
from configurable_fm.train.step import make_eval_step, make_step, make_train_step, split_arrays
from configurable_fm.train.task import NextTokenTask, Task, loss_sums, set_up_task

__all__ = ["train", "TrainResult", "NonFiniteLoss", "ConfigError", "check_config", "set_up", "TrainSetup", "Run",
           "loss_sums", "ModelParts", "TrainState", "make_train_step",
           "Task", "NextTokenTask"]

TRAINER_METRICS = ("step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl")


class NonFiniteLoss(UserError, RuntimeError):
    """The training loss or its gradient norm became NaN or infinite (the message names the step and the last good
    checkpoint)."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    losses: dict[int, float]
    best_val_loss: float | None
    model: nnx.Module


# ------------------------------------------------------------------------------------------ validation
def _one_of(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(valid)}")


def check_config(cfg: ml_collections.ConfigDict, *, model=None, data=None) -> None:
    """Checks the enumerated and related options of a train config, naming the key and the valid values; called
    before anything is written to the workdir."""
    from configurable_fm.train.data import DATA_KINDS

    _one_of("compute_dtype", cfg.compute_dtype, DTYPES)
    _one_of("remat", cfg.get("remat", "none"), REMAT_POLICIES)
    if not isinstance(cfg.get("scan_layers", False), bool):
        raise ConfigError(f"scan_layers={cfg.scan_layers!r} must be True or False")
    if "schedule" in cfg.optimizer:
        _one_of("optimizer.schedule", cfg.optimizer.schedule, SCHEDULES)
    if data is None:
        _one_of("data.kind", cfg.data.kind, DATA_KINDS)
    # 0 would divide by zero in the loop (log_every, checkpoint_every), plot an empty run (steps), shift the
    # schedule (a negative warmup) or turn clipping into gradient ascent (a negative grad_clip)
    for key, low in (("steps", 1), ("log_every", 1), ("checkpoint_every", 1), ("eval_every", 0),
                     ("optimizer.warmup_steps", 0), ("batch_size", 1), ("seed", 0), ("grad_accum_steps", 1)):
        section, _, leaf = key.rpartition(".")
        value = (cfg[section] if section else cfg).get(leaf, low)
        if not is_int(value) or value < low:
            raise ConfigError(f"{key}={value!r} must be an int >= {low}")
    clip = cfg.optimizer.get("grad_clip", 0.0)
    if not is_real(clip) or not clip >= 0:
        raise ConfigError(f"optimizer.grad_clip={clip!r} must be a number >= 0 (0 disables clipping)")
    accum = cfg.get("grad_accum_steps", 1)
    if cfg.batch_size % (accum * jax.process_count()):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by grad_accum_steps={accum}"
                          f" x processes={jax.process_count()}")
    if model is not None and cfg.get("init_from"):
        raise ConfigError(f"both a model argument and config.init_from={cfg.init_from!r} are given; "
                          "set config.init_from='' to train the model passed in")
    check_adapter_config(cfg)  # config.adapter and config.frozen_dtype (train/adapters.py)


# ------------------------------------------------------------------------------------------ set-up
def _replicated(mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def step_array(n: int, mesh) -> jax.Array:
    """The step counter of a TrainState: an int32 scalar, replicated over `mesh`."""
    return jax.device_put(np.int32(n), _replicated(mesh))


@dataclasses.dataclass
class TrainSetup:
    """Everything a run needs that does not depend on the workdir: the config, mesh, model partitions, the placed
    frozen parameters and initial state with their shardings, the optimizer schedule, the task (and its array
    leaves, placed), the data, task metrics and the (not yet compiled) jitted step functions."""

    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: dict
    parts: ModelParts
    initial: str  # where the initial model came from (run_info.json)
    model_cfg: Any  # the model's family config (model.cfg) for FLOPs and run_info; None when it has none
    frozen: dict
    state: TrainState  # the initial state (step 0); the first step consumes it (donation)
    schedule: Callable
    task: Any
    task_arrays: list
    data: Any
    task_metrics: dict
    train_step: Callable  # jitted: (state, frozen, task_arrays, batch) -> (state, metrics); state donated
    eval_step: Callable  # jitted: (state, frozen, task_arrays, batch) -> metrics

    def to_global(self, batch: dict) -> dict:
        """Local (per-process) rows -> global arrays sharded over the batch mesh axes."""
        return shd.global_batch(dict(batch), self.mesh, self.rules)

    def model_of(self, state: TrainState) -> nnx.Module:
        return self.parts.merge(state.trainable, self.frozen, state.other)


def initial_model(cfg: ml_collections.ConfigDict, model: nnx.Module | None) -> tuple[nnx.Module, str]:
    """(the model to start from, as given; where it came from): `model`, else `config.init_from` loaded, else
    `config.model` built from `config.seed`."""
    if model is not None:
        return model, "model argument"
    if cfg.init_from:
        return load_model(cfg.init_from), str(cfg.init_from)
    return build_model(cfg.model.to_dict(), seed=cfg.seed), f"config.model, seed {cfg.seed}"


def place_state(model: nnx.Module, parts: ModelParts, tx, mesh, rules) -> tuple[dict, TrainState, TrainState]:
    """(frozen, initial TrainState, its shardings): the partitions of `model` placed on `mesh` by the sharding
    rules, and the optimizer state over the trainable ones (replicated where its init leaves a leaf unsharded).
    The donated partitions (trainable, other) are copies: the model passed in keeps its arrays."""
    replicated = _replicated(mesh)
    shardings = {k: v.get_value() for k, v in flat_state(shd.param_shardings(model, mesh, rules), nnx.Variable).items()}
    place = lambda flat, copy: {k: jax.device_put(v, shardings[k], may_alias=False if copy else None)
                                for k, v in flat.items()}
    trainable, frozen, other = parts.split(model)
    trainable, frozen, other = place(trainable, True), place(frozen, False), place(other, True)
    opt_state, opt_shardings = on_mesh(jax.jit(tx.init)(trainable), mesh)
    state = TrainState(step_array(0, mesh), trainable, opt_state, other)
    return frozen, state, TrainState(replicated, {k: shardings[k] for k in trainable}, opt_shardings,
                                     {k: shardings[k] for k in other})


def on_mesh(tree, mesh) -> tuple[Any, Any]:
    """(`tree` with every array leaf on `mesh`, its shardings): a leaf already sharded over `mesh` (a NamedSharding
    of it) is kept, any other is put there replicated. An optimizer's init under jax.jit leaves its scalars (Adam's
    count) without the mesh, while a step over the mesh returns them on it: a jitted step fed the init's state
    would see new input types at its second call and compile again (`make_train_step`'s callers: the trainer,
    scripts/bench_train.py)."""
    shardings = jax.tree.map(lambda x: x.sharding if is_on_mesh(x, mesh) else _replicated(mesh), tree)
    return jax.device_put(tree, shardings), shardings


def is_on_mesh(x, mesh) -> bool:
    """Whether `x` is a jax array sharded over `mesh` (a NamedSharding of it)."""
    return isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh


def place_task(task: Any, mesh) -> tuple[list, Callable[[list], Any]]:
    """(the task's array leaves on `mesh`: kept when already there, else replicated copies; rebuild(arrays) -> task)."""
    arrays, rebuild = split_arrays(task)
    return [x if is_on_mesh(x, mesh) else jax.device_put(x, _replicated(mesh), may_alias=False) for x in arrays], \
        rebuild


def set_up(cfg: ml_collections.ConfigDict, *, model: nnx.Module | None = None, task: Any = None, data=None,
           task_metrics: dict[str, Callable] | None = None) -> TrainSetup:
    """Validates the config, builds the model, its partitions and shardings, the optimizer, the task and the
    data, and jits the steps; nothing is written (a config error leaves no workdir behind)."""
    from configurable_fm.train.data import make_data, make_task_metrics

    check_config(cfg, model=model, data=data)
    mesh = shd.make_mesh(tuple(cfg.mesh.shape), tuple(cfg.mesh.axes))
    rules = {**shd.DEFAULT_RULES, **dict(cfg.mesh.get("rules", {}) or {})}
    model, initial = initial_model(cfg, model)
    if configured(cfg):  # config.adapter: attached to the initial model (train/adapters.py)
        model, initial = attach_configured(model, cfg), f"{initial} + {cfg.adapter.kind} adapter"
    dtypes = stored_dtypes(model)
    model = with_compute_dtype(model, DTYPES[cfg.compute_dtype], remat=cfg.get("remat", "none"),
                               scan_layers=cfg.get("scan_layers", False))
    if is_family_model(model):  # the tree is the truth: never train (and count FLOPs of) a model its config misdescribes
        check_consistent(model, "train")
    parts = ModelParts.of(model, tuple(cfg.trainable))
    if cfg.get("frozen_dtype", ""):  # the frozen parameters in the dtype asked for, not float32 masters
        trainable, frozen, other = parts.split(model)
        model = parts.merge(trainable, frozen_in_dtype(frozen, cfg, dtypes), other)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps)
    frozen, state, state_shardings = place_state(model, parts, tx, mesh, rules)
    task = set_up_task(with_dropout(task if task is not None else NextTokenTask(), cfg), model, parts.trainable)
    task_arrays, rebuild = place_task(task, mesh)
    model_cfg = model.cfg if is_family_model(model) else None  # any other `cfg` attribute is not a model config
    del model

    data = data or make_data(cfg)
    # no evaluation batch would log val_loss 0 (a sum over nothing) and keep that model as best/
    if cfg.eval_every and next(iter(data.eval_batches(jax.process_index(), jax.process_count())), None) is None:
        raise ConfigError(f"eval_every={cfg.eval_every} but the evaluation data has no batch (data.max_eval_batches"
                          f"={cfg.data.get('max_eval_batches')!r}, or fewer held-out tokens than one window of "
                          f"seq_len + 1 = {cfg.seq_len + 1}); set eval_every=0 to train without evaluation")
    # config.task_metrics (task names) plus the callables passed in; the task data's tokenizer is reused.
    task_metrics = {**make_task_metrics(cfg, getattr(data, "tokenizer", None)), **(task_metrics or {})}
    # The step returns exactly the shardings it is given, so that its first call is its only compilation.
    step_fn = make_step(parts, tx, task, cfg.get("grad_accum_steps", 1), cfg.seed, rebuild)
    train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, _replicated(mesh)))
    eval_step = jax.jit(make_eval_step(parts, task, rebuild))
    return TrainSetup(cfg, mesh, rules, parts, initial, model_cfg, frozen, state, schedule, task, task_arrays, data,
                      task_metrics, train_step, eval_step)


# ------------------------------------------------------------------------------------------ run info
def git_revision() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}


def run_info(setup: TrainSetup) -> dict:
    parts = setup.parts
    return {
        "git": git_revision(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "model": config_to_dict(setup.model_cfg) if setup.model_cfg is not None else None,
        "initial_model": setup.initial,
        "trainable": "all" if not (parts.frozen or parts.other) else list(parts.trainable),
        "other": list(parts.other), "task": type(setup.task).__name__, "data_manifest": setup.data.manifest}


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_args(state: TrainState, data_state, meta: dict) -> ocp.args.Composite:
    """What a training checkpoint holds (module docstring): params (the trainable partition), opt_state, other
    (when there is any), data (the iterator's state) and meta (step, best_val_loss, val_loss, partitions)."""
    items = {"params": ocp.args.StandardSave(state.trainable), "opt_state": ocp.args.StandardSave(state.opt_state),
             "data": ocp.args.JsonSave(data_state), "meta": ocp.args.JsonSave(meta)}
    if state.other:
        items["other"] = ocp.args.StandardSave(state.other)
    return ocp.args.Composite(**items)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, like: TrainState, mesh,
                       meta: dict | None = None) -> tuple[TrainState, Any, dict]:
    """(TrainState at `step`, the data iterator's state, meta) of a training checkpoint, restored with the
    shapes, dtypes and shardings of `like` (a state of the same run's structure)."""
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    if meta is None:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    items = {"params": ocp.args.StandardRestore(abstract(like.trainable)),
             "opt_state": ocp.args.StandardRestore(abstract(like.opt_state)), "data": ocp.args.JsonRestore()}
    if like.other:
        items["other"] = ocp.args.StandardRestore(abstract(like.other))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    state = TrainState(step_array(step, mesh), restored.params, restored.opt_state,
                       restored.other if like.other else {})
    return state, restored.data, meta


# ------------------------------------------------------------------------------------------ the run
class Run:
    """One run of a TrainSetup in a workdir. Making it creates the workdir and restores the last checkpoint (or
    starts fresh and writes config.json and run_info.json); `loop` takes the steps (logging, evaluating,
    checkpointing); `close` waits for pending writes; `result` plots the loss curve and returns the TrainResult."""

    def __init__(self, setup: TrainSetup, workdir: Path, log: Callable[[str], None] = print,
                 allow_changes: Sequence[str] = ()):
        cfg = setup.cfg
        self.setup, self.workdir, self.log = setup, workdir, log
        self.train_iter = setup.data.train_batches(jax.process_index(), jax.process_count())
        self.state = setup.state
        self.start_step, self.best_val = 0, None
        self.losses: dict[int, float] = {}
        self.ckpt_dir = (workdir / "checkpoints").absolute()
        make_directory(workdir, "workdir")
        self.manager = ocp.CheckpointManager(self.ckpt_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=cfg.checkpoint.get("async", True),
            create=True))
        if self.manager.latest_step() is not None:
            try:
                changes = check_resume(workdir, cfg.to_dict(), allow_changes)  # before anything is written
                self.restore(self.manager.latest_step())
            except BaseException:
                self.manager.close()
                raise
            if jax.process_index() == 0:
                record_resume(workdir, self.start_step, cfg.to_dict(), changes)
            if changes:
                log(f"resumed with changed config: {describe_changes(changes)}")
        elif jax.process_index() == 0:
            write_json_atomic(workdir / "config.json", cfg.to_dict())
            write_json_atomic(workdir / "run_info.json", run_info(setup))
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        # FLOPs are counted for llama and gpt2 configs; for any other model MFU is unknown, not an error
        self.flop_count = (flops_lib.flops_per_token(setup.model_cfg, cfg.seq_len)
                           if isinstance(setup.model_cfg, (LlamaConfig, GPT2Config)) else None)
        peak_dtype = flops_lib.matmul_peak_dtype(cfg.compute_dtype)  # float32: TF32 on a GPU, not the bf16 peak
        self.peak = flops_lib.peak_flops_per_device(dtype=peak_dtype) if peak_dtype else None
        self.writer = MetricWriter(workdir, resume_step=self.start_step) if jax.process_index() == 0 else None
        self.bar = ProgressBar(cfg.steps, initial=self.start_step,
                               disable=None if jax.process_index() == 0 and cfg.get("progress", True) else True)

    # -------------------------------------------------------------------------------- checkpoints
    def _partitions(self) -> dict:
        return {"trainable": list(self.setup.parts.trainable), "other": list(self.setup.parts.other)}

    def restore(self, step: int) -> None:
        """The state, data iterator and best validation loss of checkpoint `step` (orbax only lists finalised
        steps); a checkpoint written with other partitions is an error naming the difference."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = meta.get("partitions")
        if saved is not None and saved != self._partitions():
            now = self._partitions()
            diff = {k: {"checkpoint only": sorted(set(saved[k]) - set(now[k]))[:6],
                        "this run only": sorted(set(now[k]) - set(saved[k]))[:6]} for k in now if saved[k] != now[k]}
            raise ConfigError(f"checkpoint {self.ckpt_dir / str(step)} holds other partitions than this run's "
                              f"config.trainable selects: {diff}; resume with the same trainable, or use a new workdir")
        state, data_state, _ = restore_checkpoint(self.manager, step, self.state, self.setup.mesh, meta=meta)
        self.state = state
        self.train_iter.set_state(data_state)
        self.start_step, self.best_val = step, meta.get("best_val_loss")
        self.log(f"resumed from {self.ckpt_dir / str(step)} (step {step})")

    def save(self, step: int, val_loss: float | None) -> None:
        self.manager.save(step, args=checkpoint_args(self.state, self.train_iter.get_state(), {
            "step": step, "best_val_loss": self.best_val, "val_loss": val_loss, "partitions": self._partitions()}))

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """val_loss (weighted by the task's weights), val_ppl, val_<metric>, and the task metric callables."""
        s = self.setup
        sums: dict[str, float] = {}
        total = 0.0
        for batch in s.data.eval_batches(jax.process_index(), jax.process_count()):
            m = {k: float(v) for k, v in s.eval_step(self.state, s.frozen, s.task_arrays, s.to_global(batch)).items()}
            w = m.pop("weight")
            total += w
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + w * v
        denom = total if total > 0 else 1.0
        metrics = {"val_loss": sums.pop("loss", 0.0) / denom}
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        metrics.update({f"val_{k}": v / denom for k, v in sums.items()})
        if s.task_metrics:
            current = s.model_of(self.state)
            for fn in s.task_metrics.values():
                metrics.update(fn(current))
        return metrics

    # -------------------------------------------------------------------------------- the steps
    def check(self, step: int, metrics: dict) -> float:
        """The step's loss as a float; a non-finite loss or gradient norm stops the run (after pending checkpoint
        writes). The gradient too: a finite loss with a non-finite gradient (e.g. a bf16 overflow in the backward
        pass; clipping cannot mend a NaN norm) leaves non-finite parameters, which must not be checkpointed."""
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.manager.wait_until_finished()
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm} (loss {loss})"
            raise NonFiniteLoss(f"{what} at step {step}; stopping. The last good checkpoint is "
                                f"{self.manager.latest_step()} in {self.ckpt_dir}")
        self.losses[step] = loss
        return loss

    def record(self, step: int, loss: float, metrics: dict, elapsed_steps: int, seconds: float) -> dict:
        tps = elapsed_steps * self.tokens_per_step / max(seconds, 1e-9)
        record = {"loss": loss, "tokens": step * self.tokens_per_step, "lr": float(self.setup.schedule(step - 1)),
                  "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tps}
        if self.flop_count and self.peak:
            # the devices of the mesh, which may be fewer than jax.device_count()
            record["mfu"] = flops_lib.mfu(tps, self.flop_count, self.setup.mesh.devices.size, self.peak)
        extra = {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm", "weight")}
        clash = sorted(set(extra) & set(TRAINER_METRICS) | {k for k in extra if k.startswith("val_")})
        if clash:
            raise ConfigError(f"task {type(self.setup.task).__name__} returns metric(s) {clash}, names the trainer "
                              f"logs itself ({list(TRAINER_METRICS)}, val_*); rename them")
        return {**record, **extra}

    def loop(self) -> None:
        """Steps start_step+1 .. config.steps. Each step's loss is checked one step late (no host sync per step),
        except on steps that log, evaluate or checkpoint."""
        s, cfg = self.setup, self.setup.cfg
        pending = None  # (step, metrics) of the last dispatched step
        t_last, step_last = time.perf_counter(), self.start_step
        for step in range(self.start_step + 1, cfg.steps + 1):
            batch = s.to_global(next(self.train_iter))
            self.state, metrics = s.train_step(self.state, s.frozen, s.task_arrays, batch)
            if pending is not None:
                self.check(*pending)
            pending = (step, metrics)
            is_log = step % cfg.log_every == 0 or step == cfg.steps
            is_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            is_ckpt = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if not (is_log or is_eval or is_ckpt):
                continue
            loss = self.check(*pending)
            pending = None
            now = time.perf_counter()
            record = self.record(step, loss, metrics, step - step_last, now - t_last)
            t_last, step_last = now, step
            val_loss = None
            if is_eval:
                ev = self.evaluate()
                record.update(ev)
                val_loss = ev["val_loss"]
                if self.best_val is None or val_loss < self.best_val:
                    self.best_val = val_loss
                    # every process takes part: the arrays may be sharded over all processes' devices
                    save_model_collective(s.model_of(self.state), self.workdir / "best", overwrite=True)
            if self.writer:
                self.writer.write(step, **record)
            self.bar.update(step, loss=loss, tokens_per_s=record["tokens_per_s"], mfu=record.get("mfu"))
            if is_ckpt:
                self.save(step, val_loss)
        if pending is not None:
            self.check(*pending)

    # -------------------------------------------------------------------------------- the end
    def close(self) -> None:
        """Waits for pending checkpoint writes; closes the progress bar and the metric writer."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.bar.close()
            if self.writer:
                self.writer.close()

    def result(self) -> TrainResult:
        self.manager.close()
        if jax.process_index() == 0 and (self.workdir / "metrics.jsonl").exists():
            plot_loss_curve(read_metrics(self.workdir / "metrics.jsonl"), self.workdir / "loss.png")
        return TrainResult(self.workdir, self.setup.cfg.steps, self.losses, self.best_val,
                           self.setup.model_of(self.state))


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, model: nnx.Module | None = None,
          task: Any = None, data=None, task_metrics: dict[str, Callable] | None = None,
          log: Callable[[str], None] = print, allow_changes: Sequence[str] = ()) -> TrainResult:
    """Runs (or resumes) the training described by `config` in `workdir` (module docstring).

    model: the initial model (any nnx module; not modified), instead of config.init_from / config.model (giving it
    and config.init_from is an error). task: what to minimise (train/task.py; default NextTokenTask()). data: an
    object with `train_batches(process_index, process_count)` -> the training iterator (with get_state/set_state),
    `eval_batches(process_index, process_count)` -> this process's rows of the evaluation batches, and `manifest`
    (dict or None); by default built from `config.data` (train/data.py). task_metrics: {name: fn(model) ->
    {metric: value}} evaluated with the validation loss, added to those of `config.task_metrics` (synthetic task
    names: exact match of greedy generations, logged as '<task>/exact_match'; see train/data.py). allow_changes:
    config keys (dotted; a key covers those under it) that may differ from the config the workdir's run was started
    with when it resumes, e.g. ('steps',) to extend a run; any other difference is a ConfigError (train/resume.py).
    Without `task`, `config.task` (when present) names one (train/ramp.py task_from_config: {'kind': 'mask_ramp',
    'start', 'steps'}), so `cfm-train --config.task.kind=mask_ramp` works as the train stage does.
    """
    if task is None and config.get("task"):
        from configurable_fm.train.ramp import task_from_config

        task = task_from_config(config.get("task"))
    run = Run(set_up(config, model=model, task=task, data=data, task_metrics=task_metrics), Path(workdir), log,
              allow_changes)
    try:
        run.loop()
    finally:
        run.close()
    result = run.result()
    write_adapter(result.model, config, Path(workdir), log)  # config.adapter.save: adapter/, adapter_peft/
    return result
