"""Growing a training run mid-way and continuing it: the last checkpoint of a trainer workdir, grown (model and
optimizer state), becomes the first checkpoint of a new workdir that `train` resumes at the same step.

    run = grow_run("runs/small", "runs/grown", config_large, [("width", dict(hidden_size=96, num_heads=6))],
                   optimizer="copy", rewarm_steps=20)
    train(run.config, "runs/grown")        # resumes at the source's step; the same two lines again resume, not regrow

What `grow_run` does (nothing in `dst` until all of it is written: the workdir appears complete or not at all,
interop.atomic; a killed attempt leaves only a temporary that the next attempt sweeps):
1. restores the last checkpoint of `src` (step s: trainable parameters, optimizer state, other variables, data
   iterator) with the config in force there (src/config.json; `model=` for a run started from a model argument,
   whose frozen parameters are not in checkpoints);
2. grows the model by `steps` ([(op, kwargs)]: ops.grow.grow_steps, as the 'grow' stage does) and the optimizer
   state with it: optimizer="copy" maps every moment with its parameter's index map (ops/grow/state.py: MSG's
   rule; counts kept), "reset" is the grown optimizer's fresh init except the schedule's step counter (the
   learning rate stays a function of the run's step: train/optim.py);
3. writes `dst`: grown/ (the grown model at step s: an orbax model checkpoint, the run's `init_from`, which
   supplies the frozen parameters on every resume), checkpoints/<s>/ (the grown state and the source's data
   iterator state), config.json (the grown run's config), run_info.json (where it came from), metrics.jsonl (the
   source's records up to step s, so the loss curve is the whole run's) and growth.json (the request, last).

The grown run's config is `config` with init_from = dst/grown, model = the grown model's config, and, with
`rewarm_steps` R (None: the schedule continues unchanged), optimizer.rewarm_at = s and optimizer.rewarm_steps = R
(train/optim.py: a new warmup to the peak over R steps from step s, then the decay over the remaining steps).
`config.steps` (the total, counted from the source's step 0) must exceed s. The data config should be the
source's (the iterator state continues where it stopped). The trainer then resumes as after an interruption:
config.json is the config in force, so `train(run.config, dst)` passes its resume check, and a changed config
needs `allow_changes` as usual.

Rerunning `grow_run` with the same request (source, steps, seed, optimizer, rewarm_steps) on a complete `dst`
changes nothing and returns the same config (status 'existing'); another request is a ConfigError naming the
differences; a `dst` that is not a grown run is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from configurable_fm import sharding as shd
from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError
from configurable_fm.interop.atomic import atomic_directory, write_json_atomic
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.factory import DTYPES, config_to_dict, with_compute_dtype
from configurable_fm.ops.grow import OPS, OPTIMIZER_MODES, grow_opt_state, grow_steps
from configurable_fm.train.adapters import configured
from configurable_fm.train.optim import make_optimizer
from configurable_fm.train.resume import CONFIG_FILE, config_changes, describe_changes, plain
from configurable_fm.train.state import ModelParts, TrainState
from configurable_fm.train.trainer import checkpoint_args, git_revision, initial_model, restore_checkpoint

GROWTH_FILE = "growth.json"
GROWN_MODEL = "grown"


@dataclasses.dataclass
class GrownRun:
    """workdir: the grown run; config: what to train it with (`train(config, workdir)`); step: the step it
    resumes at (the source's); status: 'grown' (written now) or 'existing' (a complete earlier grow_run)."""

    workdir: Path
    config: ml_collections.ConfigDict
    step: int
    status: str


def _request(src: Path, steps, seed: int, optimizer: str, rewarm_steps: int | None) -> dict:
    return plain({"source": str(src.absolute()), "steps": [[op, dict(kw)] for op, kw in steps], "seed": seed,
                  "optimizer": optimizer, "rewarm_steps": rewarm_steps})


def _check_args(steps, seed, optimizer, rewarm_steps) -> list[tuple[str, dict]]:
    if optimizer not in OPTIMIZER_MODES:
        raise ConfigError(f"grow_run: optimizer={optimizer!r} must be one of {list(OPTIMIZER_MODES)}")
    if rewarm_steps is not None and (not is_int(rewarm_steps) or rewarm_steps < 0):
        raise ConfigError(f"grow_run: rewarm_steps={rewarm_steps!r} must be None (keep the schedule) or an int >= 0")
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"grow_run: seed={seed!r} must be an int >= 0")
    out = []
    for i, step in enumerate(steps or ()):
        if not (isinstance(step, (tuple, list)) and len(step) == 2 and step[0] in OPS and isinstance(step[1], Mapping)):
            raise ConfigError(f"grow_run: steps[{i}]={step!r} must be (op, kwargs) with op one of {list(OPS)}")
        out.append((step[0], dict(step[1])))
    if not out:
        raise ConfigError("grow_run: steps is empty: nothing to grow")
    return out


