"""Train (or resume) a model from an ml-collections config.

    python scripts/train.py --config experiments/pretrain.py:tiny --workdir runs/tiny [--config.steps=50]

Re-running the same command resumes from the last complete checkpoint in the workdir. For multi-host runs
set --distributed (jax.distributed.initialize(): coordinator and process ids from the cluster environment,
or CFM_COORDINATOR / CFM_NUM_PROCESSES / CFM_PROCESS_ID); see README "Multi-host training".
"""
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config file (path.py:variant)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (created; resumed when it holds checkpoints)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-process / multi-host)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.distributed:
        from configurable_fm.train.distributed import initialize

        initialize()
    from configurable_fm.train.trainer import train

    result = train(FLAGS.config, FLAGS.workdir)
    print(f"done: step {result.step}, last loss {result.losses.get(result.step)}, "
          f"best val loss {result.best_val_loss}; metrics in {os.path.join(FLAGS.workdir, 'metrics.jsonl')}")


if __name__ == "__main__":
    app.run(main)
