"""`cfm-train` (scripts/train.py): train (or resume) a model from an ml-collections config.

    cfm-train --config experiments/pretrain.py:tiny --workdir runs/tiny [--config.steps=50]
    cfm-train --config experiments/finetune.py:sort_mlp --workdir runs/ft \\
        --config.compute_dtype=float32 --config.mesh.shape='(1,1,1)'        # on a CPU

Re-running the same command resumes from the last complete checkpoint in the workdir; a changed config is refused
(naming the changed keys) unless the keys are listed, e.g. `--config.steps=300 --allow_changes=steps` to extend a
run (experiments/pretrain.py's warmup is 5% of steps, so there `--allow_changes=steps,optimizer.warmup_steps`;
every resume is recorded in WORKDIR/resumes.jsonl, and config.json holds the config in force). For multi-host
runs set --distributed (jax.distributed.initialize(): coordinator and process ids from the cluster environment,
or CFM_COORDINATOR / CFM_NUM_PROCESSES / CFM_PROCESS_ID); see README "Multi-host training".
Token shards named by the config (`data.dir`, `data.prepare`) live in the data root ($CFM_DATA_DIR, default
~/.cache/configurable_fm/data) and are built there on first use (train/data.py).
A `--config.KEY=VALUE` naming no key of the config is refused with the valid keys of that level.
absl logs at WARNING unless `--verbosity` / `-v` is given (orbax logs every checkpoint step at INFO).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from configurable_fm import cli


def define(fv: flags.FlagValues) -> None:
    cli.config_flag(fv, "config", "experiment config file (path.py:variant)")
    flags.DEFINE_string("workdir", None, "run directory (created; resumed when it holds checkpoints)", flag_values=fv)
    flags.DEFINE_list("allow_changes", [], "config keys that may differ from the run being resumed (e.g. steps)",
                      flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-process / multi-host)",
                      flag_values=fv)


def run(fv: flags.FlagValues) -> None:
    if fv.distributed:
        from configurable_fm.train.distributed import initialize

        initialize()
    from configurable_fm.train.trainer import train

    result = train(fv.config, fv.workdir, allow_changes=fv.allow_changes)
    print(f"done: step {result.step}, last loss {result.losses.get(result.step)}, "
          f"best val loss {result.best_val_loss}; metrics in {os.path.join(fv.workdir, 'metrics.jsonl')}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-train", required=("config", "workdir"))