def _grown_config(config: ml_collections.ConfigDict, sets: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config` (copied) with the dotted keys of `sets` set."""
    out = ml_collections.ConfigDict(config.to_dict())
    for key, value in sets.items():
        target = out
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return out


def _keep_schedule_count(fresh, old):
    """`fresh` with the step counter of every schedule state (optax ScaleByScheduleState) taken from `old`."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    old_counts = [x.count for x in jax.tree.leaves(old, is_leaf=is_sched) if is_sched(x)]
    leaves, treedef = jax.tree.flatten(fresh, is_leaf=is_sched)
    scheds = [i for i, x in enumerate(leaves) if is_sched(x)]
    if len(scheds) != len(old_counts):
        raise ConfigError("grow_run: the grown run's optimizer has another number of schedules than the source's")
    for i, count in zip(scheds, old_counts):
        leaves[i] = leaves[i]._replace(count=count)
    return jax.tree.unflatten(treedef, leaves)


def _copy_metrics(src: Path, dst: Path, step: int) -> None:
    path = src / "metrics.jsonl"
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # an incomplete last line left by a kill
            continue
        if record.get("step", step + 1) <= step:
            lines.append(line)
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def grow_run(src: str | os.PathLike, dst: str | os.PathLike, config: ml_collections.ConfigDict,
             steps: Sequence[tuple[str, Mapping[str, Any]]], *, seed: int = 0, optimizer: str = "copy",
             rewarm_steps: int | None = None, src_config: ml_collections.ConfigDict | None = None, model=None,
             log: Callable[[str], None] = print) -> GrownRun:
    """Grows the last checkpoint of the training workdir `src` into the new workdir `dst` (module docstring).

    config: the grown run's train config (its model section and init_from are set here; steps: the run's total);
    steps: [(op, kwargs)] with op 'width' | 'depth' | 'upcycle' and the operator's keyword arguments (step i's
    random parts from fold_in(key(seed), i)); optimizer: 'copy' | 'reset'; rewarm_steps: None, or a new warmup
    of that many steps from the growth step (0: straight to the peak); src_config: the source run's config
    (default: src/config.json); model: the source run's model argument, if it was started with one."""
    src, dst = Path(src), Path(dst)
    steps = _check_args(steps, seed, optimizer, rewarm_steps)
    request = _request(src, steps, seed, optimizer, rewarm_steps)
    marker = dst / GROWTH_FILE
    if marker.exists():
        recorded = json.loads(marker.read_text())
        changes = config_changes(recorded["request"], request)
        if changes:
            raise ConfigError(f"{dst} holds a run grown by another request: {describe_changes(changes)}; use the "
                              "same arguments to continue it, or a new workdir")
        log(f"grow_run: {dst} is complete (grown at step {recorded['step']}); nothing to do")
        return GrownRun(dst, _grown_config(config, recorded["sets"]), int(recorded["step"]), "existing")
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"grow_run: {dst} exists and is not a grown run (no {GROWTH_FILE}); use a new workdir")

    if src_config is None:
        if not (src / CONFIG_FILE).is_file():
            raise ConfigError(f"grow_run: {src} is not a training workdir (no {CONFIG_FILE})")
        src_config = ml_collections.ConfigDict(json.loads((src / CONFIG_FILE).read_text()))
    adapter = configured(src_config)
    if adapter is not None or src_config.get("frozen_dtype", ""):  # the restored state would not be the run's
        what = (f"trains a {adapter.kind} adapter (adapter.kind)" if adapter is not None
                else f"stores its frozen parameters as frozen_dtype={src_config.frozen_dtype!r}")
        raise ConfigError(f"grow_run: the source run {src} {what}; growing such a run is not implemented (grow "
                          "its model with a 'grow' stage or cfm-grow, then train the grown model)")
    manager = ocp.CheckpointManager((src / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step()
        if step is None:
            raise ConfigError(f"grow_run: {src} has no complete checkpoint to grow")
        if config.steps <= step:
            raise ConfigError(f"grow_run: config.steps={config.steps} leaves nothing to train after the source's "
                              f"step {step} (steps count from the source run's start)")
        source, _ = initial_model(src_config, model)
        source = with_compute_dtype(source, DTYPES[src_config.compute_dtype])
        parts = ModelParts.of(source, tuple(src_config.trainable))
        tx, _ = make_optimizer(src_config.optimizer, src_config.steps)
        trainable, frozen, other = parts.split(source)
        mesh = shd.make_mesh((1,), ("data",))
        like = TrainState(np.int32(0), trainable, tx.init(trainable), other)
        state, data_state, meta = restore_checkpoint(manager, step, like, mesh)
    finally:
        manager.close()
    log(f"grow_run: restored {src / 'checkpoints' / str(step)} (step {step})")

    grown = grow_steps(parts.merge(state.trainable, frozen, state.other), steps, seed=seed, log=log)
    sets = {"init_from": str((dst / GROWN_MODEL).absolute()), "model": config_to_dict(grown.model.cfg)}
    if rewarm_steps is not None:
        sets.update({"optimizer.rewarm_at": int(step), "optimizer.rewarm_steps": int(rewarm_steps)})
    cfg = _grown_config(config, sets)
    target = with_compute_dtype(grown.model, DTYPES[cfg.compute_dtype])
    new_parts = ModelParts.of(target, tuple(cfg.trainable))
    new_trainable, _, new_other = new_parts.split(target)
    new_tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    fresh = new_tx.init(new_trainable)
    if optimizer == "copy":
        opt_state = grow_opt_state(state.opt_state, fresh, grown.moments)
    else:
        opt_state = _keep_schedule_count(fresh, state.opt_state)
    new_state = TrainState(np.int32(step), new_trainable, opt_state, new_other)
    new_meta = {"step": int(step), "best_val_loss": None, "val_loss": None,
                "partitions": {"trainable": list(new_parts.trainable), "other": list(new_parts.other)}}

    with atomic_directory(dst, overwrite=dst.exists()) as tmp:
        save_model(grown.model, tmp / GROWN_MODEL)
        out = ocp.CheckpointManager((tmp / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False))
        try:
            out.save(int(step), args=checkpoint_args(new_state, data_state, new_meta))
            out.wait_until_finished()
        finally:
            out.close()
        write_json_atomic(tmp / CONFIG_FILE, plain(cfg.to_dict()))
        write_json_atomic(tmp / "run_info.json", {
            "git": git_revision(), "jax": jax.__version__, "model": sets["model"], "initial_model": sets["init_from"],
            "grown_from": {"workdir": str(src.absolute()), "step": int(step), "request": request,
                           "source_meta": meta}})
        _copy_metrics(src, tmp, int(step))
        write_json_atomic(tmp / GROWTH_FILE, {"request": request, "step": int(step), "sets": plain(sets),
                                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log(f"grow_run: wrote {dst} (step {step}, optimizer {optimizer}"
        + (f", re-warm over {rewarm_steps} steps" if rewarm_steps is not None else "") + ")")
    return GrownRun(dst, cfg, int(step), "grown")
