"""Train (or resume) a model from an ml-collections config.

    python scripts/train.py --config experiments/pretrain.py:tiny --workdir runs/tiny [--config.steps=50]

Re-running the same command resumes from the last complete checkpoint in the workdir. For multi-host runs
set --distributed (jax.distributed.initialize(): coordinator and process ids from the cluster environment,
or CFM_COORDINATOR / CFM_NUM_PROCESSES / CFM_PROCESS_ID); see README "Multi-host training".
A `--config.KEY=VALUE` naming no key of the config is refused with the valid keys of that level.
absl logs at WARNING unless `--verbosity` / `-v` is given (orbax logs every checkpoint step at INFO).
"""
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from configurable_fm.config_errors import bad_override

config_flags.DEFINE_config_file("config", None, "experiment config file (path.py:variant)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (created; resumed when it holds checkpoints)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-process / multi-host)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _config_arg(argv: list[str]) -> str | None:
    """The value of --config in `argv` (`--config=X` or `--config X`)."""
    for i, arg in enumerate(argv):
        if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            return argv[i + 1]
        m = re.fullmatch(r"--?config=(.*)", arg)
        if m:
            return m.group(1)
    return None


def _usage_error(message: str) -> None:
    sys.stderr.write(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with readable errors for the config: a mistyped key lists the valid keys of its level
    (ml_collections raises a bare AttributeError), an error raised by `get_config` is shown without the traceback
    ml_collections embeds, a missing config file is named."""
    spec = _config_arg(argv)
    if spec and not os.path.isfile(spec.split(":")[0]):
        _usage_error(f"--config={spec}: no such config file {spec.split(':')[0]!r} (relative to {os.getcwd()})")
    try:
        args = FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            where = [line for line in lines if line.startswith("File ")]
            message = f"--config={_config_arg(argv)}: {lines[-1]}" + (f" ({where[-1]})" if where else "")
        _usage_error(message)
    except (AttributeError, KeyError) as e:  # an override path that the locked config does not have
        try:
            config = FLAGS["config"].parser.parse(spec)  # the file loaded as the flag loads it
            message = bad_override(config, argv)
        except Exception:  # noqa: BLE001: fall back to ml_collections' own error
            message = None
        if message is None:
            traceback.print_exc()
            message = f"{type(e).__name__}: {e}"
        _usage_error(message)
    if not isinstance(FLAGS.config, config_dict.ConfigDict):
        _usage_error(f"--config={spec}: get_config() returned {type(FLAGS.config).__name__}, not a ConfigDict")
    return args


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.distributed:
        from configurable_fm.train.distributed import initialize

        initialize()
    from configurable_fm.train.trainer import train

    result = train(FLAGS.config, FLAGS.workdir)
    print(f"done: step {result.step}, last loss {result.losses.get(result.step)}, "
          f"best val loss {result.best_val_loss}; metrics in {os.path.join(FLAGS.workdir, 'metrics.jsonl')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
