"""The stage kind 'grow_run': grow a training run mid-way and continue it (train/growth.py `grow_run`, then the
trainer), so that pretrain -> grow -> continue is one study whose stages resume.

    stages = [stage("small", "train", small_cfg),
              grow_run_config("grown", source="@small", train=large_cfg,
                              width=dict(hidden_size=96, num_heads=6), optimizer_state="copy", rewarm_steps=20)]

Config keys: every key of a train stage (stages/train.py TRAIN_KEYS: the continued run's train config; `steps` is
the total counted from the source run's step 0, `model` and `init_from` are set by the growth) plus
    source          : a reference to an earlier 'train' or 'grow_run' stage ('@<stage>'); its training workdir
                      (stage_dir/train, with checkpoints and config.json) is what grows, at its last checkpoint
    growth          : the growth sections of a grow config (stages/grow.py: width, depth, upcycle, each over its
                      defaults) and `seed`, applied in that order
    optimizer_state : 'copy' (every Adam moment mapped with its parameter's index map: ops/grow/state.py) or
                      'reset' (the grown optimizer's fresh init; the schedule's step counter is kept)
    rewarm_steps    : -1 keeps the learning-rate schedule as it is; R >= 0 re-warms to the peak over R steps from
                      the growth step, then decays over the remaining steps (train/optim.py rewarm_at)

What differs from a 'grow' stage followed by a 'train' stage: the step counter, the data iterator and (with
'copy') the optimizer moments continue the source run, and the metrics of the grown run start with the source's
records, so its loss curve is the whole run's. Masked growth (ops/grow/masked.py) is the other way to continue:
a 'grow' stage with a `masked` section, then a 'train' stage whose task is {'kind': 'mask_ramp', ...}.
Output: the grown run's final model; metrics as a train stage's plus growth_step and params_after.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from configurable_fm.errors import ConfigError
from configurable_fm.stages.checks import Checks
from configurable_fm.stages.grow import SECTIONS, check_config, count_params, describe
from configurable_fm.stages.study import StageContext, StageOutput, register_stage
from configurable_fm.stages.train import TRAIN_KEYS, train_output

OPTIMIZER_STATES = ("copy", "reset")
GROW_RUN_KEYS = TRAIN_KEYS + ("source", "growth", "optimizer_state", "rewarm_steps")
CHECK = Checks("grow_run stage")


def grow_run_config(name: str, *, source: str, train: ml_collections.ConfigDict, width: dict | None = None,
                    depth: dict | None = None, upcycle: dict | None = None, seed: int = 0,
                    optimizer_state: str = "copy", rewarm_steps: int = -1) -> ml_collections.ConfigDict:
    """A 'grow_run' stage config: the continued run's train config `train` (copied) with the growth keys
    (module docstring); each given growth section is filled with its defaults (stages/grow.py SECTIONS)."""
    c = ml_collections.ConfigDict(train.to_dict())
    c.name, c.kind = name, "grow_run"
    c.source = source
    growth = {"seed": int(seed)}
    for section, given in (("width", width), ("depth", depth), ("upcycle", upcycle)):
        if given is not None:
            growth[section] = {**SECTIONS[section], **given}
    c.growth = ml_collections.ConfigDict(growth)
    c.optimizer_state = optimizer_state
    c.rewarm_steps = int(rewarm_steps)
    return c


def source_workdir(source: str) -> Path:
    """The training workdir behind a resolved stage reference: the referenced stage's model is
    <stage_dir>/model and its run is <stage_dir>/train (a 'train' or 'grow_run' stage). ConfigError otherwise."""
    from configurable_fm.train.resume import CONFIG_FILE

    run = Path(source).parent / "train"
    if not (run / CONFIG_FILE).is_file() or not (run / "checkpoints").is_dir():
        raise CHECK.error(f"`source`={source!r} is not the output of a 'train' or 'grow_run' stage (no training "
                          f"workdir with {CONFIG_FILE} and checkpoints/ at {run})")
    return run


def check_growth(cfg) -> dict:
    """(steps, seed, optimizer_state, rewarm_steps or None) of the stage config, checked: ConfigError naming the
    key. The growth sections are checked as a grow config's (stages/grow.check_config)."""
    growth = cfg.get("growth")
    if not isinstance(growth, (dict, ml_collections.ConfigDict)):
        raise CHECK.error(f"`growth` must be a config with `seed` and growth sections {sorted(SECTIONS)}, "
                          f"got {growth!r}")
    grow = dict(growth.to_dict() if isinstance(growth, ml_collections.ConfigDict) else growth)
    valid = ("seed", "masked") + tuple(SECTIONS)  # masked: refused below with its own message
    unknown = sorted(set(grow) - set(valid))
    if unknown:  # a grow config's other keys (input, dtype, output, ...) would be ignored here
        raise CHECK.error(f"`growth` has unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    try:
        d = check_config(dict(grow, input="(the source run)"))
    except ConfigError as e:
        raise CHECK.error(f"`growth`: {e}") from None
    if d["steps"][0][0] == "masked":
        raise CHECK.error("`growth.masked`: masked growth has no optimizer-state map; use a 'grow' stage with a "
                          "`masked` section, then a 'train' stage with task {'kind': 'mask_ramp', ...}")
    optimizer_state = CHECK.choice("optimizer_state", cfg.get("optimizer_state", "copy"), OPTIMIZER_STATES)
    rewarm = CHECK.int("rewarm_steps", cfg.get("rewarm_steps", -1), -1)
    return dict(steps=d["steps"], seed=d["seed"], optimizer_state=optimizer_state,
                rewarm_steps=None if rewarm < 0 else rewarm)


def check_stage(cfg) -> tuple[dict, Any]:
    """(check_growth(cfg), the task of `cfg.task`): the stage's config checked without reading its source run
    (the study runs it on every stage before the first runs)."""
    from configurable_fm.train.ramp import task_from_config

    return check_growth(cfg), task_from_config(cfg.get("task"))


def grow_run_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Grows the source stage's run into stage_dir/train (once: a rerun finds it complete) and trains it to
    `steps`; an interrupted attempt resumes from the grown run's checkpoints."""
    from configurable_fm.train.growth import grow_run
    from configurable_fm.train.trainer import train

    g, task = check_stage(cfg)
    src = source_workdir(cfg.source)
    train_cfg = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k in TRAIN_KEYS})
    run = grow_run(src, ctx.stage_dir / "train", train_cfg, g["steps"], seed=g["seed"],
                   optimizer=g["optimizer_state"], rewarm_steps=g["rewarm_steps"], log=ctx.log)
    result = train(run.config, run.workdir, task=task, log=ctx.log)
    rewarm = ("the schedule unchanged" if g["rewarm_steps"] is None
              else f"the learning rate re-warmed over {g['rewarm_steps']} steps")
    how = (f"Grew the run of {ctx.label(cfg.source)} at step {run.step} ({describe(g)}; seed {g['seed']}; optimizer "
           f"state {g['optimizer_state']}; {rewarm}), then trained it to step {result.step}.")
    out = train_output(run.config, ctx, result, origin=how)
    out.metrics.update(growth_step=run.step, params_after=count_params(result.model))
    return out


register_stage("grow_run", grow_run_stage, keys=GROW_RUN_KEYS, check=check_stage)
